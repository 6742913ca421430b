// SPDX-License-Identifier: Apache-2.0
#include "guestproto/mux.h"

#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

using namespace matchlock::guestproto;  // NOLINT(google-build-using-namespace)

namespace {

// Records what a Mux delivers to its application.
struct App {
  bool ready = false;
  std::vector<std::pair<uint32_t, uint32_t>> opened;
  std::map<uint32_t, std::string> data;
  std::vector<uint32_t> closed;
  std::vector<std::pair<uint32_t, uint32_t>> resets;
  bool auto_consume = true;
  Mux* mux = nullptr;

  Mux::Callbacks callbacks() {
    Mux::Callbacks cb;
    cb.on_ready = [this] { ready = true; };
    cb.on_open = [this](uint32_t s, uint32_t port) { opened.emplace_back(s, port); };
    cb.on_data = [this](uint32_t s, std::string_view d) {
      data[s].append(d);
      if (auto_consume) {
        mux->consumed(s, d.size());
      }
    };
    cb.on_close = [this](uint32_t s) { closed.push_back(s); };
    cb.on_reset = [this](uint32_t s, uint32_t code, std::string_view) {
      resets.emplace_back(s, code);
    };
    return cb;
  }
};

struct Pair {
  App host_app;
  App guest_app;
  Mux host;
  Mux guest;

  explicit Pair(Mux::Options opts = {})
      : host(Mux::Role::Host, host_app.callbacks(), opts),
        guest(Mux::Role::Guest, guest_app.callbacks(), opts) {
    host_app.mux = &host;
    guest_app.mux = &guest;
    host.start();
    guest.start();
    pump();
  }

  // Moves bytes both ways until nothing is left; returns the bytes moved.
  size_t pump() {
    size_t moved = 0;
    while (host.hasOutput() || guest.hasOutput()) {
      std::string h = host.takeOutput();
      std::string g = guest.takeOutput();
      moved += h.size() + g.size();
      REQUIRE(guest.receive(h).has_value());
      REQUIRE(host.receive(g).has_value());
    }
    return moved;
  }
};

}  // namespace

TEST_CASE("handshake, open, data both ways and half-close") {
  Pair p;
  REQUIRE(p.host.ready());
  REQUIRE(p.guest.ready());
  CHECK(p.guest.peerAgent() == "matchlock");
  uint32_t s = p.host.open(kPortExec).value();
  CHECK(s % 2 == 1);
  REQUIRE(p.host.send(s, "ping").has_value());
  p.pump();
  REQUIRE(p.guest_app.opened.size() == 1);
  CHECK(p.guest_app.opened[0] == std::make_pair(s, kPortExec));
  CHECK(p.guest_app.data[s] == "ping");
  REQUIRE(p.guest.send(s, "pong").has_value());
  REQUIRE(p.guest.closeWrite(s).has_value());
  p.pump();
  CHECK(p.host_app.data[s] == "pong");
  CHECK(p.host_app.closed == std::vector<uint32_t>{s});
  CHECK(p.host.openStreams() == 1);  // our direction is still open
  REQUIRE(p.host.closeWrite(s).has_value());
  p.pump();
  CHECK(p.host.openStreams() == 0);
  CHECK(p.guest.openStreams() == 0);
  // Guest-initiated streams use even ids.
  uint32_t g = p.guest.open(kPortVfs).value();
  CHECK(g % 2 == 0);
}

TEST_CASE("flow control: the sender stops at the window until the receiver consumes") {
  Mux::Options opts;
  opts.initial_window = 64 * 1024;
  Pair p(opts);
  p.guest_app.auto_consume = false;
  uint32_t s = p.host.open(kPortExec).value();
  std::string big(1024 * 1024, 'a');
  for (size_t i = 0; i < big.size(); ++i) {
    big[i] = static_cast<char>('a' + i % 26);
  }
  REQUIRE(p.host.send(s, big).has_value());
  p.pump();
  CHECK(p.guest_app.data[s].size() == opts.initial_window);
  CHECK(p.host.pendingBytes(s) == big.size() - opts.initial_window);
  CHECK(p.host.credit(s) == 0);
  // Consume in odd-sized steps until everything arrived, in order.
  for (int rounds = 0; p.guest_app.data[s].size() < big.size() && rounds < 10000; ++rounds) {
    p.guest.consumed(s, 7000);
    p.pump();
  }
  CHECK(p.guest_app.data[s] == big);
  CHECK(p.host.pendingBytes(s) == 0);
}

TEST_CASE("streams are independent: one blocked stream does not stall another") {
  Mux::Options opts;
  opts.initial_window = 16 * 1024;
  Pair p(opts);
  p.guest_app.auto_consume = false;
  uint32_t a = p.host.open(kPortExec).value();
  uint32_t b = p.host.open(kPortExec).value();
  REQUIRE(p.host.send(a, std::string(100000, 'a')).has_value());
  REQUIRE(p.host.send(b, "small").has_value());
  p.pump();
  CHECK(p.guest_app.data[b] == "small");
  CHECK(p.guest_app.data[a].size() == opts.initial_window);
}

TEST_CASE("a peer that exceeds its credit breaks the protocol") {
  Mux::Options opts;
  opts.initial_window = 1024;
  App app;
  Mux guest(Mux::Role::Guest, app.callbacks(), opts);
  app.mux = &guest;
  app.auto_consume = false;
  guest.start();
  // Hand-written host side: Hello, Open, then more Data than the window.
  std::string hello;
  putU16(hello, kVersionMajor);
  putU16(hello, kVersionMinor);
  putU32(hello, kMaxPayload);
  putU32(hello, 1024);
  std::string port;
  putU32(port, kPortExec);
  std::string wire = encodeFrame(Frame{FrameType::Hello, 0, 0, hello}) +
                     encodeFrame(Frame{FrameType::Open, 0, 1, port}) +
                     encodeFrame(Frame{FrameType::Data, 0, 1, std::string(1000, 'x')}) +
                     encodeFrame(Frame{FrameType::Data, 0, 1, std::string(100, 'x')});
  auto st = guest.receive(wire);
  REQUIRE_FALSE(st.has_value());
  CHECK(st.error().code() == matchlock::Errc::Protocol);
  CHECK(st.error().message().find("flow control") != std::string::npos);
  // It told the peer why before giving up.
  FrameReader r;
  REQUIRE(r.feed(guest.takeOutput()).has_value());
  bool saw_goaway = false;
  while (auto f = r.next()) {
    saw_goaway = saw_goaway || f->type == FrameType::GoAway;
  }
  CHECK(saw_goaway);
}

TEST_CASE("protocol violations: frames before Hello, wrong id parity, unknown streams, versions") {
  auto hello = [](uint16_t major) {
    std::string p;
    putU16(p, major);
    putU16(p, 0);
    putU32(p, kMaxPayload);
    putU32(p, 65536);
    return encodeFrame(Frame{FrameType::Hello, 0, 0, p});
  };
  std::string port;
  putU32(port, kPortExec);
  struct Case {
    const char* name;
    std::string wire;
    const char* message;
  };
  std::vector<Case> cases = {
      {"data before hello", encodeFrame(Frame{FrameType::Data, 0, 1, "x"}), "before Hello"},
      {"version", hello(2), "version mismatch"},
      {"even id from host", hello(1) + encodeFrame(Frame{FrameType::Open, 0, 2, port}),
       "invalid stream id"},
      {"reused id",
       hello(1) + encodeFrame(Frame{FrameType::Open, 0, 3, port}) +
           encodeFrame(Frame{FrameType::Open, 0, 1, port}),
       "invalid stream id"},
      {"unknown stream", hello(1) + encodeFrame(Frame{FrameType::Data, 0, 9, "x"}),
       "unknown stream"},
      {"second hello", hello(1) + hello(1), "second Hello"},
  };
  for (const Case& c : cases) {
    SECTION(c.name) {
      App app;
      Mux guest(Mux::Role::Guest, app.callbacks());
      app.mux = &guest;
      guest.start();
      auto st = guest.receive(c.wire);
      REQUIRE_FALSE(st.has_value());
      CHECK(st.error().message().find(c.message) != std::string::npos);
      CHECK_FALSE(guest.receive(hello(1)).has_value());  // stays failed
    }
  }
}

TEST_CASE("reset aborts a stream on both sides; late frames for it are ignored") {
  Pair p;
  uint32_t s = p.host.open(kPortExec).value();
  REQUIRE(p.host.send(s, "abc").has_value());
  p.pump();
  p.guest.reset(s, 42, "cancelled");
  REQUIRE(p.host.send(s, "late").has_value());  // crosses the Reset on the wire
  p.pump();
  REQUIRE(p.host_app.resets.size() == 1);
  CHECK(p.host_app.resets[0] == std::make_pair(s, uint32_t{42}));
  CHECK(p.host.openStreams() == 0);
  CHECK(p.guest.openStreams() == 0);
  CHECK_FALSE(p.host.send(s, "more").has_value());
}

TEST_CASE("open before the handshake is unavailable; ping is answered") {
  App app;
  Mux host(Mux::Role::Host, app.callbacks());
  host.start();
  CHECK(host.open(kPortExec).error().code() == matchlock::Errc::Unavailable);
  Pair p;
  p.host.ping(99);
  CHECK(p.pump() > 0);
}
