// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string_view>

namespace matchlock {

/// Crash-test hook: when MATCHLOCK_FAULT names `point`, the process SIGKILLs itself there, so
/// acceptance tests can prove that every step is recoverable. A no-op otherwise. The points are
/// listed in docs/reconcile.md ("Fault points").
void faultPoint(std::string_view point);

}  // namespace matchlock
