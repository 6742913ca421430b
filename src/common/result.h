// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <tl/expected.hpp>

namespace matchlock {

/// Error categories. The category decides retry behaviour in the reconciler, the CLI exit code and
/// the JSON-RPC error code; see docs/error-handling.md.
enum class Errc {
  InvalidSpec,       ///< bad user input: never retried
  NotFound,          ///< a named thing does not exist
  Conflict,          ///< exists already / state does not allow the operation
  Unavailable,       ///< transient: retry with backoff
  PermissionDenied,  ///< missing privilege or capability
  Protocol,          ///< a peer (guest, registry, client) broke its wire protocol
  System,            ///< a system call failed (errno attached)
  Internal,          ///< a bug: invariant broken
};

/// Returns a stable lower-case name ("invalid_spec", ...).
std::string_view errcName(Errc code);

/// sysexits-style process exit code for an error category.
int exitCodeFor(Errc code);

/// An error value: category, optional errno captured at the failure site, a message, and optional
/// detail lines (e.g. one line per spec diagnostic).
class Error {
 public:
  Error(Errc code, std::string message, int sys_errno = 0)
      : code_(code), sys_errno_(sys_errno), message_(std::move(message)) {}

  Errc code() const { return code_; }
  int sysErrno() const { return sys_errno_; }
  const std::string& message() const { return message_; }
  const std::vector<std::string>& details() const { return details_; }

  /// Prepends context: "starting vm 'x': <message>".
  Error withContext(std::string_view context) &&;
  Error withContext(std::string_view context) const&;
  Error&& addDetail(std::string detail) && {
    details_.push_back(std::move(detail));
    return std::move(*this);
  }
  void addDetail(std::string detail) & { details_.push_back(std::move(detail)); }

  /// Message plus ": strerror(errno)" when errno is set.
  std::string toString() const;

 private:
  Errc code_;
  int sys_errno_;
  std::string message_;
  std::vector<std::string> details_;
};

template <class T>
using Result = tl::expected<T, Error>;
using Status = Result<void>;

inline tl::unexpected<Error> makeError(Errc code, std::string message, int sys_errno = 0) {
  return tl::unexpected<Error>(Error(code, std::move(message), sys_errno));
}
inline tl::unexpected<Error> makeError(Error error) {
  return tl::unexpected<Error>(std::move(error));
}
inline Status ok() {
  return {};
}

}  // namespace matchlock

// NOLINTBEGIN(bugprone-macro-parentheses)
#define ML_INTERNAL_CONCAT2(a, b) a##b
#define ML_INTERNAL_CONCAT(a, b) ML_INTERNAL_CONCAT2(a, b)

/// Returns the error of `expr` (a Result or Status) from the enclosing function.
#define ML_RETURN_IF_ERROR(expr)                                       \
  do {                                                                 \
    auto ml_internal_status_ = (expr);                                 \
    if (!ml_internal_status_.has_value()) {                            \
      return ::tl::unexpected(std::move(ml_internal_status_).error()); \
    }                                                                  \
  } while (false)

#define ML_INTERNAL_ASSIGN_OR_RETURN(tmp, decl, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.has_value()) {                             \
    return ::tl::unexpected(std::move(tmp).error());  \
  }                                                   \
  decl = std::move(tmp).value()

/// `ML_ASSIGN_OR_RETURN(auto x, f())`: binds the value or returns the error.
#define ML_ASSIGN_OR_RETURN(decl, expr) \
  ML_INTERNAL_ASSIGN_OR_RETURN(ML_INTERNAL_CONCAT(ml_internal_result_, __LINE__), decl, expr)
// NOLINTEND(bugprone-macro-parentheses)

/// Always-on invariant check: logs and aborts. Never use it on external input.
#define ML_CHECK(cond, msg)                                               \
  do {                                                                    \
    if (!(cond)) {                                                        \
      ::matchlock::internal::checkFailed(#cond, msg, __FILE__, __LINE__); \
    }                                                                     \
  } while (false)

#ifdef NDEBUG
#define ML_DCHECK(cond, msg) \
  do {                       \
  } while (false)
#else
#define ML_DCHECK(cond, msg) ML_CHECK(cond, msg)
#endif

namespace matchlock::internal {
[[noreturn]] void checkFailed(const char* cond, std::string_view msg, const char* file, int line);
}  // namespace matchlock::internal
