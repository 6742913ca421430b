// SPDX-License-Identifier: Apache-2.0
// health::Checker on a real ev::Loop with real timers, against a scripted guest that answers each
// probe with an exit code, output, or silence: compose's rules (retries, start period, timeout,
// recovery), one transition callback per change, and the `test` forms. The agent side is proven
// with real VMs in tests/acceptance/test_health.py.
#include "health/checker.h"

#include <deque>
#include <optional>

#include <catch2/catch.hpp>

#include "guestproto/exec.h"

using namespace matchlock;  // NOLINT(google-build-using-namespace)
using guestproto::ExecKind;
using health::State;
using std::chrono::milliseconds;

namespace {

/// Answers each probe with the next scripted reply (nullopt: never answers).
struct Reply {
  int code = 0;
  std::string output;
};

struct Guest {
  explicit Guest(ev::Loop& l) : loop(l) {}
  ev::Loop& loop;
  health::Checker* checker = nullptr;
  std::deque<std::optional<Reply>> script;
  uint32_t next = 1;
  int probes = 0;
  std::vector<std::string> argv_seen;
  std::vector<uint32_t> resets;
  std::vector<uint32_t> closed;

  health::Checker::Channel channel() {
    health::Checker::Channel c;
    c.open = [this]() -> Result<uint32_t> { return next++; };
    c.send = [this](uint32_t stream, std::string_view bytes) {
      guestproto::ExecMessageReader r;
      REQUIRE(r.feed(bytes));
      while (auto m = r.next()) {
        if (m->kind != ExecKind::Start) {
          continue;
        }
        auto req = guestproto::decodeStart(m->payload);
        REQUIRE(req);
        argv_seen = req->argv;
        ++probes;
        std::optional<Reply> reply;
        if (!script.empty()) {
          reply = script.front();
          script.pop_front();
        }
        if (!reply) {
          continue;  // hangs: the checker's timeout must end it
        }
        loop.post([this, stream, r = *reply] {
          std::string out = guestproto::encodeExecMessage(ExecKind::Stdout, r.output);
          guestproto::ExecExit exit;
          exit.code = r.code;
          out += guestproto::encodeExit(exit);
          checker->onData(stream, out);
          checker->onClose(stream);
        });
      }
    };
    c.consumed = [](uint32_t, size_t) {};
    c.close_write = [this](uint32_t s) { closed.push_back(s); };
    c.reset = [this](uint32_t s, std::string_view) { resets.push_back(s); };
    c.flush = [] {};
    return c;
  }
};

struct Fixture {
  std::unique_ptr<ev::Loop> loop = std::move(ev::Loop::create()).value();
  Guest guest = Guest(*loop);
  std::vector<std::pair<std::optional<State>, std::string>> changes;
  std::unique_ptr<health::Checker> checker;

  void make(health::Check check) {
    check.argv = {"/bin/check", "arg"};
    auto c = health::Checker::create(*loop, check, guest.channel(),
                                     [this](std::optional<State> s, const std::string& detail) {
                                       changes.emplace_back(s, detail);
                                     });
    REQUIRE(c);
    checker = std::move(*c);
    guest.checker = checker.get();
  }
  void runUntil(const std::function<bool()>& done, int max_ms = 3000) {
    for (int i = 0; i < max_ms / 5 && !done(); ++i) {
      REQUIRE(loop->runOnce(5));
    }
    REQUIRE(done());
  }
};

health::Check fast(int retries, int start_period_ms = 0) {
  health::Check c;
  c.interval = milliseconds(20);
  c.timeout = milliseconds(200);
  c.start_period = milliseconds(start_period_ms);
  c.retries = retries;
  return c;
}

}  // namespace

TEST_CASE("health: test forms become an argv", "[health]") {
  using V = std::vector<std::string>;
  CHECK(health::argvOf({"CMD", "curl", "-f", "http://x/"}) == V{"curl", "-f", "http://x/"});
  CHECK(health::argvOf({"CMD-SHELL", "curl -f http://x/ || exit 1"}) ==
        V{"/bin/sh", "-c", "curl -f http://x/ || exit 1"});
  CHECK(health::argvOf({"/bin/sh", "-c", "true"}) == V{"/bin/sh", "-c", "true"});
  CHECK_FALSE(health::argvOf({"NONE"}));
  CHECK_FALSE(health::argvOf({"CMD"}));
  CHECK_FALSE(health::argvOf({}));
  auto check = fast(4, 7);
  check.argv = {"x"};
  auto round = health::checkFromJson(health::toJson(check));
  REQUIRE(round);
  CHECK(round->retries == 4);
  CHECK(round->start_period == milliseconds(7));
  CHECK_FALSE(health::checkFromJson({{"argv", nlohmann::json::array()}}));
  CHECK_FALSE(health::checkFromJson({{"argv", {"x"}}, {"retries", 0}}));
}

TEST_CASE("health: a passing probe makes it healthy, once", "[health]") {
  Fixture f;
  f.make(fast(3));
  f.guest.script = {Reply{0, ""}, Reply{0, ""}, Reply{0, ""}};
  CHECK(f.checker->state() == State::Starting);
  f.checker->start();
  f.runUntil([&] { return f.guest.probes >= 3; });
  CHECK(f.guest.argv_seen == std::vector<std::string>{"/bin/check", "arg"});
  REQUIRE(f.changes.size() == 1);  // one transition, not one per probe
  CHECK(f.changes[0].first == State::Healthy);
  CHECK(f.guest.closed.size() >= 2);  // every finished probe's stream is closed
}

TEST_CASE("health: retries consecutive failures make it unhealthy; a pass heals it", "[health]") {
  Fixture f;
  f.make(fast(2));
  f.guest.script = {Reply{0, ""},  Reply{1, "boom\n"},          Reply{0, ""},
                    Reply{1, "x"}, Reply{7, "down for good\n"}, Reply{0, ""}};
  f.checker->start();
  f.runUntil([&] { return f.changes.size() >= 3; });
  // ok → healthy; one failure is not enough (the next probe passes); two in a row → unhealthy.
  CHECK(f.changes[0].first == State::Healthy);
  CHECK(f.changes[1].first == State::Unhealthy);
  CHECK(f.changes[1].second == "healthcheck failed 2 time(s) in a row: exit 7: down for good");
  CHECK(f.changes[2].first == State::Healthy);
  CHECK(f.checker->failingStreak() == 0);
}

TEST_CASE("health: failures inside the start period do not count", "[health]") {
  Fixture f;
  f.make(fast(1, 400));
  f.guest.script = {Reply{1, ""}, Reply{1, ""}, Reply{1, ""}};
  f.checker->start();
  f.runUntil([&] { return f.guest.probes >= 3; });
  CHECK(f.changes.empty());
  CHECK(f.checker->state() == State::Starting);
  // After the start period, one failure (retries = 1) is enough.
  f.guest.script = {Reply{1, "late"}};
  f.runUntil([&] { return !f.changes.empty(); });
  CHECK(f.changes[0].first == State::Unhealthy);
}

TEST_CASE("health: a probe that runs past its timeout fails and is killed", "[health]") {
  Fixture f;
  auto check = fast(1);
  check.timeout = milliseconds(50);
  f.make(check);
  f.guest.script = {std::nullopt};
  f.checker->start();
  f.runUntil([&] { return !f.changes.empty(); });
  CHECK(f.changes[0].first == State::Unhealthy);
  CHECK(f.changes[0].second.find("timed out after 50 ms") != std::string::npos);
  CHECK(f.guest.resets == std::vector<uint32_t>{1});  // its process group is killed
}

TEST_CASE("health: the control verb replaces the check live and can remove it", "[health]") {
  Fixture f;
  f.make(fast(1));
  f.guest.script = {Reply{0, ""}};
  f.checker->start();
  f.runUntil([&] { return f.changes.size() == 1; });
  CHECK(f.changes[0].first == State::Healthy);

  // A new check starts over (starting, then what its probes say) with its own command.
  health::Check next = fast(1);
  next.argv = {"/bin/other"};
  f.guest.script = {Reply{3, "no"}};
  auto reply =
      f.checker->handleControl({{"op", "healthcheck"}, {"healthcheck", health::toJson(next)}});
  REQUIRE(reply);
  CHECK((*reply)["ok"] == true);
  f.runUntil([&] { return f.changes.size() == 3; });
  CHECK(f.changes[1].first == State::Starting);
  CHECK(f.changes[2].first == State::Unhealthy);
  CHECK(f.guest.argv_seen == std::vector<std::string>{"/bin/other"});

  // Removed: no more probes, and the state is gone.
  auto removed = f.checker->handleControl({{"op", "healthcheck"}, {"healthcheck", nullptr}});
  REQUIRE(removed);
  CHECK((*removed)["health"].is_null());
  CHECK_FALSE(f.checker->enabled());
  REQUIRE(f.changes.size() == 4);
  CHECK_FALSE(f.changes[3].first.has_value());
  const int probes = f.guest.probes;
  for (int i = 0; i < 20; ++i) {
    REQUIRE(f.loop->runOnce(5));
  }
  CHECK(f.guest.probes == probes);
  CHECK((*f.checker->handleControl(
            {{"op", "healthcheck"}, {"healthcheck", {{"argv", 3}}}}))["ok"] == false);
  CHECK_FALSE(f.checker->handleControl({{"op", "status"}}));
}
