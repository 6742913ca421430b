// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <string_view>

namespace matchlock {

/// Lower-case hex SHA-256 of `data`.
std::string sha256Hex(std::string_view data);

/// Lower-case hex HMAC-SHA-256 of `data` under `key`.
std::string hmacSha256Hex(std::string_view key, std::string_view data);

}  // namespace matchlock
