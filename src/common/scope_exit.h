// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <utility>

namespace matchlock {

/// Runs a callable when it leaves scope unless dismissed. Used for rollback inside one step.
template <class F>
class ScopeExit {
 public:
  explicit ScopeExit(F fn) : fn_(std::move(fn)) {}
  ScopeExit(const ScopeExit&) = delete;
  ScopeExit& operator=(const ScopeExit&) = delete;
  ScopeExit(ScopeExit&&) = delete;
  ScopeExit& operator=(ScopeExit&&) = delete;
  ~ScopeExit() {
    if (active_) {
      fn_();
    }
  }
  void dismiss() { active_ = false; }

 private:
  F fn_;
  bool active_ = true;
};

}  // namespace matchlock

#define ML_INTERNAL_DEFER_CAT2(a, b) a##b
#define ML_INTERNAL_DEFER_CAT(a, b) ML_INTERNAL_DEFER_CAT2(a, b)
/// `ML_DEFER { cleanup(); };` runs the block at scope exit.
#define ML_DEFER                                                               \
  ::matchlock::ScopeExit ML_INTERNAL_DEFER_CAT(ml_internal_defer_, __LINE__) = \
      ::matchlock::internal::DeferHelper{} + [&]()

namespace matchlock::internal {
struct DeferHelper {
  template <class F>
  ScopeExit<F> operator+(F&& fn) {
    return ScopeExit<F>(std::forward<F>(fn));
  }
};
}  // namespace matchlock::internal
