// SPDX-License-Identifier: Apache-2.0
#include "cli/cli.h"

#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "cli/output.h"
#include "common/log.h"
#include "ml_version.h"

namespace matchlock::cli {
namespace {

constexpr int kUsageExit = 64;  // EX_USAGE

std::string versionLine() {
  return fmt::format("matchlock {} (commit: {}, built: {})", kVersion, kGitCommit, kBuildDate);
}

}  // namespace

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

  int exit_code = 0;
  auto finish = [&](Status st) { exit_code = st ? 0 : reportError(st.error()); };

  // validate
  ValidateOptions validate_opts;
  auto* validate = app.add_subcommand("validate",
                                      "Check spec files and report every error with "
                                      "file:line:col (exit 65 when any is invalid)");
  validate->add_option("-f,--file", validate_opts.paths, "Spec file or directory (repeatable)")
      ->required();
  validate->add_option("-p,--project", validate_opts.project, "Project name override");
  validate->add_option("-o,--output", validate_opts.output, "human or json")
      ->check(CLI::IsMember({"human", "json"}));
  validate->add_flag("-q,--quiet", validate_opts.quiet, "Print errors only");
  validate->callback([&] { exit_code = runValidate(validate_opts); });

  // config
  ConfigOptions config_opts;
  auto* config = app.add_subcommand("config",
                                    "Print the normalized, interpolated spec (secrets "
                                    "as references, never values)");
  config->add_option("-f,--file", config_opts.paths, "Spec file or directory (repeatable)")
      ->required();
  config->add_option("-p,--project", config_opts.project, "Project name override");
  config->add_option("-o,--output", config_opts.output, "yaml or json")
      ->check(CLI::IsMember({"yaml", "json"}));
  config->callback([&] { finish(runConfig(config_opts)); });

  // version
  auto* version = app.add_subcommand("version", "Print the version");
  version->callback([&] { fmt::print("{}\n", versionLine()); });

  // completion
  std::string shell = "bash";
  auto* completion = app.add_subcommand("completion",
                                        "Print a shell completion script "
                                        "(bash or zsh, e.g. "
                                        "`source <(matchlock completion bash)`)");
  completion->add_option("shell", shell, "bash or zsh")->check(CLI::IsMember({"bash", "zsh"}));
  completion->callback([&] { fmt::print("{}", completionScript(app, shell)); });

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
  return exit_code;
}

}  // namespace matchlock::cli
