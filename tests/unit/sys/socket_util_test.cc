// SPDX-License-Identifier: Apache-2.0
#include "sys/socket_util.h"

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
