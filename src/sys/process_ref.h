// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string_view>

#include "common/result.h"

namespace matchlock::sys {

/// A non-owning reference to a process that survives pid reuse: the pid plus its start time
/// (field 22 of /proc/<pid>/stat, clock ticks since boot). Stored in SQLite for supervisors and
/// VMMs so that a restarted matchlock re-adopts a process only if it is still the same one.
struct ProcessRef {
  pid_t pid = 0;
  uint64_t start_time = 0;
  bool operator==(const ProcessRef&) const = default;
};

/// The fields of /proc/<pid>/stat that we use.
struct ProcStat {
  char state = '?';         ///< field 3: R, S, D, Z, X, ...
  uint64_t start_time = 0;  ///< field 22
};

/// Parses the text of /proc/<pid>/stat. The comm field (2) may contain spaces and ')', so parsing
/// starts after the *last* ')'. Errors are Internal.
[[nodiscard]] Result<ProcStat> parseProcStat(std::string_view text);

/// Start time of `pid`; NotFound if there is no such process.
[[nodiscard]] Result<uint64_t> processStartTime(pid_t pid);

/// ProcessRef of a live process; NotFound if there is no such process.
[[nodiscard]] Result<ProcessRef> processRef(pid_t pid);

/// True if `ref.pid` exists, is not a zombie, and has the recorded start time.
bool isAlive(const ProcessRef& ref);

}  // namespace matchlock::sys
