// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <fmt/format.h>
#include <unistd.h>

#include <string>

namespace matchlock::guest {

/// The guest's whole logger: one line to stderr (the serial console when PID 1). No spdlog in the
/// static guest. Never log environment values or secrets.
template <class... Args>
void logLine(fmt::format_string<Args...> format, Args&&... args) {
  std::string line = "matchlock-guest: " + fmt::format(format, std::forward<Args>(args)...) + "\n";
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n <= 0) {
      return;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace matchlock::guest
