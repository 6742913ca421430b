// SPDX-License-Identifier: Apache-2.0
#include <openssl/x509v3.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "common/event_log.h"
#include "common/fd.h"
#include "net/dns.h"
#include "net/events.h"
#include "net/http.h"
#include "net/policy.h"
#include "net/secrets.h"
#include "net/tls.h"

namespace http = matchlock::net::http;
using matchlock::net::matchHostPattern;
using matchlock::net::Policy;
using matchlock::net::PolicyConfig;
using matchlock::net::PolicyStore;

TEST_CASE("host pattern table", "[policy]") {
  struct Row {
    const char* pattern;
    const char* host;
    bool match;
  };
  const Row rows[] = {
      {"*", "anything.example", true},
      {"example.com", "example.com", true},
      {"example.com", "EXAMPLE.com", true},
      {"Example.COM", "example.com:443", true},
      {"example.com", "example.com.", true},
      {"example.com", "www.example.com", false},
      {"*.example.com", "api.example.com", true},
      {"*.example.com", "a.b.example.com", true},
      {"*.example.com", "example.com", false},
      {"*.example.com", "badexample.com", false},
      {"*.example.com", ".example.com", false},
      {"api.*", "api.example.com", true},
      {"api.*", "api", false},
      {"api.*", "xapi.example.com", false},
      {"a*c", "abc", true},
      {"a*c", "ac", true},
      {"a*b*c", "axxbyyc", true},
      {"a*b*c", "axxyyc", false},
      {"a*b*c", "abc", true},
      {"", "example.com", false},
      {"example.com", "", false},
  };
  for (const Row& r : rows) {
    INFO(r.pattern << " vs " << r.host);
    CHECK(matchHostPattern(r.pattern, r.host) == r.match);
  }
}

TEST_CASE("blocked ranges table", "[policy]") {
  struct Row {
    const char* ip;
    const char* range;
  };
  const Row rows[] = {
      {"10.1.2.3", "private"},
      {"172.16.0.1", "private"},
      {"172.32.0.1", ""},
      {"192.168.1.1", "private"},
      {"127.0.0.1", "loopback"},
      {"169.254.169.254", "metadata"},
      {"169.254.1.1", "link-local"},
      {"100.64.0.1", "cgnat"},
      {"100.128.0.1", ""},
      {"0.0.0.0", "unspecified"},
      {"8.8.8.8", ""},
      {"198.51.100.10", ""},
      {"224.0.0.1", "multicast"},
      {"255.255.255.255", "broadcast"},
      {"::1", "loopback"},
      {"::", "unspecified"},
      {"fd00::1", "private"},
      {"fe80::1", "link-local"},
      {"::ffff:10.0.0.1", "private"},
      {"::ffff:8.8.8.8", ""},
      {"2001:db8::1", ""},
      {"fd00:ec2::254", "metadata"},
      {"not-an-ip", ""},
  };
  for (const Row& r : rows) {
    INFO(r.ip);
    CHECK(matchlock::net::blockedRange(r.ip) == r.range);
  }
}

TEST_CASE("policy decisions", "[policy]") {
  PolicyConfig cfg;
  cfg.allow_hosts = {"api.example.com", "*.svc.test", "10.9.0.0/16"};
  auto policy = Policy::compile(cfg);
  REQUIRE(policy.has_value());
  CHECK(policy->checkHost("api.example.com").allowed);
  CHECK(policy->checkHost("API.example.com:443").allowed);
  CHECK_FALSE(policy->checkHost("evil.com").allowed);
  CHECK(policy->checkHost("evil.com").reason == "host not in allowlist");
  CHECK(policy->checkHost("x.svc.test").allowed);
  CHECK_FALSE(policy->checkHost("svc.test").allowed);
  // IP literals must be on the list explicitly.
  CHECK_FALSE(policy->checkHost("8.8.8.8").allowed);
  CHECK(policy->checkHost("10.9.1.1").allowed);
  // Destinations: private blocked unless an IP/CIDR entry covers them.
  CHECK(policy->checkDestination("198.51.100.10").allowed);
  CHECK_FALSE(policy->checkDestination("10.1.1.1").allowed);
  CHECK(policy->checkDestination("10.9.3.3").allowed);
  CHECK_FALSE(policy->checkDestination("169.254.169.254").allowed);
  CHECK_FALSE(policy->checkRawTcp("198.51.100.10").allowed);
  CHECK(policy->checkRawTcp("10.9.3.3").allowed);

  PolicyConfig none;
  none.no_network = true;
  auto off = Policy::compile(none);
  REQUIRE(off.has_value());
  CHECK_FALSE(off->checkHost("example.com").allowed);

  PolicyConfig open;
  auto any = Policy::compile(open);
  REQUIRE(any.has_value());
  CHECK(any->checkHost("whatever.example").allowed);
  CHECK(any->checkRawTcp("198.51.100.1").allowed);
  CHECK_FALSE(any->checkRawTcp("127.0.0.1").allowed);

  PolicyConfig bad;
  bad.allow_hosts = {"10.0.0.0/40"};
  CHECK_FALSE(Policy::compile(bad).has_value());
}

TEST_CASE("policy store swaps snapshots", "[policy]") {
  PolicyConfig cfg;
  cfg.allow_hosts = {"a.test"};
  auto p = Policy::compile(cfg);
  REQUIRE(p.has_value());
  PolicyStore store(std::move(*p));
  auto before = store.snapshot();
  auto added = store.addHosts({" B.test ", "a.test", "b.test"});
  REQUIRE(added.has_value());
  CHECK(*added == std::vector<std::string>{"b.test"});
  CHECK(store.snapshot()->checkHost("b.test").allowed);
  CHECK_FALSE(before->checkHost("b.test").allowed);  // old snapshot is immutable
  auto removed = store.deleteHosts({"a.test", "zzz"});
  REQUIRE(removed.has_value());
  CHECK(*removed == std::vector<std::string>{"a.test"});
  CHECK_FALSE(store.snapshot()->checkHost("a.test").allowed);
}

TEST_CASE("request head parsing", "[http]") {
  http::Head head;
  std::string buf =
      "GET /a?x=1 HTTP/1.1\r\nHost: example.com\r\nX-A:  v  \r\n\r\n"
      "POST /b HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc"
      "GET /c HTTP/1.1\r\nHost: example.com\r\n\r\n";
  auto r = http::parseRequestHead(buf, &head);
  REQUIRE(r.state == http::ParseResult::State::Complete);
  CHECK(head.method == "GET");
  CHECK(head.path() == "/a");
  CHECK(head.query() == "x=1");
  CHECK(head.find("x-a").value() == "v");
  int err = 0;
  auto framer = http::requestFraming(head, &err);
  CHECK(err == 0);
  CHECK(framer.done());
  // Pipelined second request with a body, then a third.
  std::string_view rest = std::string_view(buf).substr(r.consumed);
  r = http::parseRequestHead(rest, &head);
  REQUIRE(r.state == http::ParseResult::State::Complete);
  CHECK(head.method == "POST");
  rest.remove_prefix(r.consumed);
  framer = http::requestFraming(head, &err);
  CHECK(framer.consume(rest) == 3);
  CHECK(framer.done());
  rest.remove_prefix(3);
  r = http::parseRequestHead(rest, &head);
  REQUIRE(r.state == http::ParseResult::State::Complete);
  CHECK(head.target == "/c");
  CHECK(r.consumed == rest.size());
  // Serialization round trip.
  std::string again = http::serializeRequestHead(head);
  http::Head head2;
  CHECK(http::parseRequestHead(again, &head2).state == http::ParseResult::State::Complete);
  CHECK(head2.target == "/c");
}

TEST_CASE("target authority and repeated headers", "[http]") {
  http::Head head;
  auto authority = [&](const char* target) {
    head.target = target;
    return head.targetAuthority();
  };
  CHECK(authority("http://other.test/abs") == std::optional<std::string_view>("other.test"));
  CHECK(authority("HTTPS://a.test:8443?q=1") == std::optional<std::string_view>("a.test:8443"));
  CHECK(authority("http://u:p@b.test/") == std::optional<std::string_view>("u:p@b.test"));
  CHECK(authority("http://") == std::optional<std::string_view>(""));
  CHECK_FALSE(authority("/path?x=http://c.test/"));
  CHECK_FALSE(authority("*"));
  CHECK_FALSE(authority("a.test:443"));  // CONNECT's authority-form
  CHECK_FALSE(authority("ht tp://x/"));
  head.headers = {{"Host", "a"}, {"host", "b"}, {"X", "c"}};
  CHECK(head.count("HOST") == 2);
  CHECK(head.count("x") == 1);
  CHECK(head.count("y") == 0);
}

TEST_CASE("request head errors", "[http]") {
  http::Head head;
  auto st = [&](const std::string& s) { return http::parseRequestHead(s, &head).error_status; };
  CHECK(http::parseRequestHead("GET / HTTP/1.1\r\nHost: a", &head).state ==
        http::ParseResult::State::Incomplete);
  CHECK(st("GET / HTTP/1.1\r\nHost : a\r\n\r\n") == 400);
  CHECK(st("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n") == 400);
  CHECK(st("GET / HTTP/2.0\r\n\r\n") == 505);
  CHECK(st("G(T / HTTP/1.1\r\n\r\n") == 400);
  CHECK(st("GET /\x01 HTTP/1.1\r\n\r\n") == 400);
  http::Limits small;
  small.max_head_bytes = 64;
  std::string big = "GET / HTTP/1.1\r\nX-Big: " + std::string(100, 'a') + "\r\n\r\n";
  CHECK(http::parseRequestHead(big, &head, small).error_status == 431);
  CHECK(http::parseRequestHead(big.substr(0, 80), &head, small).error_status == 431);
  std::string long_line = "GET /" + std::string(100, 'a');
  CHECK(http::parseRequestHead(long_line, &head, small).error_status == 414);
  // Smuggling: CL + TE, conflicting lengths, unknown coding.
  int err = 0;
  REQUIRE(http::parseRequestHead(
              "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", &head)
              .state == http::ParseResult::State::Complete);
  http::requestFraming(head, &err);
  CHECK(err == 400);
  REQUIRE(http::parseRequestHead(
              "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", &head)
              .state == http::ParseResult::State::Complete);
  http::requestFraming(head, &err);
  CHECK(err == 400);
  REQUIRE(
      http::parseRequestHead("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", &head).state ==
      http::ParseResult::State::Complete);
  http::requestFraming(head, &err);
  CHECK(err == 501);
}

TEST_CASE("chunked framing in arbitrary splits", "[http]") {
  const std::string body = "5;ext=1\r\nhello\r\n0a\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n";
  for (size_t step = 1; step <= body.size(); ++step) {
    auto f = http::BodyFramer::chunked();
    size_t total = 0;
    for (size_t off = 0; off < body.size() && !f.done(); off += step) {
      std::string_view piece = std::string_view(body).substr(off, step);
      size_t used = f.consume(piece);
      REQUIRE_FALSE(f.failed());
      total += used;
      if (used < piece.size()) {
        break;
      }
    }
    CHECK(f.done());
    CHECK(total == body.size());
  }
  auto f = http::BodyFramer::chunked();
  f.consume("zz\r\n");
  CHECK(f.failed());
  auto g = http::BodyFramer::chunked();
  CHECK(g.consume("3\r\nabc\r\n0\r\n\r\nNEXT") == 13);
  CHECK(g.done());
}

TEST_CASE("response heads and framing", "[http]") {
  http::Head head;
  auto r = http::parseResponseHead("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", &head);
  REQUIRE(r.state == http::ParseResult::State::Complete);
  CHECK(head.status == 200);
  int err = 0;
  CHECK(http::responseFraming(head, "GET", &err).mode() == http::BodyFramer::Mode::Length);
  CHECK(http::responseFraming(head, "HEAD", &err).mode() == http::BodyFramer::Mode::None);
  r = http::parseResponseHead("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n", &head);
  REQUIRE(r.state == http::ParseResult::State::Complete);
  CHECK(http::responseFraming(head, "GET", &err).mode() == http::BodyFramer::Mode::UntilClose);
  r = http::parseResponseHead("HTTP/1.1 204\r\n\r\n", &head);
  REQUIRE(r.state == http::ParseResult::State::Complete);
  CHECK(head.status == 204);
  CHECK(http::parseResponseHead("HTTP/1.1 2x0 OK\r\n\r\n", &head).state ==
        http::ParseResult::State::Error);
}

TEST_CASE("ClientHello extension parsers read only what the guest sent", "[tls]") {
  auto bytes = [](std::string_view s) { return reinterpret_cast<const unsigned char*>(s.data()); };
  std::string sni(
      "\x00\x12\x00\x00\x0f"
      "api.example.com",
      20);
  CHECK(matchlock::net::serverNameFromExtension(bytes(sni), sni.size()) == "api.example.com");
  for (size_t cut = 0; cut < sni.size(); ++cut) {
    CHECK(matchlock::net::serverNameFromExtension(bytes(sni), cut).empty());
  }
  std::string wrong_type = sni;
  wrong_type[2] = 1;
  CHECK(matchlock::net::serverNameFromExtension(bytes(wrong_type), sni.size()).empty());
  std::string alpn("\x00\x0c\x02h2\x08http/1.1", 14);
  CHECK(matchlock::net::alpnListHas(bytes(alpn), alpn.size(), "h2"));
  CHECK(matchlock::net::alpnListHas(bytes(alpn), alpn.size(), "http/1.1"));
  CHECK_FALSE(matchlock::net::alpnListHas(bytes(alpn), alpn.size() - 1, "http/1.1"));
  CHECK_FALSE(matchlock::net::alpnListHas(bytes(alpn), alpn.size(), "h3"));
  CHECK(matchlock::net::isValidServerName("a-b_c.example"));
  CHECK_FALSE(matchlock::net::isValidServerName("a.example/x"));
  CHECK_FALSE(matchlock::net::isValidServerName(std::string(254, 'a')));
}

TEST_CASE("CA and leaf minting", "[tls]") {
  auto ca = matchlock::net::CertAuthority::generate();
  REQUIRE(ca.has_value());
  std::string pem = (*ca)->certPem();
  CHECK(pem.starts_with("-----BEGIN CERTIFICATE-----"));
  auto leaf = (*ca)->leafFor("API.Example.com");
  REQUIRE(leaf.has_value());
  auto again = (*ca)->leafFor("api.example.com");
  REQUIRE(again.has_value());
  CHECK(leaf->get() == again->get());
  CHECK((*ca)->cacheSize() == 1);
  X509* cert = (*leaf)->cert.get();
  CHECK(X509_check_host(cert, "api.example.com", 0, 0, nullptr) == 1);
  CHECK(X509_check_host(cert, "other.example.com", 0, 0, nullptr) == 0);
  // Chains to the CA.
  matchlock::CPtr<X509_STORE, &X509_STORE_free> store(X509_STORE_new());
  X509_STORE_add_cert(store.get(), (*ca)->caCert());
  matchlock::CPtr<X509_STORE_CTX, &X509_STORE_CTX_free> ctx(X509_STORE_CTX_new());
  REQUIRE(X509_STORE_CTX_init(ctx.get(), store.get(), cert, nullptr) == 1);
  X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_SERVER);
  CHECK(X509_verify_cert(ctx.get()) == 1);
  auto ip_leaf = (*ca)->leafFor("198.51.100.7");
  REQUIRE(ip_leaf.has_value());
  CHECK(X509_check_ip_asc((*ip_leaf)->cert.get(), "198.51.100.7", 0) == 1);
  CHECK_FALSE((*ca)->leafFor("bad name").has_value());
}

TEST_CASE("secret substitution and redaction", "[secrets]") {
  matchlock::net::Secret s;
  s.name = "API_KEY";
  s.placeholder = matchlock::net::generatePlaceholder();
  s.value = "real-value-123";
  s.hosts = {"api.example.com"};
  CHECK(s.placeholder.size() == std::string("SANDBOX_SECRET_").size() + 32);
  matchlock::net::SecretSet set({s});

  http::Head head;
  head.method = "GET";
  head.target = "/p/" + s.placeholder + "?k=" + s.placeholder;
  head.headers = {{"Authorization", "Bearer " + s.placeholder}, {"Host", "api.example.com"}};
  http::Head copy = head;
  auto r = set.apply(&head, "api.example.com");
  CHECK_FALSE(r.blocked);
  CHECK(r.replaced == 2);
  CHECK(head.find("authorization").value() == "Bearer real-value-123");
  CHECK(head.target == "/p/" + s.placeholder + "?k=real-value-123");  // path untouched

  auto blocked = set.apply(&copy, "evil.example.com");
  CHECK(blocked.blocked);
  CHECK(blocked.reason == "secret placeholder sent to unauthorized host");
  CHECK(copy.find("authorization").value() == "Bearer " + s.placeholder);  // untouched

  CHECK(set.redact("token=real-value-123;") == "token=[REDACTED:API_KEY];");

  matchlock::net::Secret odd = s;
  odd.value = "a+b&c d";
  matchlock::net::SecretSet odd_set({odd});
  http::Head q;
  q.method = "GET";
  q.target = "/?k=" + s.placeholder;
  q.headers = {{"X-K", s.placeholder}};
  CHECK_FALSE(odd_set.apply(&q, "api.example.com").blocked);
  CHECK(q.target == "/?k=a%2Bb%26c%20d");
  CHECK(q.find("x-k").value() == "a+b&c d");

  matchlock::spec::SecretRef ref;
  ref.name = "FROM_ENV";
  ref.env_var = "ML_NET_TEST_SECRET";
  ref.hosts = {"*.example.com"};
  ::setenv("ML_NET_TEST_SECRET", "v1", 1);
  auto loaded = matchlock::net::loadSecret(ref);
  REQUIRE(loaded.has_value());
  CHECK(loaded->value == "v1");
  ref.kind = matchlock::spec::SecretRef::Kind::Command;
  ref.command = {"printf", "from-cmd\\n"};
  loaded = matchlock::net::loadSecret(ref);
  REQUIRE(loaded.has_value());
  CHECK(loaded->value == "from-cmd");
  ::setenv("ML_NET_TEST_SECRET", "bad\r\nX: y", 1);
  ref.kind = matchlock::spec::SecretRef::Kind::Env;
  auto bad = matchlock::net::loadSecret(ref);
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().message().find("bad") == std::string::npos);
}

TEST_CASE("DNS question parsing and pins", "[dns]") {
  // id 0x1234, RD, 1 question: allowed.test A IN
  const std::string q(
      "\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
      "\x07"
      "allowed"
      "\x04"
      "test\x00\x00\x01\x00\x01",
      30);
  uint16_t qtype = 0;
  size_t end = 0;
  CHECK(matchlock::net::dnsQuestionName(q, &qtype, &end) == "allowed.test");
  CHECK(qtype == 1);
  CHECK(end == q.size());
  CHECK(matchlock::net::dnsQuestionName(q.substr(0, 20), &qtype, &end).empty());
  std::string compressed = q.substr(0, 12) + std::string("\xc0\x0c\x00\x01\x00\x01", 6);
  CHECK(matchlock::net::dnsQuestionName(compressed, &qtype, &end).empty());

  // The answer section: a CNAME (skipped), an A and an AAAA record, names compressed.
  std::string resp = q;
  resp[2] = '\x81';
  resp[7] = 3;
  resp += std::string("\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x02\xc0\x0c", 14);
  resp += std::string("\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\xc6\x33\x64\x0a", 16);
  resp += std::string("\xc0\x0c\x00\x1c\x00\x01\x00\x00\x00\x1e\x00\x10", 12) +
          std::string(15, '\0') + "\x01";
  auto answers = matchlock::net::dnsAnswerAddresses(resp, end);
  REQUIRE(answers.size() == 2);
  CHECK(answers[0].ip == "198.51.100.10");
  CHECK(answers[0].ttl == 300);
  CHECK(answers[1].ip == "::1");
  // Truncated anywhere: the records that arrived whole, never a read past the end.
  for (size_t cut = 0; cut < resp.size(); ++cut) {
    CHECK(matchlock::net::dnsAnswerAddresses(resp.substr(0, cut), end).size() <= 2);
  }

  matchlock::net::DnsPins pins;
  pins.pin("Allowed.Test.", "198.51.100.10", std::chrono::seconds(1));
  CHECK(pins.allows("allowed.test", "198.51.100.10"));
  CHECK_FALSE(pins.allows("allowed.test", "198.51.100.11"));
  CHECK_FALSE(pins.allows("other.test", "198.51.100.10"));
  CHECK(pins.namesFor("198.51.100.10") == std::vector<std::string>{"allowed.test"});
  CHECK(pins.namesFor("198.51.100.99").empty());
}

TEST_CASE("network events use upstream's notification shape", "[events]") {
  matchlock::net::NetworkEvent e;
  e.timestamp = 1700000000;
  e.method = "GET";
  e.url = "https://a.test/x";
  e.host = "a.test";
  e.path = "/x";
  e.status_code = 403;
  e.blocked = true;
  e.block_reason = "host not in allowlist";
  auto j = nlohmann::json::parse(matchlock::net::toJsonLine(e));
  CHECK(j["type"] == "network");
  CHECK(j["timestamp"] == 1700000000);
  CHECK(j["network"]["status_code"] == 403);
  CHECK(j["network"]["blocked"] == true);
  CHECK(j["network"]["block_reason"] == "host not in allowlist");
  e.path = "/\xff";
  CHECK_NOTHROW(nlohmann::json::parse(matchlock::net::toJsonLine(e)));
}

TEST_CASE("the event log rotates at its bound and keeps one older file", "[events]") {
  char dir_template[] = "/tmp/ml-events-XXXXXX";
  REQUIRE(::mkdtemp(dir_template) != nullptr);
  const std::string dir = dir_template;
  const std::string path = dir + "/e.jsonl";
  matchlock::net::NetworkEvent e;
  e.method = "GET";
  e.host = "allowed.test";
  e.url = "https://allowed.test/x";
  const size_t line = matchlock::net::toJsonLine(e).size() + 1;
  auto log = matchlock::EventLog::open(path, line * 3);
  REQUIRE(log);
  for (int i = 0; i < 10; ++i) {
    (*log)->append(matchlock::net::toJsonLine(e));
  }
  auto current = matchlock::readFile(path);
  auto older = matchlock::readFile(path + ".1");
  REQUIRE(current);
  REQUIRE(older);
  CHECK(current->size() <= line * 3);
  CHECK(older->size() == line * 3);
  CHECK(current->size() == line * (10 % 3));
  // Reopening continues the current file's size instead of starting from zero.
  auto again = matchlock::EventLog::open(path, line * 3);
  REQUIRE(again);
  for (int i = 0; i < 3; ++i) {
    (*again)->append(matchlock::net::toJsonLine(e));
  }
  CHECK(matchlock::readFile(path)->size() == line);  // 1 + 2 filled it, the third rotated
  std::filesystem::remove_all(dir);
}
