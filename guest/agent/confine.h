// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/types.h>

#include "common/fd.h"
#include "common/result.h"

namespace matchlock::guest {

/// How an exec's process is confined inside the guest (docs/threat-model.md, "Inside the guest").
enum class Isolation {
  None,        ///< the agent's own helpers (`__service`): run next to the agent
  Namespaces,  ///< `privileged`: own PID and mount namespace, every capability kept
  Full,        ///< the default: namespaces, capabilities cut, no_new_privs, seccomp
};

/// argv[0] of the init of an exec's PID namespace: main() runs runExecInit() for it.
inline constexpr const char* kExecInitName = "matchlock-exec-init";

/// PID 1 of one exec's PID namespace. The exec's process is pid 2 there but the agent's child
/// (so the agent reaps it and reports its real status); this init reaps what it leaves behind.
/// It lives while anything does: a daemon an exec started (`setsid -f server`) outlives the
/// exec, in that exec's namespace. fd 3 is a pipe that reaches EOF once pid 2 exists.
[[noreturn]] void runExecInit();

/// The PID namespace of one exec, entered for the agent's next children: construction starts
/// its init (the first child, so pid 1 there); the next fork is the exec's process (pid 2).
/// Destruction (or release()) returns our later children to our own namespace and lets the
/// init watch pid 2.
class ExecPidNamespace {
 public:
  static Result<ExecPidNamespace> enter();
  ExecPidNamespace(ExecPidNamespace&&) noexcept = default;
  ExecPidNamespace& operator=(ExecPidNamespace&&) noexcept = default;
  ExecPidNamespace(const ExecPidNamespace&) = delete;
  ExecPidNamespace& operator=(const ExecPidNamespace&) = delete;
  ~ExecPidNamespace();

  /// Back to our namespace for later children; the init goes on to watch pid 2.
  void release();

 private:
  ExecPidNamespace() = default;
  Fd own_ns_;  ///< our /proc/self/ns/pid, to return to
  Fd go_;      ///< write end of the init's fd 3
};

/// Child side, after fork and before exec (system calls only). A mount namespace of the exec's
/// own (mounts propagate in from the agent, never out) with a /proc of its PID namespace, so
/// that the agent and the other execs are not in view. Returns 0 or an errno.
int confineMounts();

/// Child side, before the user switch: the capabilities upstream removes (SYS_PTRACE,
/// SYS_ADMIN, SYS_MODULE, SYS_RAWIO, SYS_BOOT) leave the bounding set, no_new_privs is set and
/// a seccomp filter returns EPERM for ptrace, process_vm_readv/writev, kexec_load and
/// kexec_file_load. Returns 0 or an errno.
int hardenProcess();

}  // namespace matchlock::guest
