// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <string>
#include <vector>

#include "common/result.h"

namespace matchlock::sys {

/// A root of its own for one child process, entered between fork and exec (SpawnOptions::jail):
/// new mount, PID, IPC, UTS and network namespaces; a read-only tmpfs root that holds only the
/// listed binds and symlinks (the host's root is detached after pivot_root); every capability
/// out of the bounding set; an unprivileged uid and gid; no_new_privs; rlimits; optionally a
/// cgroup joined before exec. docs/threat-model.md, "The jailed VMM".
struct JailSpec {
  /// An empty directory on the host: the tmpfs is mounted on it in the child's own mount
  /// namespace only, so nothing of the jail is visible on the host.
  std::string root;
  struct Bind {
    std::string source;     ///< host path (file, directory or device node)
    std::string target;     ///< absolute path inside the jail
    bool writable = false;  ///< read-only unless asked
  };
  std::vector<Bind> binds;
  /// Symlinks inside the jail: {path, target}.
  std::vector<std::pair<std::string, std::string>> symlinks;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  ///< supplementary groups (e.g. the kvm group)
  std::vector<std::pair<int, rlim_t>> rlimits;
  /// An open cgroup.procs (or v1 tasks) file per hierarchy, joined before exec.
  std::vector<int> cgroup_fds;
  std::string hostname = "jail";
};

/// Everything the child needs, computed before the fork (the child only makes system calls
/// with these strings).
struct JailPlan {
  struct Mount {
    std::string source;
    std::string target;  ///< host-side path under the root, before pivot_root
    bool is_dir = false;
    bool writable = false;
  };
  const JailSpec* spec = nullptr;
  std::string old_root;           ///< root + "/.old"
  std::vector<std::string> dirs;  ///< to create, parents first
  std::vector<Mount> mounts;
  std::vector<std::pair<std::string, std::string>> links;  ///< {host-side path, target}
};

/// Checks `spec` and lays out what the child will do. Errors name the offending path.
Result<JailPlan> planJail(const JailSpec& spec);

/// The clone flags a jailed child is created with.
int jailCloneFlags();

/// Child side, between fork and exec: enters the jail. Returns 0 or the errno of the step that
/// failed; `step` names it (static string).
int enterJail(const JailPlan& plan, const char** step);

}  // namespace matchlock::sys
