// SPDX-License-Identifier: Apache-2.0
// The proxy's HTTP/1 parser on bytes from the guest (requests) and from an upstream
// (responses): heads, body framing (chunked included, fed in pieces), and the secret
// substitution that runs on every parsed request. Properties: a parsed head serializes to a
// head that parses to the same thing; a placeholder is never replaced for a host that is not
// allowed, and no secret value appears unless the request was allowed to carry it.
#include "net/http.h"

#include <string>

#include "fuzz_check.h"
#include "net/secrets.h"

namespace http = matchlock::net::http;
using matchlock::net::Secret;
using matchlock::net::SecretSet;

namespace {

constexpr std::string_view kPlaceholder = "SANDBOX_SECRET_0123456789abcdef0123456789abcdef";
constexpr std::string_view kValue = "fuzz-secret-value-7f3a";

const SecretSet& secrets() {
  static const SecretSet set(
      {Secret{"TOKEN", std::string(kPlaceholder), std::string(kValue), {"api.example.com"}}});
  return set;
}

bool sameHead(const http::Head& a, const http::Head& b) {
  if (a.method != b.method || a.target != b.target || a.status != b.status ||
      a.reason != b.reason || a.minor_version != b.minor_version ||
      a.headers.size() != b.headers.size()) {
    return false;
  }
  for (size_t i = 0; i < a.headers.size(); ++i) {
    if (a.headers[i].name != b.headers[i].name || a.headers[i].value != b.headers[i].value) {
      return false;
    }
  }
  return true;
}

void frameBody(http::BodyFramer framer, std::string_view rest, size_t piece) {
  while (!rest.empty() && !framer.done() && !framer.failed()) {
    std::string_view chunk = rest.substr(0, piece);
    size_t n = framer.consume(chunk);
    FUZZ_CHECK(n <= chunk.size());
    if (n == 0 && !framer.done()) {
      FUZZ_CHECK(framer.failed() || chunk.empty());
      return;
    }
    rest.remove_prefix(n);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Cursor in(fuzz::asView(data, size));
  uint8_t mode = in.byte();
  size_t piece = (mode >> 2) + 1U;
  std::string_view buf = in.rest();
  http::Head head;
  bool response = (mode & 1) != 0;
  http::ParseResult r =
      response ? http::parseResponseHead(buf, &head) : http::parseRequestHead(buf, &head);
  if (r.state != http::ParseResult::State::Complete) {
    FUZZ_CHECK(r.state != http::ParseResult::State::Error || r.error_status >= 400);
    return 0;
  }
  FUZZ_CHECK(r.consumed <= buf.size());
  // Round trip.
  std::string again =
      response ? http::serializeResponseHead(head) : http::serializeRequestHead(head);
  http::Head reparsed;
  http::ParseResult r2 = response ? http::parseResponseHead(again, &reparsed)
                                  : http::parseRequestHead(again, &reparsed);
  FUZZ_CHECK(r2.state == http::ParseResult::State::Complete && r2.consumed == again.size());
  FUZZ_CHECK(sameHead(head, reparsed));
  (void)head.targetAuthority();
  (void)head.path();
  (void)head.query();

  int error_status = 0;
  http::BodyFramer framer = response ? http::responseFraming(head, "GET", &error_status)
                                     : http::requestFraming(head, &error_status);
  if (error_status == 0) {
    frameBody(framer, buf.substr(r.consumed), piece);
  }
  if (!response) {
    bool had_placeholder = again.find(kPlaceholder) != std::string::npos;
    std::string_view host = (mode & 2) != 0 ? "api.example.com" : "evil.example.com";
    http::Head substituted = head;
    auto s = secrets().apply(&substituted, host);
    std::string out = http::serializeRequestHead(substituted);
    bool leaked = out.find(kValue) != std::string::npos && again.find(kValue) == std::string::npos;
    if (host != "api.example.com") {
      FUZZ_CHECK(!leaked);
      FUZZ_CHECK(!had_placeholder || s.blocked || s.replaced == 0);
    }
    if (s.blocked) {
      FUZZ_CHECK(sameHead(substituted, head));
    }
  }
  return 0;
}
