// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace matchlock {

std::vector<std::string> split(std::string_view s, char sep);
std::string_view trim(std::string_view s);
std::string join(std::span<const std::string> parts, std::string_view sep);
std::string toLower(std::string_view s);

/// Edit distance (insert, delete, substitute, adjacent transpose) for "did you mean" hints.
size_t editDistance(std::string_view a, std::string_view b);

/// The candidate closest to `word` if it is close enough to be a plausible typo, else "".
std::string closestMatch(std::string_view word, std::span<const std::string_view> candidates);

/// The last `n` non-blank lines of `text`, joined with '\n' (error messages that quote a log).
std::string lastLines(std::string_view text, size_t n);

/// Hex encoding (lower case).
std::string toHex(std::string_view bytes);

/// Offset of the first byte of `s` that is not part of well-formed UTF-8 (RFC 3629: no overlong
/// forms, no surrogates, nothing above U+10FFFF), or npos when `s` is valid throughout.
size_t invalidUtf8At(std::string_view s);

}  // namespace matchlock
