// SPDX-License-Identifier: Apache-2.0
#include "spec/load.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>

#include "common/fd.h"
#include "common/strings.h"
#include "spec/decode.h"
#include "spec/document.h"
#include "spec/interpolate.h"
#include "spec/schema.h"

namespace matchlock::spec {
namespace fs = std::filesystem;

namespace {

bool isSpecFile(const fs::path& p) {
  std::string ext = p.extension().string();
  return ext == ".toml" || ext == ".yaml" || ext == ".yml" || ext == ".json";
}

Result<std::map<std::string, std::string, std::less<>>> loadDotEnv(const std::string& dir) {
  std::string path = (fs::path(dir) / ".env").string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    return std::map<std::string, std::string, std::less<>>{};
  }
  ML_ASSIGN_OR_RETURN(std::string text, readFile(path));
  return parseDotEnv(text, path);
}

}  // namespace

bool isValidProjectName(std::string_view name) {
  if (name.empty() || name.size() > 63 || name[0] == '-' || name[0] == '_') {
    return false;
  }
  return std::ranges::all_of(name, [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  });
}

std::string projectNameFromDir(const std::string& dir) {
  std::string base = fs::path(dir).filename().string();
  std::string out;
  for (char c : toLower(base)) {
    if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-') {
      if (out.empty() && (c == '_' || c == '-')) {
        continue;
      }
      out.push_back(c);
    }
  }
  if (out.size() > 63) {
    out.resize(63);
  }
  return out.empty() ? "default" : out;
}

Result<std::vector<std::string>> expandSpecPaths(const std::vector<std::string>& paths) {
  std::vector<std::string> out;
  for (const std::string& path : paths) {
    std::error_code ec;
    fs::file_status st = fs::status(path, ec);
    if (ec || !fs::exists(st)) {
      return makeError(Errc::NotFound, fmt::format("{}: no such file or directory", path));
    }
    if (!fs::is_directory(st)) {
      out.push_back(path);
      continue;
    }
    std::vector<std::string> found;
    for (const auto& entry : fs::directory_iterator(path, ec)) {
      if (entry.is_regular_file() && isSpecFile(entry.path()) &&
          entry.path().filename().string()[0] != '.') {
        found.push_back(entry.path().string());
      }
    }
    if (ec) {
      return makeError(Errc::System, fmt::format("listing {}", path), ec.value());
    }
    if (found.empty()) {
      return makeError(
          Errc::InvalidSpec,
          fmt::format("{}: directory holds no *.toml, *.yaml, *.yml or *.json spec", path));
    }
    std::ranges::sort(found);
    out.insert(out.end(), found.begin(), found.end());
  }
  if (out.empty()) {
    return makeError(Errc::InvalidSpec, "no spec file given (use -f FILE|DIR)");
  }
  return out;
}

Result<std::vector<Project>> loadProjects(const LoadOptions& options) {
  ML_ASSIGN_OR_RETURN(std::vector<std::string> files, expandSpecPaths(options.paths));
  std::vector<Diagnostic> diags;
  // Documents stay alive for cross-file positions.
  std::vector<std::unique_ptr<Document>> docs;
  std::string override_name = options.project;
  if (override_name.empty()) {
    if (const char* env = std::getenv("MATCHLOCK_PROJECT"); env != nullptr && *env != '\0') {
      override_name = env;
    }
  }
  if (!override_name.empty() && !isValidProjectName(override_name)) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid project name '{}': use lower-case letters, digits, '-' "
                                 "and '_', starting with a letter or digit (at most 63)",
                                 override_name));
  }
  std::map<std::string, Project> projects;
  std::map<std::string, std::map<std::string, SandboxLocation>> where;
  for (const std::string& file : files) {
    auto doc = readDocument(file);
    if (!doc) {
      if (doc.error().code() != Errc::InvalidSpec) {
        return makeError(std::move(doc).error());
      }
      for (const std::string& d : doc.error().details()) {
        diags.push_back(Diagnostic{"", {}, "", d});
      }
      if (doc.error().details().empty()) {
        diags.push_back(Diagnostic{"", {}, "", doc.error().message()});
      }
      continue;
    }
    docs.push_back(std::make_unique<Document>(std::move(*doc)));
    Document& d = *docs.back();
    auto dotenv = loadDotEnv(d.dir);
    if (!dotenv) {
      return makeError(std::move(dotenv).error());
    }
    size_t before = diags.size();
    interpolateDocument(d, layeredEnv(std::move(*dotenv)), diags);
    DecodedFile decoded = decodeDocument(d, diags, Origin::File);
    if (diags.size() == before && options.check_schema) {
      validateAgainstSchema(d, diags);
    }
    // Project name precedence: -p, MATCHLOCK_PROJECT, the file's `name`, its directory's name.
    std::string name = !override_name.empty() ? override_name
                       : decoded.project_name ? *decoded.project_name
                                              : projectNameFromDir(d.dir);
    Project& project = projects[name];
    project.name = name;
    project.files.push_back(file);
    for (auto& [sandbox_name, sandbox] : decoded.sandboxes) {
      auto& locations = where[name];
      if (auto it = locations.find(sandbox_name); it != locations.end()) {
        SourcePos first = it->second.doc->keyPositionOf(it->second.pointer);
        diags.push_back(Diagnostic{
            d.file, decoded.sandbox_pos[sandbox_name], fmt::format("sandboxes.{}", sandbox_name),
            fmt::format("sandbox '{}' of project '{}' is already declared at {}:{}:{}",
                        sandbox_name, name, it->second.doc->file, first.line, first.col)});
        continue;
      }
      locations[sandbox_name] = SandboxLocation{&d, pointerAppend("/sandboxes", sandbox_name)};
      project.sandboxes.emplace(sandbox_name, std::move(sandbox));
    }
  }
  if (diags.empty()) {
    for (const auto& [name, project] : projects) {
      checkProject(project, where[name], diags);
    }
  }
  if (!diags.empty()) {
    // Syntax errors arrive pre-formatted (empty file field): keep their text as is.
    std::vector<std::string> lines;
    for (const Diagnostic& d : diags) {
      lines.push_back(d.file.empty() ? d.message : d.toString());
    }
    Error out(Errc::InvalidSpec,
              lines.size() > 1 ? fmt::format("{} (and {} more)", lines.front(), lines.size() - 1)
                               : lines.front());
    for (std::string& line : lines) {
      out.addDetail(std::move(line));
    }
    return makeError(std::move(out));
  }
  std::vector<Project> out;
  for (auto& [name, project] : projects) {
    out.push_back(std::move(project));
  }
  return out;
}

Result<Project> loadProject(const LoadOptions& options) {
  ML_ASSIGN_OR_RETURN(std::vector<Project> projects, loadProjects(options));
  if (projects.size() != 1) {
    std::vector<std::string> names;
    for (const Project& p : projects) {
      names.push_back(fmt::format("'{}' ({})", p.name, join(p.files, ", ")));
    }
    return makeError(Errc::InvalidSpec,
                     fmt::format("the files declare {} projects: {}; pass the files of one "
                                 "project, or -p NAME to merge them",
                                 projects.size(), join(names, "; ")));
  }
  return std::move(projects.front());
}

}  // namespace matchlock::spec
