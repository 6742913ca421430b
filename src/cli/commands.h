// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace CLI {
class App;
}  // namespace CLI

namespace matchlock::cli {

/// Shared by every command: where a command leaves its exit code.
struct CommandContext {
  int exit_code = 0;
  /// Sets the exit code from a Status, printing the error the standard way.
  void finish(const Status& status);
};

// Each command group registers its subcommands (options, help, callback) on the root app. A
// group's option structs are owned by its callbacks. Add a group by adding a file and a line in
// cli.cc.
void addSpecCommands(CLI::App& app, CommandContext& ctx);   // validate, config
void addMiscCommands(CLI::App& app, CommandContext& ctx);   // version, completion
void addImageCommands(CLI::App& app, CommandContext& ctx);  // pull, image ...
void addVmCommands(CLI::App& app, CommandContext& ctx);  // run, exec, list, inspect, log, kill, rm
void addUpCommands(CLI::App& app, CommandContext& ctx);  // up, plan, reconcile, down, ps
void addVolumeCommands(CLI::App& app, CommandContext& ctx);  // volume create|ls|rm|cp
void addRpcCommands(CLI::App& app, CommandContext& ctx);     // rpc, cp, port-forward

/// A host port published to the guest's 127.0.0.1:remote.
struct PublishedPort {
  std::string address;
  uint16_t local = 0;
  uint16_t remote = 0;
};
/// `[LOCAL:]REMOTE...` for every `--address A[,B]` (default 127.0.0.1), upstream's rules: ports
/// 1-65535, one port is the same on both sides, addresses are IP literals or `localhost`. A
/// repeated address is dropped (`run`) or refused (`port-forward`); a host port published twice
/// is refused. Errors start with `flag`.
Result<std::vector<PublishedPort>> parsePublished(std::string_view flag,
                                                  const std::vector<std::string>& specs,
                                                  const std::vector<std::string>& address_args,
                                                  bool dedupe_addresses);

/// `matchlock <version> (commit: <sha>, built: <date>)`, as upstream prints it.
std::string versionLine();

/// A completion script for `shell` covering every subcommand and option of `app`.
std::string completionScript(const CLI::App& app, const std::string& shell);

}  // namespace matchlock::cli
