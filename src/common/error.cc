// SPDX-License-Identifier: Apache-2.0
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/result.h"

namespace matchlock {

std::string_view errcName(Errc code) {
  switch (code) {
    case Errc::InvalidSpec:
      return "invalid_spec";
    case Errc::NotFound:
      return "not_found";
    case Errc::Conflict:
      return "conflict";
    case Errc::Unavailable:
      return "unavailable";
    case Errc::PermissionDenied:
      return "permission_denied";
    case Errc::Protocol:
      return "protocol";
    case Errc::System:
      return "system";
    case Errc::Internal:
      return "internal";
  }
  return "internal";
}

int exitCodeFor(Errc code) {
  // sysexits.h values; 1 stays free for "a command failed" and 2 for "changes pending" (plan).
  switch (code) {
    case Errc::InvalidSpec:
      return 65;  // EX_DATAERR
    case Errc::NotFound:
      return 66;  // EX_NOINPUT
    case Errc::Conflict:
      return 73;  // EX_CANTCREAT
    case Errc::Unavailable:
      return 75;  // EX_TEMPFAIL
    case Errc::PermissionDenied:
      return 77;  // EX_NOPERM
    case Errc::Protocol:
      return 76;  // EX_PROTOCOL
    case Errc::System:
      return 71;  // EX_OSERR
    case Errc::Internal:
      return 70;  // EX_SOFTWARE
  }
  return 70;
}

Error Error::withContext(std::string_view context) && {
  message_ = fmt::format("{}: {}", context, message_);
  return std::move(*this);
}

Error Error::withContext(std::string_view context) const& {
  Error copy = *this;
  return std::move(copy).withContext(context);
}

std::string Error::toString() const {
  if (sys_errno_ != 0) {
    return fmt::format("{}: {}", message_, std::strerror(sys_errno_));
  }
  return message_;
}

namespace internal {
void checkFailed(const char* cond, std::string_view msg, const char* file, int line) {
  std::fprintf(stderr, "matchlock: check failed at %s:%d: %s: %.*s\n", file, line, cond,
               static_cast<int>(msg.size()), msg.data());
  std::abort();
}
}  // namespace internal

}  // namespace matchlock
