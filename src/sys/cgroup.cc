// SPDX-License-Identifier: Apache-2.0
#include "sys/cgroup.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <sstream>

#include "common/strings.h"

namespace matchlock::sys {
namespace {

constexpr const char* kUnifiedRoot = "/sys/fs/cgroup";
constexpr const char* kParent = "matchlock";

struct Hierarchy {
  std::string mount;       ///< where it is mounted
  std::string controller;  ///< "" for the unified hierarchy
};

Status writeValue(const std::string& path, std::string_view value) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd || !writeAll(fd.get(), value)) {
    return makeError(Errc::System, fmt::format("writing '{}' to {}", value, path), errno);
  }
  return ok();
}

Status makeDir(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return makeError(Errc::System, fmt::format("creating cgroup {}", path), errno);
  }
  return ok();
}

/// The hierarchies to use: the unified one when it offers memory, pids and cpu; else the v1
/// mounts of those controllers (from /proc/self/mountinfo).
Result<std::vector<Hierarchy>> hierarchies() {
  auto controllers = readFile(std::string(kUnifiedRoot) + "/cgroup.controllers");
  if (controllers) {
    auto have = split(trim(*controllers), ' ');
    for (const char* want : {"memory", "pids", "cpu"}) {
      if (std::find(have.begin(), have.end(), want) == have.end()) {
        return makeError(Errc::Unavailable,
                         fmt::format("the cgroup v2 hierarchy lacks the {} controller", want));
      }
    }
    return std::vector<Hierarchy>{{kUnifiedRoot, ""}};
  }
  std::ifstream in("/proc/self/mountinfo");
  std::vector<Hierarchy> out;
  std::string line;
  while (std::getline(in, line)) {
    // "... <mount point> <options> - <fstype> <source> <super options>"
    size_t dash = line.find(" - ");
    if (dash == std::string::npos) {
      continue;
    }
    std::istringstream tail(line.substr(dash + 3));
    std::string fstype;
    std::string source;
    std::string options;
    tail >> fstype >> source >> options;
    if (fstype != "cgroup") {
      continue;
    }
    std::istringstream head(line.substr(0, dash));
    std::string id;
    std::string parent;
    std::string dev;
    std::string root;
    std::string mount;
    head >> id >> parent >> dev >> root >> mount;
    for (const std::string& opt : split(options, ',')) {
      if (opt == "memory" || opt == "pids" || opt == "cpu") {
        out.push_back({mount, opt});
      }
    }
  }
  if (out.size() < 3) {
    return makeError(Errc::Unavailable,
                     "no cgroup hierarchy with the memory, pids and cpu controllers is mounted");
  }
  return out;
}

}  // namespace

Result<SandboxCgroup> SandboxCgroup::create(const std::string& name, const CgroupLimits& limits) {
  if (name.empty() || name.find('/') != std::string::npos || name[0] == '.') {
    return makeError(Errc::InvalidSpec, fmt::format("invalid cgroup name '{}'", name));
  }
  ML_ASSIGN_OR_RETURN(auto hs, hierarchies());
  SandboxCgroup cg;
  cg.unified_ = hs.size() == 1 && hs[0].controller.empty();
  for (const Hierarchy& h : hs) {
    const std::string parent = h.mount + "/" + kParent;
    const std::string dir = parent + "/" + name;
    if (cg.unified_) {
      // Controllers reach a child only when every ancestor delegates them.
      for (const std::string& at : {h.mount, parent}) {
        if (at == parent) {
          ML_RETURN_IF_ERROR(makeDir(parent));
        }
        ML_RETURN_IF_ERROR(writeValue(at + "/cgroup.subtree_control", "+memory +pids +cpu"));
      }
    } else {
      ML_RETURN_IF_ERROR(makeDir(parent));
    }
    ML_RETURN_IF_ERROR(makeDir(dir));
    cg.dirs_.push_back(dir);
    if (cg.unified_ || h.controller == "memory") {
      ML_RETURN_IF_ERROR(writeValue(dir + (cg.unified_ ? "/memory.max" : "/memory.limit_in_bytes"),
                                    std::to_string(limits.memory_bytes)));
    }
    if (cg.unified_ || h.controller == "pids") {
      ML_RETURN_IF_ERROR(writeValue(dir + "/pids.max", std::to_string(limits.pids)));
    }
    if (cg.unified_) {
      ML_RETURN_IF_ERROR(writeValue(
          dir + "/cpu.max", fmt::format("{} {}", limits.cpu_quota_us, limits.cpu_period_us)));
    } else if (h.controller == "cpu") {
      ML_RETURN_IF_ERROR(
          writeValue(dir + "/cpu.cfs_period_us", std::to_string(limits.cpu_period_us)));
      ML_RETURN_IF_ERROR(
          writeValue(dir + "/cpu.cfs_quota_us", std::to_string(limits.cpu_quota_us)));
    }
    Fd procs(::open((dir + "/cgroup.procs").c_str(), O_WRONLY | O_CLOEXEC));
    if (!procs) {
      return makeError(Errc::System, fmt::format("opening {}/cgroup.procs", dir), errno);
    }
    cg.procs_.push_back(std::move(procs));
  }
  return cg;
}

Status SandboxCgroup::remove(const std::string& name) {
  auto hs = hierarchies();
  if (!hs) {
    return ok();  // no hierarchy: nothing can have been created
  }
  for (const Hierarchy& h : *hs) {
    const std::string dir = fmt::format("{}/{}/{}", h.mount, kParent, name);
    if (::rmdir(dir.c_str()) != 0 && errno != ENOENT) {
      return makeError(Errc::System, fmt::format("removing cgroup {}", dir), errno);
    }
  }
  return ok();
}

SandboxCgroup& SandboxCgroup::operator=(SandboxCgroup&& other) noexcept {
  if (this != &other) {
    release();
    dirs_ = std::move(other.dirs_);
    procs_ = std::move(other.procs_);
    unified_ = other.unified_;
    other.dirs_.clear();
  }
  return *this;
}

SandboxCgroup::~SandboxCgroup() {
  release();
}

void SandboxCgroup::release() {
  procs_.clear();
  for (const std::string& d : dirs_) {
    (void)::rmdir(d.c_str());  // EBUSY while a process is still in it: remove() gets it later
  }
  dirs_.clear();
}

std::vector<int> SandboxCgroup::procsFds() const {
  std::vector<int> out;
  for (const Fd& fd : procs_) {
    out.push_back(fd.get());
  }
  return out;
}

}  // namespace matchlock::sys
