// SPDX-License-Identifier: Apache-2.0
// `validate` and `config`: the commands that only read specs.
#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/output.h"
#include "common/strings.h"
#include "spec/load.h"
#include "spec/normalize.h"

namespace matchlock::cli {
namespace {

struct ValidateOptions {
  std::vector<std::string> paths;
  std::string project;
  std::string output = "human";
  bool quiet = false;
};

struct ConfigOptions {
  std::vector<std::string> paths;
  std::string project;
  std::string output = "yaml";
};

int runValidate(const ValidateOptions& options) {
  spec::LoadOptions load{options.paths, options.project, true};
  auto projects = spec::loadProjects(load);
  if (options.output == "json") {
    nlohmann::ordered_json out = nlohmann::ordered_json::object();
    out["valid"] = projects.has_value();
    if (projects) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (const spec::Project& p : *projects) {
        nlohmann::ordered_json names = nlohmann::ordered_json::array();
        for (const auto& [name, s] : p.sandboxes) {
          names.push_back(name);
        }
        list.push_back({{"name", p.name}, {"files", p.files}, {"sandboxes", names}});
      }
      out["projects"] = list;
      out["errors"] = nlohmann::ordered_json::array();
    } else {
      const Error& e = projects.error();
      out["errors"] = e.details().empty() ? std::vector<std::string>{e.toString()} : e.details();
    }
    fmt::print("{}\n", out.dump(2));
    return projects ? 0 : exitCodeFor(projects.error().code());
  }
  if (!projects) {
    return reportError(projects.error());
  }
  if (!options.quiet) {
    for (const spec::Project& p : *projects) {
      std::vector<std::string> names;
      for (const auto& [name, s] : p.sandboxes) {
        names.push_back(name);
      }
      for (const std::string& file : p.files) {
        fmt::print("ok  {}\n", file);
      }
      fmt::print("    project {}: {} sandbox{} ({})\n", p.name, names.size(),
                 names.size() == 1 ? "" : "es", join(names, ", "));
    }
  }
  return 0;
}

Status runConfig(const ConfigOptions& options) {
  spec::LoadOptions load{options.paths, options.project, true};
  ML_ASSIGN_OR_RETURN(std::vector<spec::Project> projects, spec::loadProjects(load));
  if (options.output == "json") {
    if (projects.size() == 1) {
      fmt::print("{}\n", spec::toJson(projects.front()).dump(2));
    } else {
      nlohmann::ordered_json all = nlohmann::ordered_json::array();
      for (const spec::Project& p : projects) {
        all.push_back(spec::toJson(p));
      }
      fmt::print("{}\n", all.dump(2));
    }
    return ok();
  }
  for (size_t i = 0; i < projects.size(); ++i) {
    if (i > 0) {
      fmt::print("---\n");
    }
    fmt::print("{}", spec::toYaml(spec::toJson(projects[i])));
  }
  return ok();
}

}  // namespace

void addSpecCommands(CLI::App& app, CommandContext& ctx) {
  auto validate_opts = std::make_shared<ValidateOptions>();
  auto* validate = app.add_subcommand("validate",
                                      "Check spec files and report every error with file:line:col "
                                      "(exit 65 when any is invalid)");
  validate->add_option("-f,--file", validate_opts->paths, "Spec file or directory (repeatable)")
      ->required();
  validate->add_option("-p,--project", validate_opts->project, "Project name override");
  validate->add_option("-o,--output", validate_opts->output, "human or json")
      ->check(CLI::IsMember({"human", "json"}));
  validate->add_flag("-q,--quiet", validate_opts->quiet, "Print errors only");
  validate->callback([validate_opts, &ctx] { ctx.exit_code = runValidate(*validate_opts); });

  auto config_opts = std::make_shared<ConfigOptions>();
  auto* config = app.add_subcommand("config",
                                    "Print the normalized, interpolated spec (secrets as "
                                    "references, never values)");
  config->add_option("-f,--file", config_opts->paths, "Spec file or directory (repeatable)")
      ->required();
  config->add_option("-p,--project", config_opts->project, "Project name override");
  config->add_option("-o,--output", config_opts->output, "yaml or json")
      ->check(CLI::IsMember({"yaml", "json"}));
  config->callback([config_opts, &ctx] { ctx.finish(runConfig(*config_opts)); });
}

void addMiscCommands(CLI::App& app, CommandContext& ctx) {
  auto* version = app.add_subcommand("version", "Print the version");
  version->callback([&ctx] {
    fmt::print("{}\n", versionLine());
    ctx.exit_code = 0;
  });
  auto shell = std::make_shared<std::string>("bash");
  auto* completion = app.add_subcommand("completion",
                                        "Print a shell completion script (bash or zsh, e.g. "
                                        "`source <(matchlock completion bash)`)");
  completion->add_option("shell", *shell, "bash or zsh")->check(CLI::IsMember({"bash", "zsh"}));
  completion->callback([shell, &app] { fmt::print("{}", completionScript(app, *shell)); });
}

}  // namespace matchlock::cli
