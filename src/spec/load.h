// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <vector>

#include "common/result.h"
#include "spec/model.h"

namespace matchlock::spec {

struct LoadOptions {
  /// Files or directories; a directory means every *.toml, *.yaml, *.yml and *.json directly in
  /// it, in name order.
  std::vector<std::string> paths;
  /// `-p`: overrides MATCHLOCK_PROJECT, the files' `name` and the directory name.
  std::string project;
  /// Run the embedded JSON Schema over each file after the typed decoder.
  bool check_schema = true;
};

/// Expands directories into spec files. Errors: NotFound for a missing path, InvalidSpec for a
/// directory holding no spec file.
Result<std::vector<std::string>> expandSpecPaths(const std::vector<std::string>& paths);

/// Reads, interpolates (environment, then `.env` next to each file), decodes and validates the
/// files. Files are grouped into projects by name (-p, then MATCHLOCK_PROJECT, then each file's
/// `name`, then its directory's name), so one directory may hold several projects. Every problem
/// of every file is collected; the error's details hold one `file:line:col: path: message` line
/// each. Projects come out sorted by name.
Result<std::vector<Project>> loadProjects(const LoadOptions& options);

/// loadProjects() that requires the files to form exactly one project.
Result<Project> loadProject(const LoadOptions& options);

/// Project and sandbox names: `^[a-z0-9][a-z0-9_-]*$`, at most 63 characters.
bool isValidProjectName(std::string_view name);

/// The project name from a directory name, compose-style: lower-cased, characters outside
/// [a-z0-9_-] dropped, leading '-'/'_' dropped.
std::string projectNameFromDir(const std::string& dir);

}  // namespace matchlock::spec
