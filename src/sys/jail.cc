// SPDX-License-Identifier: Apache-2.0
#include "sys/jail.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <grp.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <set>

namespace matchlock::sys {

namespace {

/// "/a/b/c" -> {"/a", "/a/b"} (the parents, shallowest first).
std::vector<std::string> parentsOf(const std::string& path) {
  std::vector<std::string> out;
  for (size_t at = path.find('/', 1); at != std::string::npos; at = path.find('/', at + 1)) {
    out.push_back(path.substr(0, at));
  }
  return out;
}

bool cleanAbsolute(const std::string& p) {
  return p.size() > 1 && p[0] == '/' && p.back() != '/' && p.find("//") == std::string::npos &&
         p.find("/./") == std::string::npos && p.find("/../") == std::string::npos &&
         !p.ends_with("/..") && !p.ends_with("/.");
}

// The child side runs on the spawn stack in the parent's memory (CLONE_VM): no sanitizer
// bookkeeping there (see process.cc).
#define ML_JAIL_CHILD __attribute__((no_sanitize("address", "undefined")))

ML_JAIL_CHILD int fail(const char** step, const char* what) {
  *step = what;
  return errno != 0 ? errno : EINVAL;
}

}  // namespace

int jailCloneFlags() {
  return CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET;
}

Result<JailPlan> planJail(const JailSpec& spec) {
  if (!cleanAbsolute(spec.root)) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("jail root '{}' is not a clean absolute path", spec.root));
  }
  if (spec.uid == 0 || spec.gid == 0) {
    return makeError(Errc::InvalidSpec, "a jail never runs as root (uid or gid 0)");
  }
  JailPlan plan;
  plan.spec = &spec;
  plan.old_root = spec.root + "/.old";
  std::set<std::string> dirs;
  auto add_dir = [&](const std::string& inside) {
    for (const std::string& p : parentsOf(inside)) {
      if (dirs.insert(p).second) {
        plan.dirs.push_back(spec.root + p);
      }
    }
  };
  std::set<std::string> targets;
  for (const auto& b : spec.binds) {
    if (!cleanAbsolute(b.target) || !targets.insert(b.target).second) {
      return makeError(
          Errc::InvalidSpec,
          fmt::format("jail bind target '{}' is not a clean, unique absolute path", b.target));
    }
    struct stat st {};
    if (::stat(b.source.c_str(), &st) != 0) {
      return makeError(Errc::NotFound, fmt::format("jail bind source {}", b.source), errno);
    }
    add_dir(b.target);
    const bool is_dir = S_ISDIR(st.st_mode);
    if (is_dir && dirs.insert(b.target).second) {
      plan.dirs.push_back(spec.root + b.target);
    }
    plan.mounts.push_back(JailPlan::Mount{b.source, spec.root + b.target, is_dir, b.writable});
  }
  for (const auto& [path, target] : spec.symlinks) {
    if (!cleanAbsolute(path) || !targets.insert(path).second) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("jail symlink '{}' is not a clean, unique absolute path", path));
    }
    add_dir(path);
    plan.links.emplace_back(spec.root + path, target);
  }
  // Parents before children: bind a directory before a file below it is created on top of it.
  std::stable_sort(plan.mounts.begin(), plan.mounts.end(),
                   [](const JailPlan::Mount& a, const JailPlan::Mount& b) {
                     return a.target.size() < b.target.size();
                   });
  return plan;
}

ML_JAIL_CHILD int enterJail(const JailPlan& plan, const char** step) {
  const JailSpec& spec = *plan.spec;
  errno = 0;
  // Nothing we mount may propagate back to the host.
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    return fail(step, "making mounts private");
  }
  if (::mount("tmpfs", spec.root.c_str(), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              "mode=0755,size=64k") != 0) {
    return fail(step, "mounting the jail's tmpfs root");
  }
  for (const std::string& d : plan.dirs) {
    if (::mkdir(d.c_str(), 0755) != 0 && errno != EEXIST) {
      return fail(step, "creating a jail directory");
    }
  }
  for (const auto& m : plan.mounts) {
    if (!m.is_dir) {
      int fd = ::open(m.target.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
      if (fd < 0) {
        return fail(step, "creating a jail mount point");
      }
      (void)::close(fd);
    }
    if (::mount(m.source.c_str(), m.target.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) {
      return fail(step, "binding a path into the jail");
    }
    unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID;  // NOLINT(google-runtime-int)
    if (!m.writable) {
      flags |= MS_RDONLY;
    }
    if (::mount(nullptr, m.target.c_str(), nullptr, flags, nullptr) != 0) {
      return fail(step, "restricting a jail bind");
    }
  }
  for (const auto& [path, target] : plan.links) {
    if (::symlink(target.c_str(), path.c_str()) != 0) {
      return fail(step, "creating a jail symlink");
    }
  }
  if (::mkdir(plan.old_root.c_str(), 0700) != 0) {
    return fail(step, "creating the old-root mount point");
  }
  if (::syscall(SYS_pivot_root, spec.root.c_str(), plan.old_root.c_str()) != 0) {
    return fail(step, "pivot_root into the jail");
  }
  if (::chdir("/") != 0 || ::umount2("/.old", MNT_DETACH) != 0 || ::rmdir("/.old") != 0) {
    return fail(step, "detaching the host's root");
  }
  if (::mount(nullptr, "/", nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
              "mode=0755") != 0) {
    return fail(step, "making the jail's root read-only");
  }
  if (::sethostname(spec.hostname.data(), spec.hostname.size()) != 0) {
    return fail(step, "setting the jail's hostname");
  }
  for (const auto& [resource, value] : spec.rlimits) {
    rlimit lim{value, value};
    if (::setrlimit(resource, &lim) != 0) {
      return fail(step, "setting a resource limit");
    }
  }
  for (int fd : spec.cgroup_fds) {
    if (::write(fd, "0", 1) != 1) {
      return fail(step, "joining the sandbox's cgroup");
    }
  }
  // Every capability out of the bounding set (needs CAP_SETPCAP: before the uid change).
  for (int cap = 0; cap < 64; ++cap) {
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) {
      if (errno == EINVAL) {
        break;  // past the kernel's last capability
      }
      return fail(step, "dropping capabilities");
    }
  }
  if (::setgroups(spec.groups.size(), spec.groups.data()) != 0 ||
      ::setresgid(spec.gid, spec.gid, spec.gid) != 0 ||
      ::setresuid(spec.uid, spec.uid, spec.uid) != 0) {
    return fail(step, "switching to the jail's uid and gid");
  }
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
    return fail(step, "setting no_new_privs");
  }
  return 0;
}

}  // namespace matchlock::sys
