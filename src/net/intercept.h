// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"
#include "net/http.h"
#include "spec/model.h"

namespace matchlock::net {

/// One HTTP interception rule (spec::HttpRule: the spec's network.interception.rules).
using HttpRule = spec::HttpRule;

nlohmann::json toJson(const std::vector<HttpRule>& rules);
/// The vm.json / control-socket form (what toJson writes); errors name the rule and field.
Result<std::vector<HttpRule>> httpRulesFromJson(const nlohmann::json& j);

/// Go `path.Match` semantics on a URL path: `*` matches any run of non-'/' bytes, `?` one non-'/'
/// byte, `[...]` a class (ranges, `^` or `!` negation), `\` escapes. A malformed pattern matches
/// nothing.
bool matchPathGlob(std::string_view pattern, std::string_view path);

/// What the after phase asks of a response body.
struct BodyPlan {
  bool blocked = false;
  std::string blocked_by;  ///< the rule's name
  std::vector<std::pair<std::string, std::string>> replacements;
};

/// The rules of one sandbox, compiled (immutable; shared by the proxy's requests).
class HttpRules {
 public:
  /// Drops rules that neither block nor change anything; `allow` with changes becomes mutate.
  static std::shared_ptr<const HttpRules> compile(std::vector<HttpRule> rules);
  bool empty() const { return rules_.empty(); }

  /// Before phase on a request to `host`: every matching rule in order; a block stops. Returns
  /// the name of the blocking rule ("" when not blocked); `head` is mutated in place.
  std::string before(std::string_view host, http::Head* head) const;
  /// After phase on the response to (method, path) at `host`: header changes applied to `head`;
  /// block and body replacements returned for the caller to carry out.
  BodyPlan after(std::string_view host, std::string_view method, std::string_view path,
                 http::Head* head) const;

 private:
  bool matches(const HttpRule& r, std::string_view host, std::string_view method,
               std::string_view path) const;
  std::vector<HttpRule> rules_;
};

/// Applies literal find → replace pairs, in order, to a whole body.
std::string replaceAll(std::string body,
                       const std::vector<std::pair<std::string, std::string>>& replacements);

/// Streams a `text/event-stream` body through the replacements: only the payload of `data:`
/// lines is changed; line framing (LF, CRLF, CR) is kept. feed() returns what can be sent now
/// (complete lines); finish() the rest. Bounded: a line longer than kMaxLine passes unchanged.
class SseRewriter {
 public:
  static constexpr size_t kMaxLine = size_t{1} << 20;
  explicit SseRewriter(std::vector<std::pair<std::string, std::string>> replacements)
      : replacements_(std::move(replacements)) {}
  std::string feed(std::string_view data);
  std::string finish();

 private:
  std::string line(std::string_view text) const;
  std::vector<std::pair<std::string, std::string>> replacements_;
  std::string pending_;
  bool pending_cr_ = false;
};

/// Decodes a chunked transfer coding incrementally (sans-I/O): feed() returns the body bytes in
/// `data`; done() after the last chunk and trailers; failed() on malformed input.
class ChunkedDecoder {
 public:
  std::string feed(std::string_view data, size_t* consumed);
  bool done() const { return state_ == State::Done; }
  bool failed() const { return state_ == State::Failed; }

 private:
  enum class State { Size, SizeLf, Data, DataCr, DataLf, Trailer, Done, Failed };
  State state_ = State::Size;
  uint64_t remaining_ = 0;
  std::string line_;
};

}  // namespace matchlock::net
