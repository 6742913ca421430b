// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>

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

/// `matchlock <version> (commit: <sha>, built: <date>)`, as upstream prints it.
std::string versionLine();

/// A completion script for `shell` covering every subcommand and option of `app`.
std::string completionScript(const CLI::App& app, const std::string& shell);

}  // namespace matchlock::cli
