// SPDX-License-Identifier: Apache-2.0
#include "cli/output.h"

#include <fmt/format.h>

#include <cstdio>

namespace matchlock::cli {

int reportError(const Error& error) {
  if (!error.details().empty()) {
    for (const std::string& line : error.details()) {
      fmt::print(stderr, "{}\n", line);
    }
    if (error.code() == Errc::InvalidSpec) {
      fmt::print(stderr, "matchlock: {} error{} in spec\n", error.details().size(),
                 error.details().size() == 1 ? "" : "s");
    }
  } else {
    fmt::print(stderr, "matchlock: {}\n", error.toString());
  }
  return exitCodeFor(error.code());
}

}  // namespace matchlock::cli
