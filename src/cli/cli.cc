// SPDX-License-Identifier: Apache-2.0
#include "cli/cli.h"

#include <fmt/format.h>

#include <cstdlib>
#include <string>

#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "cli/output.h"
#include "common/log.h"
#include "ml_version.h"

namespace matchlock::cli {
namespace {

constexpr int kUsageExit = 64;  // EX_USAGE

}  // namespace

std::string versionLine() {
  return fmt::format("matchlock {} (commit: {}, built: {})", kVersion, kGitCommit, kBuildDate);
}

void CommandContext::finish(const Status& status) {
  exit_code = status ? 0 : reportError(status.error());
}

int run(int argc, char** argv) {
  CLI::App app{
      "matchlock: declarative micro-VM sandboxes for AI agents.\n"
      "Specs (TOML/YAML/JSON) describe sandboxes; see docs/spec.md.",
      "matchlock"};
  app.require_subcommand(1);
  app.set_version_flag("--version", versionLine());
  std::string log_level = "warn";
  if (const char* env = std::getenv("MATCHLOCK_LOG"); env != nullptr && *env != '\0') {
    log_level = env;
  }
  log::init(log_level);
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off (MATCHLOCK_LOG)")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}))
      ->each([](const std::string& level) { log::init(level); });

  CommandContext ctx;
  addSpecCommands(app, ctx);
  addMiscCommands(app, ctx);
  addVmCommands(app, ctx);
  addUpCommands(app, ctx);
  addImageCommands(app, ctx);
  addVolumeCommands(app, ctx);
  addRpcCommands(app, ctx);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return e.get_exit_code() == 0 ? 0 : kUsageExit;
  }
  return ctx.exit_code;
}

}  // namespace matchlock::cli
