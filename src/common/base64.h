// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <string_view>

#include "common/result.h"

namespace matchlock {

/// Standard base64 (RFC 4648, with padding), as Go's encoding/json writes []byte.
std::string base64Encode(std::string_view bytes);
/// Strict decode: the standard alphabet, length a multiple of 4, at most two trailing '=' and no
/// whitespace. Errors are InvalidSpec. Reads untrusted input (RPC payloads, registry replies).
[[nodiscard]] Result<std::string> base64Decode(std::string_view text);

}  // namespace matchlock
