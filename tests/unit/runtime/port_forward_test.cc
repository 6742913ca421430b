// SPDX-License-Identifier: Apache-2.0
// PortForwarder's listeners (the relay itself is proven against a real VM in
// tests/acceptance/test_rpc.py): exact addresses, ephemeral ports reported, all-or-nothing.
#include "runtime/port_forward.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "common/fd.h"

using namespace matchlock;  // NOLINT(google-build-using-namespace)

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

}  // namespace

TEST_CASE("port forward: ephemeral ports are reported and only the asked address is bound",
          "[runtime][ports]") {
  auto loop = ev::Loop::create();
  REQUIRE(loop);
  auto fw = runtime::PortForwarder::start(**loop, "/nonexistent/control.sock",
                                          {{"127.0.0.1", 0, 8080}, {"127.0.0.1", 0, 9090}});
  REQUIRE(fw);
  const auto& b = (*fw)->bindings();
  REQUIRE(b.size() == 2);
  CHECK(b[0].address == "127.0.0.1");
  CHECK(b[0].local_port != 0);
  CHECK(b[1].local_port != 0);
  CHECK(b[0].local_port != b[1].local_port);
  CHECK(b[1].remote_port == 9090);
}

TEST_CASE("port forward: a taken port fails the whole set and names the port", "[runtime][ports]") {
  auto loop = ev::Loop::create();
  REQUIRE(loop);
  uint16_t busy = 0;
  Fd holder = takePort(busy);
  uint16_t free_port = 0;
  {
    Fd probe = takePort(free_port);  // released at the end of this scope
  }
  auto fw = runtime::PortForwarder::start(**loop, "/nonexistent/control.sock",
                                          {{"127.0.0.1", free_port, 80}, {"127.0.0.1", busy, 80}});
  REQUIRE_FALSE(fw);
  CHECK(fw.error().message().find(std::to_string(busy)) != std::string::npos);
  // All or nothing: the first listener was closed again.
  auto again = runtime::PortForwarder::start(**loop, "/nonexistent/control.sock",
                                             {{"127.0.0.1", free_port, 80}});
  REQUIRE(again);
  CHECK((*again)->bindings()[0].local_port == free_port);
}

TEST_CASE("port forward: an address that is not an IP is refused", "[runtime][ports]") {
  auto loop = ev::Loop::create();
  REQUIRE(loop);
  auto fw = runtime::PortForwarder::start(**loop, "/x", {{"localhost", 0, 80}});
  REQUIRE_FALSE(fw);
  CHECK(fw.error().code() == Errc::InvalidSpec);
}
