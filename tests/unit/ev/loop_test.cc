// SPDX-License-Identifier: Apache-2.0
#include "ev/loop.h"

#include <unistd.h>

#include <chrono>
#include <thread>

#include <catch2/catch.hpp>

using matchlock::Pipe;
using matchlock::ev::Loop;

namespace {

std::unique_ptr<Loop> makeLoop() {
  auto loop = Loop::create();
  REQUIRE(loop.has_value());
  return std::move(*loop);
}

}  // namespace

TEST_CASE("watch reports readability and stops after reset", "[ev]") {
  auto loop = makeLoop();
  auto pipe = Pipe::create();
  REQUIRE(pipe.has_value());
  int calls = 0;
  auto w = loop->watch(pipe->read.get(), matchlock::ev::kRead, [&](uint32_t events) {
    CHECK((events & matchlock::ev::kRead) != 0);
    ++calls;
  });
  REQUIRE(w.has_value());
  REQUIRE(::write(pipe->write.get(), "x", 1) == 1);
  REQUIRE(loop->runOnce(1000).has_value());
  CHECK(calls == 1);
  // Level-triggered: still readable.
  REQUIRE(loop->runOnce(1000).has_value());
  CHECK(calls == 2);
  w->reset();
  REQUIRE(loop->runOnce(0).has_value());
  CHECK(calls == 2);
}

TEST_CASE("events for a watch removed earlier in the same batch are dropped", "[ev]") {
  auto loop = makeLoop();
  auto a = Pipe::create();
  auto b = Pipe::create();
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  matchlock::ev::Watch wa;
  matchlock::ev::Watch wb;
  int calls = 0;
  // Whichever runs first removes the other: the other must not run in this batch.
  auto ra = loop->watch(a->read.get(), matchlock::ev::kRead, [&](uint32_t) {
    ++calls;
    wb.reset();
    b->read.reset();
  });
  auto rb = loop->watch(b->read.get(), matchlock::ev::kRead, [&](uint32_t) {
    ++calls;
    wa.reset();
    a->read.reset();
  });
  REQUIRE(ra.has_value());
  REQUIRE(rb.has_value());
  wa = std::move(*ra);
  wb = std::move(*rb);
  REQUIRE(::write(a->write.get(), "x", 1) == 1);
  REQUIRE(::write(b->write.get(), "x", 1) == 1);
  REQUIRE(loop->runOnce(1000).has_value());
  CHECK(calls == 1);
  CHECK(loop->watchCount() == 2);  // the wake-up eventfd and the survivor
}

TEST_CASE("a callback may destroy its own watch", "[ev]") {
  auto loop = makeLoop();
  auto p = Pipe::create();
  REQUIRE(p.has_value());
  auto holder = std::make_unique<matchlock::ev::Watch>();
  int calls = 0;
  auto w = loop->watch(p->read.get(), matchlock::ev::kRead, [&](uint32_t) {
    ++calls;
    holder.reset();
  });
  REQUIRE(w.has_value());
  *holder = std::move(*w);
  REQUIRE(::write(p->write.get(), "x", 1) == 1);
  REQUIRE(loop->runOnce(1000).has_value());
  REQUIRE(loop->runOnce(0).has_value());
  CHECK(calls == 1);
}

TEST_CASE("setEvents switches interest to writability", "[ev]") {
  auto loop = makeLoop();
  auto p = Pipe::create();
  REQUIRE(p.has_value());
  uint32_t seen = 0;
  auto w = loop->watch(p->write.get(), 0, [&](uint32_t events) { seen |= events; });
  REQUIRE(w.has_value());
  REQUIRE(loop->runOnce(0).has_value());
  CHECK(seen == 0);
  REQUIRE(w->setEvents(matchlock::ev::kWrite).has_value());
  REQUIRE(loop->runOnce(1000).has_value());
  CHECK((seen & matchlock::ev::kWrite) != 0);
}

TEST_CASE("timers fire once or periodically", "[ev]") {
  auto loop = makeLoop();
  int fired = 0;
  auto t = loop->timer([&] { ++fired; });
  REQUIRE(t.has_value());
  REQUIRE(t->arm(std::chrono::milliseconds(5)).has_value());
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (fired == 0 && std::chrono::steady_clock::now() < deadline) {
    REQUIRE(loop->runOnce(100).has_value());
  }
  CHECK(fired == 1);
  REQUIRE(t->arm(std::chrono::milliseconds(1), std::chrono::milliseconds(1)).has_value());
  while (fired < 4 && std::chrono::steady_clock::now() < deadline) {
    REQUIRE(loop->runOnce(100).has_value());
  }
  CHECK(fired >= 4);
  REQUIRE(t->disarm().has_value());
}

TEST_CASE("post and stop work from another thread", "[ev]") {
  auto loop = makeLoop();
  int ran = 0;
  std::thread other([&] {
    loop->post([&] { ++ran; });
    loop->post([&] { loop->stop(); });
  });
  REQUIRE(loop->run().has_value());
  other.join();
  CHECK(ran == 1);
}
