// SPDX-License-Identifier: Apache-2.0
// `validate` and `config`: the commands that only read specs.
#include <fmt/format.h>

#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/output.h"
#include "common/strings.h"
#include "spec/load.h"
#include "spec/normalize.h"

namespace matchlock::cli {

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

}  // namespace matchlock::cli
