// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <memory>

namespace matchlock {

/// unique_ptr with a C free function as deleter: `CPtr<sqlite3, &sqlite3_close_v2>`.
template <class T, auto FreeFn>
struct CDeleter {
  void operator()(T* p) const {
    if (p != nullptr) {
      FreeFn(p);
    }
  }
};

template <class T, auto FreeFn>
using CPtr = std::unique_ptr<T, CDeleter<T, FreeFn>>;

}  // namespace matchlock
