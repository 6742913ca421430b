// SPDX-License-Identifier: Apache-2.0
#include "sys/socket_util.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <string>

#include <catch2/catch.hpp>

using matchlock::sys::SockAddr;

TEST_CASE("socket addresses parse and print", "[sys]") {
  auto a = SockAddr::parse("127.0.0.1:8080");
  REQUIRE(a.has_value());
  CHECK(a->port() == 8080);
  CHECK(a->ip() == "127.0.0.1");
  CHECK(a->toString() == "127.0.0.1:8080");
  auto b = SockAddr::parse("[::1]:443");
  REQUIRE(b.has_value());
  CHECK(b->toString() == "[::1]:443");
  auto c = SockAddr::parse("::1");
  REQUIRE(c.has_value());
  CHECK(c->port() == 0);
  CHECK_FALSE(SockAddr::parse("example.com:80").has_value());
  CHECK_FALSE(SockAddr::parse("1.2.3.4:99999").has_value());
}

TEST_CASE("listeners refuse the wildcard address", "[sys]") {
  auto any = SockAddr::parse("0.0.0.0:0");
  REQUIRE(any.has_value());
  CHECK_FALSE(matchlock::sys::listenTcp(*any).has_value());
  auto lo = SockAddr::parse("127.0.0.1:0");
  REQUIRE(lo.has_value());
  auto fd = matchlock::sys::listenTcp(*lo);
  REQUIRE(fd.has_value());
  auto local = matchlock::sys::localAddress(fd->get());
  REQUIRE(local.has_value());
  CHECK(local->port() != 0);
}

TEST_CASE("a Unix peer of our own uid is accepted, another refused by name", "[sys]") {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  matchlock::Fd a(sv[0]);
  matchlock::Fd b(sv[1]);
  CHECK(matchlock::sys::requireSameUid(a.get()).has_value());
  if (::geteuid() != 0) {
    return;  // another uid's peer needs root to switch
  }
  // An abstract address: no file permissions stand between the other uid and the listener.
  matchlock::Fd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(listener);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string name = "ml-peercred-test-" + std::to_string(::getpid());
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  REQUIRE(::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), len) == 0);
  REQUIRE(::listen(listener.get(), 1) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    if (::setresuid(65534, 65534, 65534) != 0 ||
        ::connect(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
      ::_exit(1);
    }
    char c = 0;
    (void)!::read(fd, &c, 1);  // until the parent has looked
    ::_exit(0);
  }
  matchlock::Fd conn(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  REQUIRE(conn);
  auto st = matchlock::sys::requireSameUid(conn.get());
  REQUIRE_FALSE(st.has_value());
  CHECK(st.error().code() == matchlock::Errc::PermissionDenied);
  CHECK(st.error().message().find("uid 65534") != std::string::npos);
  conn.reset();
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
}
