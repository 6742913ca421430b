// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>

#include "common/result.h"

namespace matchlock {

/// `$MATCHLOCK_HOME`, else `$HOME/.matchlock`. Holds state.db and per-sandbox run directories.
Result<std::string> matchlockHome();

/// `$XDG_CACHE_HOME/matchlock`, else `$HOME/.cache/matchlock`. Images and kernels.
Result<std::string> cacheDir();

/// mkdir -p with the given mode for created directories.
Status makeDirs(const std::string& path, unsigned mode = 0700);

}  // namespace matchlock
