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

/// The before phase run to its end (no callback rules here).
std::string runBefore(const HttpRules& rules, std::string_view host, http::Head* head) {
  size_t cursor = 0;
  RuleStep step = rules.before(host, head, &cursor);
  REQUIRE_FALSE(step.call);
  return step.blocked_by;
}

BodyPlan runAfter(const HttpRules& rules, std::string_view host, std::string method,
                  std::string path, http::Head* response) {
  BodyPlan plan;
  size_t cursor = 0;
  RuleStep step =
      rules.after(host, request(std::move(method), std::move(path)), response, &plan, &cursor);
  REQUIRE_FALSE(step.call);
  return plan;
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
  CHECK(runBefore(*rules, "api.test", &h).empty());
  CHECK(h.find("x-team") == "agents");
  CHECK(h.find("user-agent") == "matchlock");
  CHECK_FALSE(h.find("x-drop"));
  CHECK(h.target == "/v2/chat?keep=%2F&key=a%20b%26c");

  // Other method, host or path: untouched.
  auto post = request("POST", "/v1/chat");
  CHECK(runBefore(*rules, "api.test", &post).empty());
  CHECK_FALSE(post.find("x-team"));
  CHECK(post.target == "/v2/chat");  // the second rule matches every method
  auto other = request("GET", "/v1/chat");
  CHECK(runBefore(*rules, "example.com", &other).empty());
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
  CHECK(runBefore(*rules, "api.test", &del) == "no-deletes");
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
  BodyPlan plan = runAfter(*rules, "api.test", "GET", "/sse", &resp);
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
  CHECK(runAfter(*HttpRules::compile({stop}), "a", "GET", "/", &r2).blocked_by == "no-500");
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
  r.callback_id = "cb";
  r.timeout_ms = 1500;
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

TEST_CASE("intercept: a callback rule pauses the phase with upstream's request shape",
          "[net][intercept][callback]") {
  HttpRule tag;
  tag.set_headers = {{"X-Before", "1"}};
  HttpRule cb;
  cb.name = "ask";
  cb.callback_id = "cb-1";
  cb.path = "/v1/*";
  cb.timeout_ms = 250;
  HttpRule late;
  late.set_headers = {{"X-Late", "1"}};
  auto rules = HttpRules::compile({tag, cb, late}, "/run/sdk.sock");
  CHECK(rules->callbackSocket() == "/run/sdk.sock");
  CHECK_FALSE(rules->hasAfterCallbacks());

  auto h = request("GET", "/v1/chat?a=1&a=2&b=x%20y");
  h.headers.push_back({"accept", "a"});
  h.headers.push_back({"ACCEPT", "b"});
  size_t cursor = 0;
  RuleStep step = rules->before("api.test", &h, &cursor);
  REQUIRE(step.call);
  CHECK(step.blocked_by.empty());
  CHECK(step.call->rule == "ask");
  CHECK(step.call->socket == "/run/sdk.sock");
  CHECK(step.call->timeout == std::chrono::milliseconds(250));
  const auto& j = step.call->request;
  CHECK(j["callback_id"] == "cb-1");
  CHECK(j["phase"] == "before");
  CHECK(j["host"] == "api.test");
  CHECK(j["method"] == "GET");
  CHECK(j["path"] == "/v1/chat");
  CHECK(j["query"] == nlohmann::json({{"a", "1"}, {"b", "x y"}}));      // first value per key
  CHECK(j["request_headers"]["Accept"] == nlohmann::json({"a", "b"}));  // canonical names
  CHECK(j["request_headers"]["X-Before"] == nlohmann::json({"1"}));     // earlier rules applied
  CHECK_FALSE(h.find("x-late"));
  // Resumed after the answer: the later rules run.
  step = rules->before("api.test", &h, &cursor);
  CHECK_FALSE(step.call);
  CHECK(h.find("x-late") == "1");

  // Another path: no call. Without a socket the callback part is dropped (and a rule that is
  // only a callback goes with it); the default deadline applies when timeout_ms is 0.
  auto other = request("GET", "/health");
  cursor = 0;
  CHECK_FALSE(rules->before("api.test", &other, &cursor).call);
  CHECK(HttpRules::compile({cb})->empty());
  cb.timeout_ms = 0;
  auto h2 = request("GET", "/v1/x");
  cursor = 0;
  auto again = HttpRules::compile({cb}, "/s")->before("api.test", &h2, &cursor);
  REQUIRE(again.call);
  CHECK(again.call->timeout == std::chrono::milliseconds(spec::kDefaultHookTimeoutMs));
}

TEST_CASE("intercept: callback answers are validated whole", "[net][intercept][callback]") {
  auto err = [](std::string_view text) {
    auto a = parseHookAnswer(text);
    REQUIRE_FALSE(a);
    return a.error().message();
  };
  CHECK(err("not json") == "the answer is not a JSON object");
  CHECK(err("[1]") == "the answer is not a JSON object");
  CHECK(err(R"({"error":"boom"})") == "the callback reported: boom");
  CHECK(err(R"({"action":"explode"})") == "action: expected allow, block or mutate");
  CHECK(err(R"({"request":{"headers":{"Bad Name":"x"}}})") ==
        "request.headers: 'Bad Name' is not a header name");
  CHECK(err(R"({"request":{"headers":{"A":"x\r\nInjected: 1"}}})") ==
        "request.headers.A: a header value cannot hold CR, LF or NUL");
  CHECK(err(R"({"request":{"path":"/a b"}})").starts_with("request.path:"));
  CHECK(err(R"({"request":{"path":"relative"}})").starts_with("request.path:"));
  CHECK(err(R"({"response":{"set_body_base64":"***"}})") == "response.set_body_base64: not base64");
  CHECK(err(R"({"response":{"body_replacements":[{"find":1}]}})")
            .starts_with("response.body_replacements"));

  auto ok = parseHookAnswer(
      R"({"action":"mutate","error":"","request":{"headers":{"X-A":["1","2"],"Host":"evil.test",)"
      R"("Content-Length":"999"},"query":{"q":"a b"},"path":"/v2"},)"
      R"("response":{"headers":null,"body_replacements":[{"find":"x","replace":"y"},{"find":""}],)"
      R"("set_body_base64":"aGVsbG8="}})");
  REQUIRE(ok);
  CHECK_FALSE(ok->block);
  CHECK(ok->request_headers->size() == 4);
  CHECK_FALSE(ok->response_headers);
  CHECK(ok->body_replacements == Pairs{{"x", "y"}});
  CHECK(ok->set_body == "hello");

  // Applied to a request: full header replacement, but Host and the framing stay the proxy's.
  auto h = request("POST", "/v1/chat?old=1");
  h.headers.push_back({"Content-Length", "5"});
  CHECK_FALSE(applyBeforeAnswer(*ok, &h));
  CHECK(h.find("host") == "api.test");
  CHECK(h.count("host") == 1);
  CHECK(h.find("content-length") == "5");
  CHECK_FALSE(h.find("user-agent"));
  CHECK(h.count("x-a") == 2);
  CHECK(h.target == "/v2?q=a%20b");
  // Query keys are not header names: anything goes, percent-encoded.
  auto q = parseHookAnswer(R"({"request":{"query":{"page[size]":"10","a b":["x"]}}})");
  REQUIRE(q);
  auto qh = request("GET", "/list?old=1");
  CHECK_FALSE(applyBeforeAnswer(*q, &qh));
  CHECK(qh.target == "/list?a%20b=x&page%5Bsize%5D=10");
  auto blocked = parseHookAnswer(R"({"action":"block"})");
  REQUIRE(blocked);
  CHECK(applyBeforeAnswer(*blocked, &h));
}

TEST_CASE("intercept: an after-phase callback sees the response and may replace the body",
          "[net][intercept][callback]") {
  HttpRule cb;
  cb.phase = HttpRule::Phase::After;
  cb.callback_id = "resp";
  cb.body_replacements = {{"a", "b"}};
  auto rules = HttpRules::compile({cb}, "/s");
  CHECK(rules->hasAfterCallbacks());
  http::Head resp;
  resp.status = 201;
  resp.headers = {{"content-type", "text/event-stream"}, {"Transfer-Encoding", "chunked"}};
  BodyPlan plan;
  size_t cursor = 0;
  auto req = request("GET", "/events?x=1");
  RuleStep step = rules->after("api.test", req, &resp, &plan, &cursor);
  REQUIRE(step.call);
  CHECK(step.call->request["phase"] == "after");
  CHECK(step.call->request["status_code"] == 201);
  CHECK(step.call->request["is_sse"] == true);
  CHECK(step.call->request["path"] == "/events");
  CHECK(step.call->request["request_headers"]["User-Agent"] == nlohmann::json({"curl"}));
  CHECK(step.call->request["response_headers"]["Content-Type"] ==
        nlohmann::json({"text/event-stream"}));
  auto a = parseHookAnswer(
      R"({"response":{"headers":{"X-New":"1","Transfer-Encoding":"identity"},)"
      R"("body_replacements":[{"find":"c","replace":"d"}],"set_body_base64":"Ym9keQ=="}})");
  REQUIRE(a);
  CHECK_FALSE(applyAfterAnswer(*a, &resp, &plan));
  CHECK(resp.find("x-new") == "1");
  CHECK(resp.find("transfer-encoding") == "chunked");  // framing stays upstream's
  CHECK_FALSE(resp.find("content-type"));
  CHECK(plan.replacements == Pairs{{"a", "b"}, {"c", "d"}});
  CHECK(plan.set_body == "body");
  CHECK_FALSE(rules->after("api.test", req, &resp, &plan, &cursor).call);
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
  // Callback answers: mutated from a valid one, byte by byte.
  const std::string seed =
      R"({"action":"mutate","request":{"headers":{"A":["1"]},"query":{"q":"v"},"path":"/p"},)"
      R"("response":{"headers":{"B":"2"},"body_replacements":[{"find":"x","replace":"y"}],)"
      R"("set_body_base64":"aGk="}})";
  REQUIRE(parseHookAnswer(seed));
  const std::string json_bytes = "{}[]\":,0123456789abcnulltrue \\\r\n/";
  for (int i = 0; i < 3000; ++i) {
    std::string s = seed;
    for (unsigned k = 0; k < 1 + rng() % 4; ++k) {
      s[rng() % s.size()] = json_bytes[rng() % json_bytes.size()];
    }
    auto a = parseHookAnswer(s);
    if (a) {
      auto h = request("GET", "/x");
      (void)applyBeforeAnswer(*a, &h);
      CHECK(h.count("host") == 1);
      http::Head resp;
      BodyPlan plan;
      (void)applyAfterAnswer(*a, &resp, &plan);
    }
  }
}
