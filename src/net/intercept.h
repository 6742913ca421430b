// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <optional>
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
  std::optional<std::string> set_body;  ///< a callback replaced the whole body
};

/// One call to the SDK's callback socket that a matching rule asks for (reference §4.8).
struct HookCall {
  std::string rule;    ///< the rule's name, or its callback id, for logs
  std::string socket;  ///< the Unix socket to call
  std::chrono::milliseconds timeout{0};
  nlohmann::json request;  ///< the NetworkHookCallbackRequest
};

/// Where one phase's evaluation stopped: at the end, at a block, or at a callback rule.
struct RuleStep {
  std::string blocked_by;        ///< non-empty: a rule blocked (its name)
  std::optional<HookCall> call;  ///< set: paused at a callback; resume with the same cursor
};

/// The SDK's answer to a HookCall, validated whole before anything is applied.
struct HookAnswer {
  bool block = false;
  std::optional<std::vector<http::Header>> request_headers;               ///< full replacement
  std::optional<std::vector<std::pair<std::string, std::string>>> query;  ///< full replacement
  std::optional<std::string> path;
  std::optional<std::vector<http::Header>> response_headers;  ///< full replacement
  std::vector<std::pair<std::string, std::string>> body_replacements;
  std::optional<std::string> set_body;  ///< decoded from set_body_base64
};

/// Parses one answer (untrusted bytes: fuzzed). An `error` string, malformed JSON or a field of
/// the wrong shape is an error; the caller then skips the rule (fail-open, as upstream).
Result<HookAnswer> parseHookAnswer(std::string_view bytes);

/// Applies a before-phase answer to the request; true when it blocks. The Host header and the
/// framing headers (Content-Length, Transfer-Encoding) stay the proxy's: the decision and the
/// body relay were made for them.
bool applyBeforeAnswer(const HookAnswer& a, http::Head* request);
/// Applies an after-phase answer; true when it blocks. Framing headers stay upstream's.
bool applyAfterAnswer(const HookAnswer& a, http::Head* response, BodyPlan* plan);

/// The rules of one sandbox, compiled (immutable; shared by the proxy's requests).
class HttpRules {
 public:
  /// Drops rules that neither block, change anything nor call back; `allow` with changes
  /// becomes mutate. Callback rules keep their callback only with a `callback_socket`.
  static std::shared_ptr<const HttpRules> compile(std::vector<HttpRule> rules,
                                                  std::string callback_socket = "");
  bool empty() const { return rules_.empty(); }
  const std::string& callbackSocket() const { return callback_socket_; }
  /// Whether a response may need its request's headers (an after-phase callback exists).
  bool hasAfterCallbacks() const { return after_callbacks_; }

  /// Before phase on a request to `host` from rule `*cursor` on: every matching rule in order
  /// until a block or a callback rule; `head` is mutated in place. Start with *cursor = 0.
  RuleStep before(std::string_view host, http::Head* head, size_t* cursor) const;
  /// After phase on the response to `request` (method, target, headers as the guest sent them)
  /// at `host`: header changes applied to `response`, block and body changes gathered in `plan`.
  RuleStep after(std::string_view host, const http::Head& request, http::Head* response,
                 BodyPlan* plan, size_t* cursor) const;

 private:
  bool matches(const HttpRule& r, std::string_view host, std::string_view method,
               std::string_view path) const;
  std::vector<HttpRule> rules_;
  std::string callback_socket_;
  bool after_callbacks_ = false;
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
