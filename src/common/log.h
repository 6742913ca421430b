// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <spdlog/spdlog.h>

#include <string_view>

namespace matchlock::log {

/// Sets up the process-wide sinks (stderr). `level` is an spdlog level name ("info", "debug"...).
void init(std::string_view level);

/// The named component logger ("spec", "state", "reconcile", ...), created on first use with the
/// process-wide sinks. Never log secret values, tokens or environment values at any level.
spdlog::logger& get(std::string_view component);

}  // namespace matchlock::log

/// `ML_LOG(state, info, "migrated to {}", v)`: checks the level before formatting.
#define ML_LOG(component, lvl, ...)                                \
  do {                                                             \
    auto& ml_internal_logger_ = ::matchlock::log::get(#component); \
    if (ml_internal_logger_.should_log(spdlog::level::lvl)) {      \
      ml_internal_logger_.log(spdlog::level::lvl, __VA_ARGS__);    \
    }                                                              \
  } while (false)
