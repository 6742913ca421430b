// SPDX-License-Identifier: Apache-2.0
#include <random>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "common/base64.h"
#include "rpc/create_params.h"
#include "rpc/jsonrpc.h"

using namespace matchlock;
using namespace matchlock::rpc;
using Json = nlohmann::json;

TEST_CASE("jsonrpc: a request, a notification and their ids", "[rpc]") {
  Parsed p = parse(R"({"jsonrpc":"2.0","method":"exec","params":{"command":"true"},"id":7})");
  REQUIRE(p.message);
  CHECK(p.message->method == "exec");
  CHECK(p.message->params["command"] == "true");
  REQUIRE(p.message->id);
  CHECK(*p.message->id == 7);

  p = parse(R"({"jsonrpc":"2.0","method":"exec_pipe.stdin","params":{"id":3,"data":"YQ=="}})");
  REQUIRE(p.message);
  CHECK_FALSE(p.message->id);

  p = parse(R"({"jsonrpc":"2.0","method":"log","id":"abc"})");
  REQUIRE(p.message);
  CHECK(p.message->params.is_null());
  CHECK(*p.message->id == "abc");
}

TEST_CASE("jsonrpc: parse and request errors carry upstream's codes", "[rpc]") {
  Parsed p = parse("{not json");
  REQUIRE(p.failure);
  CHECK(p.failure->code == kParseError);
  CHECK(p.failure->message == "Parse error");
  CHECK(p.failure->id.is_null());

  p = parse(R"([1,2])");
  REQUIRE(p.failure);
  CHECK(p.failure->code == kInvalidRequest);

  p = parse(R"({"jsonrpc":"2.0","id":4})");
  REQUIRE(p.failure);
  CHECK(p.failure->code == kInvalidRequest);
  CHECK(p.failure->id == 4);  // the id is kept when it was usable

  p = parse(R"({"jsonrpc":"1.0","method":"x","id":1})");
  REQUIRE(p.failure);
  CHECK(p.failure->code == kInvalidRequest);

  p = parse(R"({"jsonrpc":"2.0","method":"x","id":{"a":1}})");
  REQUIRE(p.failure);
  CHECK(p.failure->code == kInvalidRequest);
}

TEST_CASE("jsonrpc: response lines are one JSON object with a newline", "[rpc]") {
  std::string ok = resultLine(5, {{"id", "vm-1"}});
  REQUIRE(ok.back() == '\n');
  Json j = Json::parse(ok);
  CHECK(j["jsonrpc"] == "2.0");
  CHECK(j["id"] == 5);
  CHECK(j["result"]["id"] == "vm-1");

  Json e = Json::parse(errorLine(nullptr, kParseError, "Parse error"));
  CHECK_FALSE(e.contains("id"));  // upstream omits an unknown id
  CHECK(e["error"]["code"] == -32700);

  // Invalid UTF-8 in a message (a guest path, say) is replaced, never thrown.
  Json n = Json::parse(notificationLine("event", {{"path", std::string("a\xff")}}));
  CHECK(n["method"] == "event");
  CHECK_FALSE(n.contains("id"));
}

TEST_CASE("jsonrpc: LineReader splits, skips blank lines and bounds a line", "[rpc]") {
  LineReader r(16);
  r.feed("{\"a\":1}\n\n  \n{\"b\"");
  auto l = r.next();
  REQUIRE(l);
  CHECK(l->text == "{\"a\":1}");
  CHECK_FALSE(r.next());  // blank lines skipped, the last one incomplete
  r.feed(":2}\r\n");
  l = r.next();
  REQUIRE(l);
  CHECK(Json::parse(l->text)["b"] == 2);

  r.feed(std::string(40, 'x'));
  l = r.next();
  REQUIRE(l);
  CHECK(l->oversized);
  r.feed(std::string(40, 'x') + "\n{}\n");
  l = r.next();  // the rest of the oversized line is discarded, not reported twice
  REQUIRE(l);
  CHECK_FALSE(l->oversized);
  CHECK(l->text == "{}");
}

TEST_CASE("base64: standard alphabet with padding, strict decode", "[rpc]") {
  std::string all;
  for (int i = 0; i < 256; ++i) {
    all.push_back(static_cast<char>(i));
  }
  CHECK(base64Decode(base64Encode(all)).value() == all);
  CHECK(base64Encode("") == "");
  CHECK(base64Encode("ab") == "YWI=");
  CHECK(base64Decode("YWI=").value() == "ab");
  CHECK_FALSE(base64Decode("YWI"));     // padding is required
  CHECK_FALSE(base64Decode("Y W I="));  // no whitespace
  CHECK_FALSE(base64Decode("YW-="));    // not the URL alphabet
  CHECK_FALSE(base64Decode("YQ==YQ=="));
}

TEST_CASE("fuzz smoke: arbitrary bytes never throw out of the parsers", "[rpc][fuzz]") {
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> byte(0, 255);
  const std::string seeds[] = {
      R"({"jsonrpc":"2.0","method":"exec","params":{"command":"x"},"id":1})",
      R"({"id":1e400,"method":"m"})", "\"\\ud800\"", "[[[[[[[["};
  for (int round = 0; round < 3000; ++round) {
    std::string s = seeds[round % 4];
    for (int k = 0; k < 1 + round % 8; ++k) {
      size_t at = static_cast<size_t>(byte(rng)) % (s.size() + 1);
      s.insert(s.begin() + static_cast<std::ptrdiff_t>(at), static_cast<char>(byte(rng)));
    }
    CHECK_NOTHROW(parse(s));
    CHECK_NOTHROW((void)base64Decode(s));
    LineReader r(64);
    CHECK_NOTHROW(r.feed(s));
    while (auto l = r.next()) {
      CHECK(l->text.size() <= 64);
    }
  }
}

TEST_CASE("create params: upstream's Config, errors in its field names, nothing thrown", "[rpc]") {
  auto ok = decodeCreateParams(
      Json::parse(R"({"image":"alpine","keep_on_disconnect":true,"vfs":{"workspace":"/w"},
                      "resources":{"memory_mb":0,"cpus":2}})"),
      "vm-1");
  REQUIRE(ok.has_value());
  CHECK(ok->spec.image == "alpine");
  CHECK(ok->id == "vm-1");
  CHECK(ok->keep);
  CHECK_FALSE(ok->launch_entrypoint);
  CHECK(ok->workspace == "/w");
  CHECK(ok->spec.cpus == 2);

  // A non-string workspace once escaped as a nlohmann type_error and ended `matchlock rpc`.
  auto ws = decodeCreateParams(Json::parse(R"({"image":"alpine","vfs":{"workspace":5}})"), "vm-1");
  REQUIRE_FALSE(ws.has_value());
  CHECK(ws.error().message() == "Invalid params: vfs.workspace must be a string");
  auto no_image = decodeCreateParams(Json::parse(R"({"cpus":1})"), "vm-1");
  REQUIRE_FALSE(no_image.has_value());
  CHECK(no_image.error().message().rfind("Invalid params: ", 0) == 0);
  auto keep = decodeCreateParams(Json::parse(R"({"image":"a","keep_on_disconnect":"yes"})"), "v");
  REQUIRE_FALSE(keep.has_value());
  CHECK(keep.error().message() == "Invalid params: keep_on_disconnect must be a boolean");
  auto mem = decodeCreateParams(Json::parse(R"({"image":"a","resources":{"memory_mb":"x"}})"), "v");
  REQUIRE_FALSE(mem.has_value());
  CHECK(mem.error().message().find("resources.memory_mb") != std::string::npos);
  CHECK_FALSE(decodeCreateParams(Json::array(), "v").has_value());
  CHECK_FALSE(decodeCreateParams(Json("x"), "v").has_value());
}
