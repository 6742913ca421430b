// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <string_view>

namespace matchlock {

/// Secret hygiene (docs/threat-model.md "Hardened supervisor"): bytes that held a secret value
/// are overwritten before their memory goes back to the allocator, so that a later heap read (a
/// bug, a core that escaped the coredump filter) does not find them.

/// Zeroes every byte `s` owns, its spare capacity included, and empties it. explicit_bzero: the
/// compiler may not drop the stores as dead.
void wipe(std::string& s);

/// Appends `data` to `out`; when `out` must grow, its old buffer is wiped before it is freed (a
/// plain append would hand it back to the allocator as it is).
void wipeAppend(std::string& out, std::string_view data);

/// Zeroes a raw buffer.
void wipe(void* p, size_t n);

}  // namespace matchlock
