// SPDX-License-Identifier: Apache-2.0
#include "common/paths.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>

namespace matchlock {
namespace {

Result<std::string> homeDir() {
  const char* home = std::getenv("HOME");
  if (home == nullptr || *home == '\0') {
    return makeError(Errc::InvalidSpec, "HOME is not set; set MATCHLOCK_HOME");
  }
  return std::string(home);
}

}  // namespace

Result<std::string> matchlockHome() {
  if (const char* env = std::getenv("MATCHLOCK_HOME"); env != nullptr && *env != '\0') {
    return std::string(env);
  }
  ML_ASSIGN_OR_RETURN(std::string home, homeDir());
  return home + "/.matchlock";
}

Result<std::string> cacheDir() {
  if (const char* env = std::getenv("XDG_CACHE_HOME"); env != nullptr && *env != '\0') {
    return std::string(env) + "/matchlock";
  }
  ML_ASSIGN_OR_RETURN(std::string home, homeDir());
  return home + "/.cache/matchlock";
}

Status makeDirs(const std::string& path, unsigned mode) {
  std::filesystem::path p(path);
  std::filesystem::path cur;
  for (const auto& part : p) {
    cur /= part;
    if (::mkdir(cur.c_str(), mode) != 0 && errno != EEXIST) {
      return makeError(Errc::System, fmt::format("mkdir {}", cur.string()), errno);
    }
  }
  return ok();
}

}  // namespace matchlock
