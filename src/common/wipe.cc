// SPDX-License-Identifier: Apache-2.0
#include "common/wipe.h"

#include <algorithm>
#include <cstring>

namespace matchlock {

void wipe(void* p, size_t n) {
  if (p != nullptr && n > 0) {
    ::explicit_bzero(p, n);
  }
}

void wipe(std::string& s) {
  // Bytes past size() up to capacity() may still hold an earlier, longer content.
  s.resize(s.capacity());
  wipe(s.data(), s.size());
  s.clear();
}

void wipeAppend(std::string& out, std::string_view data) {
  if (out.size() + data.size() > out.capacity()) {
    std::string grown;
    grown.reserve(std::max(out.capacity() * 2, out.size() + data.size()));
    grown.append(out);
    wipe(out);
    out.swap(grown);
  }
  out.append(data);
}

}  // namespace matchlock
