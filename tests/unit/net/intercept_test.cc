// SPDX-License-Identifier: Apache-2.0
// Interception rules, sans-I/O: matching (hosts, methods, Go path.Match globs), before-phase
// header/query/path edits and blocks, after-phase header edits and body plans, the SSE line
// rewriter and the chunked decoder fed byte by byte, and a fuzz smoke over all three parsers.
#include "net/intercept.h"

#include <random>

#include <catch2/catch.hpp>

using namespace matchlock;       // NOLINT(google-build-using-namespace)
using namespace matchlock::net;  // NOLINT(google-build-using-namespace)

namespace {

using Pairs = std::vector<std::pair<std::string, std::string>>;

http::Head request(std::string method, std::string target) {
  http::Head h;
  h.method = std::move(method);
  h.target = std::move(target);
  h.headers = {{"Host", "api.test"}, {"User-Agent", "curl"}};
  return h;
}

}  // namespace

TEST_CASE("intercept: path globs follow Go's path.Match", "[net][intercept]") {
  CHECK(matchPathGlob("/v1/*", "/v1/chat"));
  CHECK_FALSE(matchPathGlob("/v1/*", "/v1/chat/completions"));  // '*' stops at '/'
  CHECK(matchPathGlob("/v1/*/completions", "/v1/chat/completions"));
  CHECK(matchPathGlob("/a?c", "/abc"));
  CHECK_FALSE(matchPathGlob("/a?c", "/a/c"));
  CHECK(matchPathGlob("/[a-c]x", "/bx"));
  CHECK_FALSE(matchPathGlob("/[^a-c]x", "/bx"));
  CHECK(matchPathGlob("/\\*", "/*"));
  CHECK_FALSE(matchPathGlob("/[a-", "/a"));  // malformed: matches nothing
  CHECK(matchPathGlob("*", "anything-without-slash"));
}

TEST_CASE("intercept: before-phase rules edit headers, query and path, in order",
          "[net][intercept]") {
  HttpRule add;
  add.name = "tag";
  add.hosts = {"*.test"};
  add.methods = {"GET"};
  add.path = "/v1/*";
  add.set_headers = {{"X-Team", "agents"}, {"User-Agent", "matchlock"}};
  add.delete_headers = {"x-drop"};
  add.set_query = {{"key", "a b&c"}};
  add.delete_query = {"debug"};
  HttpRule move;
  move.hosts = {"api.test"};
  move.rewrite_path = "/v2/chat";
  auto rules = HttpRules::compile({add, move});
  REQUIRE_FALSE(rules->empty());

  auto h = request("GET", "/v1/chat?debug=1&keep=%2F");
  h.headers.push_back({"X-Drop", "1"});
  CHECK(rules->before("api.test", &h).empty());
  CHECK(h.find("x-team") == "agents");
  CHECK(h.find("user-agent") == "matchlock");
  CHECK_FALSE(h.find("x-drop"));
  CHECK(h.target == "/v2/chat?keep=%2F&key=a%20b%26c");

  // Other method, host or path: untouched.
  auto post = request("POST", "/v1/chat");
  CHECK(rules->before("api.test", &post).empty());
  CHECK_FALSE(post.find("x-team"));
  CHECK(post.target == "/v2/chat");  // the second rule matches every method
  auto other = request("GET", "/v1/chat");
  CHECK(rules->before("example.com", &other).empty());
  CHECK(other.target == "/v1/chat");
}

TEST_CASE("intercept: a block stops; rules that do nothing are dropped", "[net][intercept]") {
  HttpRule noop;  // allow, no changes: discarded
  HttpRule block;
  block.name = "no-deletes";
  block.methods = {"DELETE"};
  block.action = HttpRule::Action::Block;
  HttpRule after_block;
  after_block.set_headers = {{"X-Late", "1"}};
  auto rules = HttpRules::compile({noop, block, after_block});
  auto del = request("DELETE", "/x");
  CHECK(rules->before("api.test", &del) == "no-deletes");
  CHECK_FALSE(del.find("x-late"));
  CHECK(HttpRules::compile({noop})->empty());
}

TEST_CASE("intercept: after-phase rules edit response headers and plan the body",
          "[net][intercept]") {
  HttpRule hdr;
  hdr.phase = HttpRule::Phase::After;
  hdr.set_response_headers = {{"X-Seen", "yes"}};
  hdr.delete_response_headers = {"server"};
  hdr.body_replacements = {{"secret", "[redacted]"}};
  HttpRule more;
  more.phase = HttpRule::Phase::After;
  more.path = "/sse";
  more.body_replacements = {{"event", "EVENT"}};
  auto rules = HttpRules::compile({hdr, more});
  http::Head resp;
  resp.status = 200;
  resp.headers = {{"Server", "x"}, {"Content-Type", "text/plain"}};
  BodyPlan plan = rules->after("api.test", "GET", "/sse", &resp);
  CHECK_FALSE(plan.blocked);
  CHECK(resp.find("x-seen") == "yes");
  CHECK_FALSE(resp.find("server"));
  REQUIRE(plan.replacements.size() == 2);  // accumulated across rules, in order
  CHECK(replaceAll("a secret event", plan.replacements) == "a [redacted] EVENT");

  HttpRule stop;
  stop.phase = HttpRule::Phase::After;
  stop.name = "no-500";
  stop.action = HttpRule::Action::Block;
  http::Head r2;
  CHECK(HttpRules::compile({stop})->after("a", "GET", "/", &r2).blocked_by == "no-500");
}

TEST_CASE("intercept: the SSE rewriter changes data lines only, keeps framing",
          "[net][intercept]") {
  const std::string in =
      "event: event\r\ndata: event 0\r\n\r\n: comment event\ndata:event 1\n\nid: 2\rdata: x "
      "event\r";
  const std::string want =
      "event: event\r\ndata: EVENT 0\r\n\r\n: comment event\ndata:EVENT 1\n\nid: 2\rdata: x "
      "EVENT\r";
  // Whole, and fed one byte at a time (a CRLF split across reads included).
  SseRewriter whole(Pairs{{"event", "EVENT"}});
  CHECK(whole.feed(in) + whole.finish() == want);
  SseRewriter bytes(Pairs{{"event", "EVENT"}});
  std::string out;
  for (char c : in) {
    out += bytes.feed(std::string_view(&c, 1));
  }
  out += bytes.finish();
  CHECK(out == want);
  SseRewriter tail(Pairs{{"a", "b"}});
  CHECK(tail.feed("data: a") == "");
  CHECK(tail.finish() == "data: b");
}

TEST_CASE("intercept: chunked bodies decode across any split", "[net][intercept]") {
  const std::string wire = "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
  for (size_t split = 0; split <= wire.size(); ++split) {
    ChunkedDecoder d;
    size_t used1 = 0;
    size_t used2 = 0;
    std::string body = d.feed(std::string_view(wire).substr(0, split), &used1);
    if (!d.done()) {
      body += d.feed(std::string_view(wire).substr(used1), &used2);
    }
    INFO("split at " << split);
    CHECK(body == "hello, world");
    CHECK(d.done());
    CHECK(used1 + used2 == wire.size() - 4);  // "NEXT" belongs to the next message
  }
  ChunkedDecoder bad;
  size_t used = 0;
  (void)bad.feed("zz\r\n", &used);
  CHECK(bad.failed());
  ChunkedDecoder nolf;
  (void)nolf.feed("3\r\nabcX", &used);
  CHECK(nolf.failed());
}

TEST_CASE("intercept: rules JSON round-trips and names bad fields", "[net][intercept]") {
  HttpRule r;
  r.name = "x";
  r.phase = HttpRule::Phase::After;
  r.hosts = {"a.test"};
  r.methods = {"GET"};
  r.set_response_headers = {{"X-A", "1"}};
  r.body_replacements = {{"f", "r"}};
  auto back = httpRulesFromJson(toJson({r}));
  REQUIRE(back);
  CHECK(back->at(0) == r);
  auto bad = httpRulesFromJson(nlohmann::json::parse(R"([{"set_headers": {"Bad Name": "v"}}])"));
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message() ==
        "interception.rules[0].set_headers.Bad Name: not a valid header name and value");
  CHECK_FALSE(httpRulesFromJson(nlohmann::json::parse(R"([{"set_headers": {"A": "x\r\ny"}}])")));
  CHECK_FALSE(httpRulesFromJson(nlohmann::json::parse(R"([{"rewrite_path": "no-slash"}])")));
  CHECK_FALSE(httpRulesFromJson(nlohmann::json::object()));
}

TEST_CASE("intercept: fuzz smoke of the byte-level parsers", "[net][intercept][fuzz]") {
  std::mt19937 rng(7);
  const std::string alphabet = "0123456789abcdefXZ;\r\n :data*?[]^-/\\";
  for (int i = 0; i < 3000; ++i) {
    std::string s(rng() % 64, '\0');
    for (char& c : s) {
      c = alphabet[rng() % alphabet.size()];
    }
    ChunkedDecoder d;
    size_t used = 0;
    (void)d.feed(s, &used);
    CHECK(used <= s.size());
    SseRewriter w(Pairs{{"a", "bb"}});
    (void)w.feed(s);
    (void)w.finish();
    (void)matchPathGlob(s.substr(0, s.size() / 2), s.substr(s.size() / 2));
  }
}
