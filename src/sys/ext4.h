// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/result.h"

namespace matchlock::sys {

/// Runs a tool to completion (bounded by `timeout`), its output going to `log_path`; exit codes up
/// to `max_ok` count as success (the log is then deleted). A failure's message holds the log.
[[nodiscard]] Status runTool(const std::vector<std::string>& argv, const std::string& log_path,
                             int max_ok = 0,
                             std::chrono::seconds timeout = std::chrono::seconds(60));

struct Ext4Options {
  /// A journal survives a VM killed mid-write (named volumes); a throw-away upper disk skips it.
  bool journal = true;
};

/// A sparse file of `mib` MiB at `path`, formatted ext4 (`mkfs.ext4 -q -F`). Built under a
/// temporary name and renamed, so a crash mid-mkfs never leaves a disk that looks usable.
[[nodiscard]] Status makeExt4Image(const std::string& path, int64_t mib,
                                   const Ext4Options& options = {});

}  // namespace matchlock::sys
