// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <vector>

#include "common/result.h"

namespace CLI {
class App;
}  // namespace CLI

namespace matchlock::cli {

struct ValidateOptions {
  std::vector<std::string> paths;
  std::string project;
  std::string output = "human";
  bool quiet = false;
};
/// Returns the exit code: 0 valid, 65 invalid, others for I/O errors.
int runValidate(const ValidateOptions& options);

struct ConfigOptions {
  std::vector<std::string> paths;
  std::string project;
  std::string output = "yaml";
};
Status runConfig(const ConfigOptions& options);

/// A completion script for `shell` covering every subcommand and option of `app`.
std::string completionScript(const CLI::App& app, const std::string& shell);

}  // namespace matchlock::cli
