// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <map>
#include <optional>
#include <string>

#include "common/result.h"
#include "spec/model.h"

namespace matchlock::runtime {

/// Reads the values of a sandbox's secrets from their sources (host env var, file, command,
/// inline). Commands run with a 10 s bound. The values stay in memory: callers must never log
/// them, write them to disk or the state DB, or pass them to the guest.
[[nodiscard]] Result<std::map<std::string, std::string>> resolveSecretValues(
    const spec::SandboxSpec& spec);

/// HMAC-SHA256, under this installation's key, over the sandbox's secret names and values: the
/// state DB stores this to detect rotation without holding anything that helps guess a value.
/// The key is `$MATCHLOCK_HOME/secrets.key` (32 random bytes, 0600), created on first use unless
/// `create_key` is false (dry runs), in which case nullopt is returned when it does not exist.
/// nullopt as well for a sandbox without secrets.
[[nodiscard]] Result<std::optional<std::string>> secretsHash(
    const std::map<std::string, std::string>& values, bool create_key);

}  // namespace matchlock::runtime
