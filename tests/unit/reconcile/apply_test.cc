// SPDX-License-Identifier: Apache-2.0
// apply(): dependency order, bounded parallelism, failures isolated to their dependents, blocked
// sandboxes, and readiness waits — against a recording fake driver.
#include "reconcile/apply.h"

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>

#include <catch2/catch.hpp>

using namespace matchlock;             // NOLINT(google-build-using-namespace)
using namespace matchlock::reconcile;  // NOLINT(google-build-using-namespace)

namespace {

class FakeDriver final : public Driver {
 public:
  std::set<std::string> fail;
  std::chrono::milliseconds delay{0};

  Status apply(const Action& action, const Desired* /*desired*/) override {
    int now = ++running_;
    {
      std::lock_guard lock(mu_);
      max_running_ = std::max(max_running_, now);
      log_.push_back("start " + action.sandbox);
    }
    std::this_thread::sleep_for(delay);
    --running_;
    std::lock_guard lock(mu_);
    log_.push_back("done " + action.sandbox);
    if (fail.contains(action.sandbox)) {
      return makeError(Errc::Unavailable, "boom");
    }
    return ok();
  }
  Status waitReady(const std::string& sandbox) override {
    std::lock_guard lock(mu_);
    log_.push_back("ready " + sandbox);
    return ok();
  }

  std::vector<std::string> log() {
    std::lock_guard lock(mu_);
    return log_;
  }
  int maxRunning() {
    std::lock_guard lock(mu_);
    return max_running_;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> log_;
  std::atomic<int> running_{0};
  int max_running_ = 0;
};

Desired want(const std::string& name, std::vector<std::string> deps = {}) {
  Desired d;
  d.spec.name = name;
  d.spec.image = "busybox:1";
  d.spec.depends_on = std::move(deps);
  return d;
}

size_t indexOf(const std::vector<std::string>& log, const std::string& entry) {
  auto it = std::find(log.begin(), log.end(), entry);
  REQUIRE(it != log.end());
  return static_cast<size_t>(it - log.begin());
}

const Outcome& outcomeOf(const std::vector<Outcome>& outs, const std::string& name) {
  for (const auto& o : outs) {
    if (o.sandbox == name) {
      return o;
    }
  }
  FAIL("no outcome for " << name);
  return outs.front();
}

}  // namespace

TEST_CASE("a dependency is applied and ready before its dependents start") {
  std::map<std::string, Desired> desired = {{"db", want("db")}, {"web", want("web", {"db"})}};
  Plan p = plan("p", desired, {}, {});
  FakeDriver driver;
  auto outs = apply(p, desired, driver, {});
  auto log = driver.log();
  CHECK(indexOf(log, "ready db") < indexOf(log, "start web"));
  CHECK(outcomeOf(outs, "db").status);
  CHECK(outcomeOf(outs, "web").status);
  CHECK(outcomeOf(outs, "db").ready);         // waited for: web needs it
  CHECK_FALSE(outcomeOf(outs, "web").ready);  // no --wait, no dependents
}

TEST_CASE("independent sandboxes run in parallel, bounded by parallelism") {
  std::map<std::string, Desired> desired;
  for (int i = 0; i < 6; ++i) {
    std::string n = "s" + std::to_string(i);
    desired[n] = want(n);
  }
  Plan p = plan("p", desired, {}, {});
  FakeDriver driver;
  driver.delay = std::chrono::milliseconds(50);
  ApplyOptions opts;
  opts.parallelism = 3;
  auto outs = apply(p, desired, driver, opts);
  CHECK(outs.size() == 6);
  CHECK(driver.maxRunning() <= 3);
  CHECK(driver.maxRunning() >= 2);
}

TEST_CASE("a failure skips its dependents only; nothing is rolled back") {
  std::map<std::string, Desired> desired = {{"db", want("db")},
                                            {"web", want("web", {"db"})},
                                            {"edge", want("edge", {"web"})},
                                            {"solo", want("solo")}};
  Plan p = plan("p", desired, {}, {});
  FakeDriver driver;
  driver.fail = {"db"};
  auto outs = apply(p, desired, driver, {});
  CHECK_FALSE(outcomeOf(outs, "db").status);
  CHECK(outcomeOf(outs, "web").skipped);
  CHECK(outcomeOf(outs, "edge").skipped);
  CHECK(outcomeOf(outs, "web").status.error().message() == "not started: dependency db failed");
  CHECK(outcomeOf(outs, "solo").status);
  auto log = driver.log();
  CHECK(std::find(log.begin(), log.end(), "start web") == log.end());
}

TEST_CASE("a blocked sandbox fails without the driver; a blocked noop stays a noop") {
  std::map<std::string, Desired> desired = {{"a", want("a")}, {"b", want("b")}};
  desired["a"].blocked = "secret KEY: environment variable KEY is not set";
  desired["b"].blocked = "secret KEY: environment variable KEY is not set";
  std::map<std::string, Observed> observed;
  Observed running;
  running.health = Observed::Health::Running;
  running.applied = desired["b"].spec;
  observed["b"] = running;
  Plan p = plan("p", desired, observed, {});
  FakeDriver driver;
  ApplyOptions opts;
  opts.wait = true;
  auto outs = apply(p, desired, driver, opts);
  CHECK(outcomeOf(outs, "a").status.error().message() ==
        "secret KEY: environment variable KEY is not set");
  CHECK(outcomeOf(outs, "b").status);
  CHECK(outcomeOf(outs, "b").kind == ActionKind::Noop);
  auto log = driver.log();
  CHECK(std::find(log.begin(), log.end(), "start a") == log.end());
  CHECK(std::find(log.begin(), log.end(), "ready b") != log.end());  // --wait covers noops too
}

TEST_CASE("orphan removals are applied; an empty plan does nothing") {
  std::map<std::string, Desired> desired = {{"a", want("a")}};
  Observed running;
  running.health = Observed::Health::Running;
  running.applied = desired["a"].spec;
  std::map<std::string, Observed> observed = {{"a", running}, {"old", running}};
  PlanOptions po;
  po.remove_orphans = true;
  Plan p = plan("p", desired, observed, po);
  FakeDriver driver;
  auto outs = apply(p, desired, driver, {});
  CHECK(outcomeOf(outs, "old").kind == ActionKind::Remove);
  CHECK(driver.log() == std::vector<std::string>{"start old", "done old"});

  FakeDriver idle;
  auto none = apply(plan("p", desired, {{"a", running}}, {}), desired, idle, {});
  CHECK(idle.log().empty());
  CHECK(none.size() == 1);
}
