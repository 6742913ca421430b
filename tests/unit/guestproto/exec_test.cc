// SPDX-License-Identifier: Apache-2.0
#include "guestproto/exec.h"

#include <catch2/catch.hpp>

using namespace matchlock::guestproto;  // NOLINT(google-build-using-namespace)

TEST_CASE("exec messages round-trip through the incremental reader") {
  ExecRequest req;
  req.argv = {"sh", "-c", "echo hi"};
  req.env = {{"A", "1"}};
  req.cwd = "/work";
  req.user = "1000:1000";
  req.tty = true;
  req.rows = 50;
  req.cols = 132;
  ExecExit exit_msg{137, 9, ""};
  std::string wire = encodeStart(req) + encodeExecMessage(ExecKind::Stdin, "input") +
                     encodeExecMessage(ExecKind::StdinEof, "") + encodeResize(60, 200) +
                     encodeSignal(15) + encodeExit(exit_msg);
  ExecMessageReader reader;
  for (char c : wire) {
    REQUIRE(reader.feed(std::string_view(&c, 1)).has_value());
  }
  auto start = reader.next();
  REQUIRE(start);
  REQUIRE(start->kind == ExecKind::Start);
  ExecRequest got = decodeStart(start->payload).value();
  CHECK(got.argv == req.argv);
  CHECK(got.env == req.env);
  CHECK(got.cwd == "/work");
  CHECK(got.user == "1000:1000");
  CHECK(got.tty);
  CHECK(got.rows == 50);
  CHECK(got.cols == 132);
  CHECK(reader.next()->payload == "input");
  CHECK(reader.next()->kind == ExecKind::StdinEof);
  CHECK(decodeResize(reader.next()->payload).value() ==
        std::make_pair(uint16_t{60}, uint16_t{200}));
  CHECK(decodeSignal(reader.next()->payload).value() == 15);
  ExecExit e = decodeExit(reader.next()->payload).value();
  CHECK(e.code == 137);
  CHECK(e.signal == 9);
  CHECK_FALSE(reader.next());
}

TEST_CASE("bad exec messages are protocol errors") {
  CHECK_FALSE(decodeStart(R"({"argv": []})").has_value());
  CHECK_FALSE(decodeStart(R"({"argv": "sh"})").has_value());
  CHECK_FALSE(decodeStart("not json").has_value());
  CHECK_FALSE(decodeSignal(std::string(4, '\0')).has_value());
  CHECK_FALSE(decodeResize("x").has_value());
  ExecMessageReader reader;
  std::string bad("\x00\x00\x00\x00\x00", 5);
  CHECK_FALSE(reader.feed(bad).has_value());
  ExecMessageReader big;
  std::string huge("\x05\xff\xff\xff\xff", 5);
  CHECK_FALSE(big.feed(huge).has_value());
}

TEST_CASE("exec payload numbers are integers in range, never cast blindly") {
  // A guest's Exit with a huge float once reached nlohmann's float-to-int cast (undefined
  // behaviour; found by the exec fuzz target).
  CHECK_FALSE(matchlock::guestproto::decodeExit(R"({"code":118,"signal":9.3e37,"error":""})"));
  CHECK_FALSE(matchlock::guestproto::decodeExit(R"({"code":1.5})"));
  CHECK_FALSE(matchlock::guestproto::decodeExit(R"({"code":4294967296})"));
  CHECK_FALSE(matchlock::guestproto::decodeExit(R"({"code":0,"signal":-1})"));
  CHECK_FALSE(matchlock::guestproto::decodeExit(R"({"signal":9})"));
  auto exit = matchlock::guestproto::decodeExit(R"({"code":137,"signal":9,"error":""})");
  REQUIRE(exit.has_value());
  CHECK(exit->code == 137);
  CHECK(exit->signal == 9);
  CHECK_FALSE(matchlock::guestproto::decodeStart(R"({"argv":["sh"],"rows":70000})"));
  CHECK_FALSE(matchlock::guestproto::decodeStart(R"({"argv":["sh"],"cols":80.5})"));
  auto start = matchlock::guestproto::decodeStart(R"({"argv":["sh"],"rows":50})");
  REQUIRE(start.has_value());
  CHECK(start->rows == 50);
  CHECK(start->cols == 80);
}
