// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>

#include "common/result.h"

namespace matchlock::cli {

enum class OutputFormat { Human, Json, Yaml };

/// Prints an error (message and detail lines) to stderr the same way for every command and returns
/// its exit code.
int reportError(const Error& error);

}  // namespace matchlock::cli
