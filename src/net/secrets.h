// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/result.h"
#include "net/http.h"
#include "spec/model.h"

namespace matchlock::net {

/// A secret with its real value, held by the host process only. The value's bytes are wiped
/// when a Secret is destroyed or moved from.
struct Secret {
  std::string name;
  std::string placeholder;         ///< SANDBOX_SECRET_<32 lower-case hex>
  std::string value;               ///< never logged, never in events or errors
  std::vector<std::string> hosts;  ///< host patterns; empty = any host (upstream's RPC semantics)

  Secret() = default;
  Secret(std::string name_in, std::string placeholder_in, std::string value_in,
         std::vector<std::string> hosts_in)
      : name(std::move(name_in)),
        placeholder(std::move(placeholder_in)),
        value(std::move(value_in)),
        hosts(std::move(hosts_in)) {}
  Secret(const Secret&) = default;
  Secret& operator=(const Secret&) = default;
  Secret(Secret&& other) noexcept;
  Secret& operator=(Secret&& other) noexcept;
  ~Secret();
};

/// A fresh upstream-style placeholder: "SANDBOX_SECRET_" + 32 lower-case hex characters.
std::string generatePlaceholder();

/// Reads the value of `ref` (env var, file, command output with one trailing newline removed, or
/// inline) and assigns a placeholder when the reference has none. Errors never contain the value.
Result<Secret> loadSecret(const spec::SecretRef& ref);

/// Outcome of applying secrets to one request.
struct SubstitutionResult {
  bool blocked = false;
  std::string reason;       ///< upstream's "secret placeholder sent to unauthorized host"
  std::string secret_name;  ///< which secret leaked (name only)
  int replaced = 0;         ///< number of placeholder occurrences replaced
};

/// The secrets of one sandbox.
class SecretSet {
 public:
  SecretSet() = default;
  explicit SecretSet(std::vector<Secret> secrets) : secrets_(std::move(secrets)) {}

  /// Upstream's rule: for each secret whose placeholder appears in a header value or the request
  /// target, if `host` is allowed for the secret the placeholder is replaced by the value in all
  /// header values and, percent-encoded, in the query string (never the path or the body);
  /// otherwise the request is blocked. `head` is modified only when the request is not blocked.
  SubstitutionResult apply(http::Head* head, std::string_view host) const;

  /// Replaces every real secret value in `text` with "[REDACTED:<name>]".
  std::string redact(std::string_view text) const;

  bool empty() const { return secrets_.empty(); }
  const std::vector<Secret>& secrets() const { return secrets_; }

 private:
  std::vector<Secret> secrets_;
};

}  // namespace matchlock::net
