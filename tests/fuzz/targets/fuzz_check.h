// SPDX-License-Identifier: Apache-2.0
// Shared by the libFuzzer targets (docs/fuzzing.md): a property check that aborts, so a broken
// invariant is a crash libFuzzer keeps, and a byte cursor for inputs that carry several parts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#define FUZZ_CHECK(cond)                                                               \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                    \
    }                                                                                  \
  } while (0)

namespace fuzz {

inline std::string_view asView(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

/// Takes bytes off the front of an input.
class Cursor {
 public:
  explicit Cursor(std::string_view in) : in_(in) {}
  uint8_t byte() {
    if (in_.empty()) {
      return 0;
    }
    auto b = static_cast<uint8_t>(in_.front());
    in_.remove_prefix(1);
    return b;
  }
  /// Up to `n` bytes.
  std::string_view take(size_t n) {
    std::string_view out = in_.substr(0, n);
    in_.remove_prefix(out.size());
    return out;
  }
  std::string_view rest() const { return in_; }
  bool empty() const { return in_.empty(); }

 private:
  std::string_view in_;
};

}  // namespace fuzz
