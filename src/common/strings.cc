// SPDX-License-Identifier: Apache-2.0
#include "common/strings.h"

#include <algorithm>
#include <cctype>

namespace matchlock {

std::vector<std::string> split(std::string_view s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t pos = s.find(sep, start);
    if (pos == std::string_view::npos) {
      out.emplace_back(s.substr(start));
      return out;
    }
    out.emplace_back(s.substr(start, pos - start));
    start = pos + 1;
  }
}

std::string_view trim(std::string_view s) {
  auto is_space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!s.empty() && is_space(s.front())) {
    s.remove_prefix(1);
  }
  while (!s.empty() && is_space(s.back())) {
    s.remove_suffix(1);
  }
  return s;
}

std::string join(std::span<const std::string> parts, std::string_view sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) {
      out.append(sep);
    }
    out.append(parts[i]);
  }
  return out;
}

std::string toLower(std::string_view s) {
  std::string out(s);
  std::ranges::transform(out, out.begin(), [](char c) {
    return static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  });
  return out;
}

size_t editDistance(std::string_view a, std::string_view b) {
  // Optimal string alignment distance, O(|a|*|b|) with three rows.
  const size_t n = a.size();
  const size_t m = b.size();
  std::vector<size_t> prev2(m + 1);
  std::vector<size_t> prev(m + 1);
  std::vector<size_t> cur(m + 1);
  for (size_t j = 0; j <= m; ++j) {
    prev[j] = j;
  }
  for (size_t i = 1; i <= n; ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= m; ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        cur[j] = std::min(cur[j], prev2[j - 2] + 1);
      }
    }
    prev2.swap(prev);
    prev.swap(cur);
  }
  return prev[m];
}

std::string closestMatch(std::string_view word, std::span<const std::string_view> candidates) {
  std::string best;
  size_t best_dist = 0;
  const std::string lower = toLower(word);
  for (std::string_view cand : candidates) {
    size_t d = editDistance(lower, cand);
    if (best.empty() || d < best_dist) {
      best = std::string(cand);
      best_dist = d;
    }
  }
  // Allow roughly one typo per three characters, at least one and at most three.
  size_t limit = std::clamp<size_t>(word.size() / 3, 1, 3);
  if (best.empty() || best_dist > limit) {
    return {};
  }
  return best;
}

std::string toHex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 0xf]);
  }
  return out;
}

size_t invalidUtf8At(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t n = 0;
    unsigned char lo = 0x80;
    unsigned char hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
      n = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2;
      lo = c == 0xe0 ? 0xa0 : 0x80;  // no overlong forms
      hi = c == 0xed ? 0x9f : 0xbf;  // no surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3;
      lo = c == 0xf0 ? 0x90 : 0x80;
      hi = c == 0xf4 ? 0x8f : 0xbf;  // nothing above U+10FFFF
    } else {
      return i;
    }
    if (i + n >= s.size()) {  // truncated sequence
      return i;
    }
    auto second = static_cast<unsigned char>(s[i + 1]);
    if (second < lo || second > hi) {
      return i;
    }
    for (size_t k = 2; k <= n; ++k) {
      auto cont = static_cast<unsigned char>(s[i + k]);
      if (cont < 0x80 || cont > 0xbf) {
        return i;
      }
    }
    i += n + 1;
  }
  return std::string_view::npos;
}

std::string lastLines(std::string_view text, size_t n) {
  std::vector<std::string> lines;
  for (std::string& line : split(text, '\n')) {
    if (!trim(line).empty()) {
      lines.push_back(std::string(trim(line)));
    }
  }
  if (lines.size() > n) {
    lines.erase(lines.begin(), lines.end() - static_cast<std::ptrdiff_t>(n));
  }
  return join(lines, "\n");
}

}  // namespace matchlock
