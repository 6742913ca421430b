// SPDX-License-Identifier: Apache-2.0
// SandboxPorts against real sockets and a scripted guest side of the channel (the guest's forward
// service itself is proven with real VMs in tests/acceptance/test_ports.py): exact addresses,
// all-or-nothing sets, retargeting in place, connections held until ready, the relay's framing
// both ways, and the control verb's errors.
#include "ports/sandbox_ports.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>

#include <catch2/catch.hpp>

#include "common/fd.h"
#include "guestproto/exec.h"

using namespace matchlock;  // NOLINT(google-build-using-namespace)
using guestproto::ExecKind;

namespace {

/// A listener on 127.0.0.1 with an ephemeral port (the fd keeps it taken).
Fd takePort(uint16_t& port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(fd.get(), 1) == 0);
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&a), &len) == 0);
  port = ntohs(a.sin_port);
  return fd;
}

/// True when 127.0.0.1:port can be bound now.
bool portFree(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  return ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
}

uint16_t freePort() {
  uint16_t p = 0;
  Fd probe = takePort(p);
  return p;
}

Fd connectTo(uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  return fd;
}

/// The guest end of the channel, recorded: what the component sent per stream.
struct FakeGuest {
  uint32_t next = 1;
  bool ready = true;
  std::map<uint32_t, guestproto::ExecMessageReader> readers;
  std::map<uint32_t, std::vector<guestproto::ExecMessage>> got;
  std::map<uint32_t, size_t> granted;
  std::vector<uint32_t> resets;

  ports::SandboxPorts::Channel channel() {
    ports::SandboxPorts::Channel c;
    c.open = [this]() -> Result<uint32_t> {
      if (!ready) {
        return makeError(Errc::Unavailable, "not ready");
      }
      return next++;
    };
    c.send = [this](uint32_t s, std::string_view bytes) {
      REQUIRE(readers[s].feed(bytes));
      while (auto m = readers[s].next()) {
        got[s].push_back(std::move(*m));
      }
    };
    c.consumed = [this](uint32_t s, size_t n) { granted[s] += n; };
    c.pending = [](uint32_t) { return size_t{0}; };
    c.close_write = [](uint32_t) {};
    c.reset = [this](uint32_t s, std::string_view) { resets.push_back(s); };
    c.flush = [] {};
    return c;
  }
};

void spin(ev::Loop& loop, const std::function<bool()>& done) {
  for (int i = 0; i < 200 && !done(); ++i) {
    REQUIRE(loop.runOnce(10));
  }
  REQUIRE(done());
}

}  // namespace

TEST_CASE("ports: bindings from JSON name the bad entry", "[ports]") {
  auto ok = ports::bindingsFromJson(
      nlohmann::json::parse(R"([{"address": "127.0.0.1", "host_port": 8080, "guest_port": 80}])"));
  REQUIRE(ok);
  CHECK(ok->at(0) == ports::Binding{"127.0.0.1", 8080, 80});
  auto bad = ports::bindingsFromJson(nlohmann::json::parse(
      R"([{"host_port": 1, "guest_port": 2}, {"host_port": 70000, "guest_port": 2}])"));
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message() == "ports[1].host_port: expected a port 0-65535");
  CHECK_FALSE(ports::bindingsFromJson(nlohmann::json::parse(R"([{"host_port": 1}])")));
  CHECK_FALSE(ports::bindingsFromJson(nlohmann::json::object()));
}

TEST_CASE("ports: a set is all or nothing and keeps listeners that stay", "[ports]") {
  auto loop = ev::Loop::create();
  REQUIRE(loop);
  FakeGuest guest;
  const uint16_t a = freePort();
  auto p = ports::SandboxPorts::create(**loop, "vm-test", {{"127.0.0.1", a, 80}}, guest.channel());
  REQUIRE(p);
  REQUIRE((*p)->bindings() == std::vector<ports::Binding>{{"127.0.0.1", a, 80}});

  // One new port taken: the whole set fails, naming it and the sandbox; the old one stays.
  uint16_t busy = 0;
  Fd holder = takePort(busy);
  const uint16_t b = freePort();
  auto st = (*p)->set({{"127.0.0.1", b, 81}, {"127.0.0.1", busy, 82}});
  REQUIRE_FALSE(st);
  CHECK(st.error().message() ==
        fmt::format("sandbox vm-test: cannot publish 127.0.0.1:{} (guest port 82): the port is "
                    "already in use on the host",
                    busy));
  CHECK((*p)->bindings() == std::vector<ports::Binding>{{"127.0.0.1", a, 80}});
  CHECK(portFree(b));  // bound for the failed set, released again

  // Same listener, new guest port: retargeted in place (no rebind, so no EADDRINUSE).
  REQUIRE((*p)->set({{"127.0.0.1", a, 8080}, {"127.0.0.1", b, 81}}));
  CHECK((*p)->bindings() ==
        std::vector<ports::Binding>{{"127.0.0.1", a, 8080}, {"127.0.0.1", b, 81}});
  // Removed: the listener closes.
  REQUIRE((*p)->set({{"127.0.0.1", b, 81}}));
  CHECK(portFree(a));
  // Duplicates within one set are refused.
  CHECK_FALSE((*p)->set({{"127.0.0.1", b, 1}, {"127.0.0.1", b, 2}}));
}

TEST_CASE("ports: only the requested address is bound, ephemeral ports reported", "[ports]") {
  auto loop = ev::Loop::create();
  REQUIRE(loop);
  FakeGuest guest;
  auto p = ports::SandboxPorts::create(**loop, "vm-test", {{"127.0.0.1", 0, 80}}, guest.channel());
  REQUIRE(p);
  auto b = (*p)->bindings();
  REQUIRE(b.size() == 1);
  CHECK(b[0].host_port != 0);
  CHECK_FALSE(
      ports::SandboxPorts::create(**loop, "vm-test", {{"example.com", 1, 80}}, guest.channel()));
}

TEST_CASE("ports: connections wait for the guest, then relay exec-framed bytes both ways",
          "[ports]") {
  auto loop = ev::Loop::create();
  REQUIRE(loop);
  FakeGuest guest;
  guest.ready = false;
  auto made =
      ports::SandboxPorts::create(**loop, "vm-test", {{"127.0.0.1", 0, 8123}}, guest.channel());
  REQUIRE(made);
  auto& p = **made;
  const uint16_t port = p.bindings()[0].host_port;
  Fd client = connectTo(port);
  REQUIRE(::write(client.get(), "hello", 5) == 5);
  spin(**loop, [&] { return p.connections() == 1; });
  CHECK(guest.got.empty());  // held, unread, until the guest is ready

  guest.ready = true;
  p.ready();
  spin(**loop, [&] { return guest.got[1].size() >= 2; });
  REQUIRE(p.owns(1));
  const auto& msgs = guest.got[1];
  CHECK(msgs[0].kind == ExecKind::Start);
  CHECK(nlohmann::json::parse(msgs[0].payload) ==
        nlohmann::json({{"op", "forward"}, {"port", 8123}}));
  CHECK(msgs[1].kind == ExecKind::Stdin);
  CHECK(msgs[1].payload == "hello");

  // Guest -> host: Stdout reaches the client, the bytes are granted back once written.
  std::string out = guestproto::encodeExecMessage(ExecKind::Stdout, "world");
  p.onData(1, out);
  char buf[16] = {};
  REQUIRE(::read(client.get(), buf, sizeof buf) == 5);
  CHECK(std::string(buf, 5) == "world");
  CHECK(guest.granted[1] == out.size());

  // Host EOF becomes StdinEof; the guest's Exit and Close end the connection.
  ::shutdown(client.get(), SHUT_WR);
  spin(**loop, [&] { return guest.got[1].back().kind == ExecKind::StdinEof; });
  p.onData(1, guestproto::encodeExit({}));
  p.onClose(1);
  spin(**loop, [&] { return p.connections() == 0; });
  CHECK(::read(client.get(), buf, sizeof buf) == 0);
  CHECK(guest.resets.empty());  // it ended cleanly: nothing to reset
}

TEST_CASE("ports: a host client that goes away resets its guest stream", "[ports]") {
  auto loop = ev::Loop::create();
  REQUIRE(loop);
  FakeGuest guest;
  auto made =
      ports::SandboxPorts::create(**loop, "vm-test", {{"127.0.0.1", 0, 80}}, guest.channel());
  REQUIRE(made);
  auto& p = **made;
  p.ready();
  {
    Fd client = connectTo(p.bindings()[0].host_port);
    spin(**loop, [&] { return !guest.got[1].empty(); });
    // Abortive close: the component sees a reset or EOF, then the write to it fails.
    linger l{1, 0};
    ::setsockopt(client.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
  }
  p.onData(1, guestproto::encodeExecMessage(ExecKind::Stdout, "late"));
  spin(**loop, [&] { return p.connections() == 0; });
  CHECK(guest.resets == std::vector<uint32_t>{1});
}

TEST_CASE("ports: the control verb lists, sets and explains refusals", "[ports]") {
  auto loop = ev::Loop::create();
  REQUIRE(loop);
  FakeGuest guest;
  auto made = ports::SandboxPorts::create(**loop, "vm-test", {}, guest.channel());
  REQUIRE(made);
  auto& p = **made;
  CHECK_FALSE(p.handleControl({{"op", "status"}}));
  auto list = p.handleControl({{"op", "ports"}});
  REQUIRE(list);
  CHECK((*list)["ports"] == nlohmann::json::array());
  auto set = p.handleControl(
      {{"op", "ports"}, {"action", "set"}, {"ports", {{{"host_port", 0}, {"guest_port", 80}}}}});
  REQUIRE(set);
  CHECK((*set)["ok"] == true);
  CHECK((*set)["ports"].size() == 1);
  auto bad = p.handleControl({{"op", "ports"}, {"action", "set"}, {"ports", 3}});
  REQUIRE(bad);
  CHECK((*bad)["ok"] == false);
  CHECK((*bad)["error"] == "ports: expected an array");
  CHECK((*p.handleControl({{"op", "ports"}, {"action", "nope"}}))["ok"] == false);
}
