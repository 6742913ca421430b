// SPDX-License-Identifier: Apache-2.0
#include "guest/agent/confine.h"

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstddef>

namespace matchlock::guest {
namespace {

// glibc 2.36 lacks wrappers for these (Linux >= 5.3).
int pidfdOpen(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

#if defined(__x86_64__)
constexpr uint32_t kNativeArch = AUDIT_ARCH_X86_64;
constexpr uint32_t kX32Bit = 0x40000000;
// The i386 numbers of the same calls (an IA-32 binary on a kernel with IA32_EMULATION).
constexpr uint32_t kI386Ptrace = 26;
constexpr uint32_t kI386KexecLoad = 283;
constexpr uint32_t kI386ProcessVmReadv = 347;
constexpr uint32_t kI386ProcessVmWritev = 348;
#else
#error "the exec seccomp filter knows x86_64 only"
#endif

constexpr uint32_t kDeny = SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA);

// clang-format off
/// The filter: native calls checked by number, x32 calls refused outright, i386 calls checked
/// by their own numbers, any other architecture refused.
const std::array<sock_filter, 22> kFilter = {{
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_I386, 12, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kNativeArch, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, kDeny),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, kX32Bit, 6, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ptrace, 5, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_process_vm_readv, 4, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_process_vm_writev, 3, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_kexec_load, 2, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_kexec_file_load, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    BPF_STMT(BPF_RET | BPF_K, kDeny),
    BPF_STMT(BPF_RET | BPF_K, kDeny),  // padding: keeps the i386 jump target below fixed
    // i386
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kI386Ptrace, 4, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kI386KexecLoad, 3, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kI386ProcessVmReadv, 2, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kI386ProcessVmWritev, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    BPF_STMT(BPF_RET | BPF_K, kDeny),
    BPF_STMT(BPF_RET | BPF_K, kDeny),
}};
// clang-format on

constexpr std::array<int, 5> kDroppedCaps = {CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_MODULE,
                                             CAP_SYS_RAWIO, CAP_SYS_BOOT};

}  // namespace

[[noreturn]] void runExecInit() {
  (void)::prctl(PR_SET_NAME, "exec-init", 0, 0, 0);  // comm, not "exe" (/proc/self/exe)
  // Nothing of the agent's may stay open here (its fds are CLOEXEC; this is the belt).
  (void)::syscall(SYS_close_range, 4U, ~0U, 0U);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  (void)::sigprocmask(SIG_BLOCK, &chld, nullptr);
  int sfd = ::signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  char byte = 0;
  while (::read(3, &byte, 1) != 0) {
    if (errno != EINTR) {
      break;  // EOF is the signal; an error means the agent is gone: go on all the same
    }
  }
  (void)::close(3);
  // pid 2 is the exec's process; gone already (or never started) is fine: reap and leave.
  int exec_fd = pidfdOpen(2);
  for (;;) {
    bool children = false;
    for (;;) {
      int status = 0;
      pid_t pid = ::waitpid(-1, &status, WNOHANG);
      if (pid > 0) {
        continue;
      }
      if (pid < 0 && errno == EINTR) {
        continue;
      }
      children = pid == 0;
      break;
    }
    if (!children && exec_fd < 0) {
      ::_exit(0);  // the exec and everything it left are gone: the namespace goes with us
    }
    std::array<pollfd, 2> fds = {pollfd{sfd, POLLIN, 0}, pollfd{exec_fd, POLLIN, 0}};
    int n = ::poll(fds.data(), exec_fd >= 0 ? 2 : 1, -1);
    if (n < 0 && errno != EINTR) {
      ::_exit(1);
    }
    if (exec_fd >= 0 && (fds[1].revents & (POLLIN | POLLHUP)) != 0) {
      // Its orphans are ours from this moment on.
      (void)::close(exec_fd);
      exec_fd = -1;
    }
    signalfd_siginfo info{};
    while (::read(sfd, &info, sizeof(info)) == static_cast<ssize_t>(sizeof(info))) {
    }
  }
}

Result<ExecPidNamespace> ExecPidNamespace::enter() {
  ExecPidNamespace ns;
  ns.own_ns_ = Fd(::open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC));
  if (!ns.own_ns_) {
    return makeError(Errc::System, "opening /proc/self/ns/pid", errno);
  }
  int go[2];
  if (::pipe2(go, O_CLOEXEC) != 0) {
    return makeError(Errc::System, "pipe", errno);
  }
  Fd go_read(go[0]);
  ns.go_ = Fd(go[1]);
  if (::unshare(CLONE_NEWPID) != 0) {
    ns.own_ns_.reset();  // nothing to return from
    return makeError(Errc::System, "a PID namespace for the exec (unshare)", errno);
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    return makeError(Errc::System, "starting the exec's init (fork)", errno);
  }
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::setsid();
    int fd = go_read.get();
    if ((fd == 3 ? ::fcntl(3, F_SETFD, 0) : ::dup2(fd, 3)) < 0) {
      ::_exit(127);
    }
    char name[] = "matchlock-exec-init";
    char* argv[] = {name, nullptr};
    char* envp[] = {nullptr};
    ::execve("/proc/self/exe", argv, envp);
    ::_exit(127);
  }
  return ns;
}

void ExecPidNamespace::release() {
  if (own_ns_) {
    // Our own (active) namespace: setns to it is always allowed.
    (void)::setns(own_ns_.get(), CLONE_NEWPID);
    own_ns_.reset();
  }
  go_.reset();
}

ExecPidNamespace::~ExecPidNamespace() {
  release();
}

int confineMounts() {
  if (::unshare(CLONE_NEWNS) != 0) {
    return errno;
  }
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_SLAVE, nullptr) != 0) {
    return errno;
  }
  if (::mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0) {
    return errno;
  }
  return 0;
}

int hardenProcess() {
  for (int cap : kDroppedCaps) {
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) {
      return errno;
    }
  }
  // Nothing to regain them through: the ambient set is emptied too (the inheritable set of the
  // guest's PID 1, whence every exec comes, is empty from the kernel).
  if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) {
    return errno;
  }
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
    return errno;
  }
  sock_fprog prog{static_cast<uint16_t>(kFilter.size()),
                  const_cast<sock_filter*>(kFilter.data())};  // NOLINT: the kernel copies it
  if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) {
    return errno;
  }
  return 0;
}

}  // namespace matchlock::guest
