// SPDX-License-Identifier: Apache-2.0
#include "runtime/volumes.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "common/paths.h"
#include "common/strings.h"
#include "spec/decode.h"
#include "sys/ext4.h"
#include "sys/process_ref.h"

namespace matchlock::runtime {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kSuffix = ".ext4";

Result<VolumeInfo> infoOf(const std::string& name, const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) {
      return makeError(Errc::NotFound, fmt::format("named volume not found: {}", name));
    }
    return makeError(Errc::System, fmt::format("stat {}", path), errno);
  }
  return VolumeInfo{name, static_cast<int64_t>(st.st_size), path};
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

}  // namespace

bool isValidVolumeName(std::string_view name) {
  if (name.empty() || name.size() > 128) {
    return false;
  }
  auto alnum = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  };
  if (!alnum(name.front())) {
    return false;
  }
  return std::all_of(name.begin(), name.end(),
                     [&](char c) { return alnum(c) || c == '_' || c == '.' || c == '-'; });
}

Result<std::string> volumesDir() {
  ML_ASSIGN_OR_RETURN(std::string cache, cacheDir());
  return cache + "/volumes";
}

Result<std::string> volumePath(const std::string& name) {
  if (!isValidVolumeName(name)) {
    return makeError(
        Errc::InvalidSpec,
        fmt::format("invalid volume name '{}': must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", name));
  }
  ML_ASSIGN_OR_RETURN(std::string dir, volumesDir());
  return fmt::format("{}/{}{}", dir, name, kSuffix);
}

std::string formatVolumeSize(int64_t bytes) {
  return fmt::format("{:.1f} MB", static_cast<double>(bytes) / (1024.0 * 1024.0));
}

Result<VolumeInfo> createVolume(const std::string& name, int64_t mib) {
  ML_ASSIGN_OR_RETURN(std::string path, volumePath(name));
  if (mib < 1) {
    return makeError(Errc::InvalidSpec, "--size must be at least 1 MiB");
  }
  ML_ASSIGN_OR_RETURN(std::string dir, volumesDir());
  ML_RETURN_IF_ERROR(makeDirs(dir, 0700));
  if (exists(path)) {
    return makeError(Errc::Conflict, fmt::format("named volume already exists: {}", name));
  }
  ML_RETURN_IF_ERROR(sys::makeExt4Image(path, mib, sys::Ext4Options{.journal = true}));
  return infoOf(name, path);
}

Result<std::vector<VolumeInfo>> listVolumes() {
  ML_ASSIGN_OR_RETURN(std::string dir, volumesDir());
  std::vector<VolumeInfo> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return out;
  }
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::string file = entry.path().filename().string();
    if (!file.ends_with(kSuffix) || !entry.is_regular_file(ec)) {
      continue;
    }
    std::string name = file.substr(0, file.size() - kSuffix.size());
    if (!isValidVolumeName(name)) {
      continue;
    }
    if (auto info = infoOf(name, entry.path().string()); info) {
      out.push_back(std::move(*info));
    }
  }
  if (ec) {
    return makeError(Errc::System, fmt::format("listing {}", dir), ec.value());
  }
  std::sort(out.begin(), out.end(),
            [](const VolumeInfo& a, const VolumeInfo& b) { return a.name < b.name; });
  return out;
}

Status removeVolume(state::Store& store, const std::string& name) {
  ML_ASSIGN_OR_RETURN(std::string path, volumePath(name));
  ML_ASSIGN_OR_RETURN(VolumeInfo info, infoOf(name, path));
  ML_ASSIGN_OR_RETURN(std::vector<std::string> users, sandboxesUsingDisk(store, path));
  if (!users.empty()) {
    return makeError(Errc::Conflict,
                     fmt::format("named volume {} is in use by running sandbox {}: stop it first",
                                 name, join(users, ", ")));
  }
  if (::unlink(info.path.c_str()) != 0) {
    return makeError(Errc::System, fmt::format("removing {}", info.path), errno);
  }
  return ok();
}

Result<VolumeInfo> copyVolume(const std::string& src, const std::string& dst) {
  ML_ASSIGN_OR_RETURN(std::string from, volumePath(src));
  ML_ASSIGN_OR_RETURN(std::string to, volumePath(dst));
  if (src == dst) {
    return makeError(Errc::InvalidSpec, "source and destination volume are the same");
  }
  ML_ASSIGN_OR_RETURN(VolumeInfo info, infoOf(src, from));
  if (exists(to)) {
    return makeError(Errc::Conflict, fmt::format("named volume already exists: {}", dst));
  }
  // cp keeps holes (--sparse=always), mode, owner and mtime; the copy appears under its name
  // only when complete, and link(2) never replaces a volume created meanwhile.
  const std::string tmp = to + ".copy";
  (void)::unlink(tmp.c_str());
  if (Status st = sys::runTool(
          {"cp", "--sparse=always", "--preserve=mode,ownership,timestamps", info.path, tmp},
          to + ".cp.log", 0, std::chrono::seconds(3600));
      !st) {
    (void)::unlink(tmp.c_str());
    return makeError(std::move(st).error());
  }
  if (::link(tmp.c_str(), to.c_str()) != 0) {
    int err = errno;
    (void)::unlink(tmp.c_str());
    if (err == EEXIST) {
      return makeError(Errc::Conflict, fmt::format("named volume already exists: {}", dst));
    }
    return makeError(Errc::System, fmt::format("link {}", to), err);
  }
  (void)::unlink(tmp.c_str());
  return infoOf(dst, to);
}

Result<std::vector<std::string>> sandboxesUsingDisk(state::Store& store,
                                                    const std::string& host_path) {
  ML_ASSIGN_OR_RETURN(auto all, store.listSandboxes());
  std::vector<std::string> out;
  for (const auto& r : all) {
    if (!r.supervisor || !sys::isAlive(*r.supervisor)) {
      continue;
    }
    auto spec = nlohmann::json::parse(r.spec_json, nullptr, false);
    auto mounts = spec.is_object() ? spec.find("mounts") : spec.end();
    if (!spec.is_object() || mounts == spec.end() || !mounts->is_array()) {
      continue;
    }
    for (const auto& m : *mounts) {
      std::string mode = m.value("mode", "");
      std::string source = m.value("source", "");
      std::string path;
      if (mode == "volume") {
        path = volumePath(source).value_or("");
      } else if (mode == "disk") {
        path = source;
      }
      if (!path.empty() && path == host_path) {
        out.push_back(r.project == "default" ? r.id : r.project + "/" + r.name);
        break;
      }
    }
  }
  return out;
}

Result<spec::Mount> parseDiskFlag(const std::string& arg) {
  std::vector<std::string> parts = split(arg, ':');
  if (parts.size() < 2 || parts.size() > 3 || parts[0].empty() || parts[1].empty()) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid disk mount '{}': expected HOST_PATH:GUEST_MOUNT[:ro] or "
                                 "@VOLUME:GUEST_MOUNT[:ro]",
                                 arg));
  }
  spec::Mount m;
  if (parts[0].starts_with("@")) {
    m.mode = spec::MountMode::Volume;
    m.source = parts[0].substr(1);
    if (!isValidVolumeName(m.source)) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid disk mount '{}': volume name '{}' must match "
                                   "^[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
                                   arg, m.source));
    }
  } else {
    m.mode = spec::MountMode::Disk;
    std::error_code ec;
    m.source = fs::absolute(parts[0], ec).lexically_normal().string();
    if (ec || !fs::exists(m.source, ec)) {
      return makeError(
          Errc::NotFound,
          fmt::format("invalid disk mount '{}': host path {} does not exist", arg, m.source));
    }
  }
  if (!spec::isValidGuestMountPath(parts[1])) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid disk mount '{}': guest mount '{}' must be an absolute "
                                 "path matching ^/[a-zA-Z0-9/_.-]+$ without '..', not /",
                                 arg, parts[1]));
  }
  m.target = fs::path(parts[1]).lexically_normal().string();
  while (m.target.size() > 1 && m.target.back() == '/') {
    m.target.pop_back();
  }
  if (parts.size() == 3) {
    if (parts[2] == "ro" || parts[2] == "readonly") {
      m.readonly = true;
    } else if (parts[2] != "rw") {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid disk mount '{}': unknown option '{}' (ro, readonly)",
                                   arg, parts[2]));
    }
  }
  return m;
}

Result<std::string> diskImageOf(const spec::Mount& mount) {
  if (mount.mode == spec::MountMode::Volume) {
    ML_ASSIGN_OR_RETURN(std::string path, volumePath(mount.source));
    if (!exists(path)) {
      return makeError(Errc::NotFound, fmt::format("named volume not found: {} (create it with "
                                                   "matchlock volume create {})",
                                                   mount.source, mount.source));
    }
    return path;
  }
  if (!exists(mount.source)) {
    return makeError(Errc::NotFound, fmt::format("disk {} does not exist", mount.source));
  }
  return mount.source;
}

}  // namespace matchlock::runtime
