// SPDX-License-Identifier: Apache-2.0
#include "sys/process.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <optional>

#include "sys/process_ref.h"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace matchlock::sys {
namespace {

// glibc 2.36's <sys/pidfd.h> lacks extern "C", so C++ cannot link its declarations: use the
// system calls directly (Linux >= 5.3).
int pidfdSendSignal(int pidfd, int sig) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

ExitInfo fromSiginfo(const siginfo_t& info) {
  ExitInfo e;
  if (info.si_code == CLD_EXITED) {
    e.code = info.si_status;
  } else {
    e.signal = info.si_status;
    e.code = 128 + info.si_status;
  }
  return e;
}

}  // namespace

ChildProcess::ChildProcess(ChildProcess&& other) noexcept {
  *this = std::move(other);
}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    if (running()) {
      (void)terminate(std::chrono::milliseconds(0));
    }
    pid_ = other.pid_;
    pidfd_ = std::move(other.pidfd_);
    start_time_ = other.start_time_;
    exit_ = other.exit_;
    other.pid_ = -1;
    other.exit_.reset();
  }
  return *this;
}

ChildProcess::~ChildProcess() {
  if (running()) {
    (void)pidfdSendSignal(pidfd_.get(), SIGKILL);
    siginfo_t info{};
    (void)::waitid(P_PIDFD, static_cast<id_t>(pidfd_.get()), &info, WEXITED);
  }
}

namespace {

/// Everything the child needs, prepared by the parent: the child shares our memory until it
/// execs (CLONE_VM | CLONE_VFORK), so it only makes system calls and writes `error`.
struct SpawnPlan {
  const char* path = nullptr;
  char* const* argv = nullptr;
  char* const* envp = nullptr;
  const SpawnOptions* options = nullptr;
  int parent_pidfd = -1;  ///< ours, for the death-signal race check
  int error = 0;          ///< errno of the step that failed in the child (0: it exec'd)
  const char* step = "exec";
};

// The child functions run on a stack of their own in our memory and never return: no sanitizer
// bookkeeping (ASan would leave that stack's shadow poisoned after the child has gone).
#define ML_SPAWN_CHILD __attribute__((no_sanitize("address", "undefined")))

ML_SPAWN_CHILD int redirect(const std::string& path, int target) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) {
    return -1;
  }
  int rc = ::dup2(fd, target);
  (void)::close(fd);
  return rc;
}

[[noreturn]] ML_SPAWN_CHILD void childFailed(SpawnPlan* plan, const char* step) {
  // Never 0: the parent takes 0 for "it exec'd".
  plan->error = errno != 0 ? errno : EINVAL;
  plan->step = step;
  ::_exit(127);
}

ML_SPAWN_CHILD int spawnChild(void* arg) {
  auto* plan = static_cast<SpawnPlan*>(arg);
  const SpawnOptions& o = *plan->options;
  // Our own copy of the handler table (no CLONE_SIGHAND): nothing of the parent's runs here.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    (void)::sigaction(sig, &dfl, nullptr);
  }
  if (o.new_session && ::setsid() < 0) {
    childFailed(plan, "setsid");
  }
  // Files first: their paths are the host's, not the jail's.
  if (o.null_stdin) {
    int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || ::dup2(fd, 0) < 0) {
      childFailed(plan, "opening /dev/null");
    }
    (void)::close(fd);
  }
  if (!o.stdout_path.empty() && redirect(o.stdout_path, 1) < 0) {
    childFailed(plan, "opening the output file");
  }
  if (!o.stderr_path.empty()) {
    int rc = o.stderr_path == o.stdout_path ? ::dup2(1, 2) : redirect(o.stderr_path, 2);
    if (rc < 0) {
      childFailed(plan, "opening the error file");
    }
  }
  for (int fd : o.inherit_fds) {
    int flags = ::fcntl(fd, F_GETFD);
    if (flags < 0 || ::fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC) < 0) {
      childFailed(plan, "passing a descriptor");
    }
  }
  if (o.jail != nullptr) {
    const char* step = "entering the jail";
    if (int err = enterJail(*o.jail, &step); err != 0) {
      errno = err;
      childFailed(plan, step);
    }
  }
  if (o.parent_death_signal != 0) {
    // After any uid change (which clears it). Then the race: a parent that died before we
    // asked has signalled nothing, so look at it through its pidfd (getppid() says nothing in
    // a new PID namespace).
    if (::prctl(PR_SET_PDEATHSIG, o.parent_death_signal) != 0) {
      childFailed(plan, "setting the parent-death signal");
    }
    pollfd p{plan->parent_pidfd, POLLIN, 0};
    if (::poll(&p, 1, 0) != 0) {
      errno = ESRCH;
      childFailed(plan, "checking the parent");
    }
  }
  sigset_t none;
  sigemptyset(&none);
  (void)::sigprocmask(SIG_SETMASK, &none, nullptr);
  ::execve(plan->path, plan->argv, plan->envp);
  childFailed(plan, "exec");
}

}  // namespace

Result<std::string> findExecutable(const std::string& name) {
  if (name.find('/') != std::string::npos) {
    return name;
  }
  const char* path = std::getenv("PATH");
  std::string_view dirs = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (!dirs.empty()) {
    size_t colon = dirs.find(':');
    std::string_view dir = dirs.substr(0, colon);
    dirs = colon == std::string_view::npos ? std::string_view() : dirs.substr(colon + 1);
    std::string candidate = fmt::format("{}/{}", dir.empty() ? "." : dir, name);
    if (::access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return makeError(Errc::NotFound, fmt::format("{} is not in PATH", name), ENOENT);
}

Result<ChildProcess> ChildProcess::spawn(const std::vector<std::string>& argv,
                                         const SpawnOptions& options) {
  if (argv.empty()) {
    return makeError(Errc::Internal, "spawn with an empty argv");
  }
  auto path = findExecutable(argv[0]);
  if (!path) {
    return makeError(Errc::NotFound, fmt::format("spawning {}", argv[0]), ENOENT);
  }
  std::vector<char*> args;
  for (const std::string& a : argv) {
    args.push_back(const_cast<char*>(a.c_str()));  // NOLINT(cppcoreguidelines-pro-type-const-cast)
  }
  args.push_back(nullptr);
  std::vector<char*> envp;
  if (options.env) {
    for (const std::string& e : *options.env) {
      envp.push_back(
          const_cast<char*>(e.c_str()));  // NOLINT(cppcoreguidelines-pro-type-const-cast)
    }
    envp.push_back(nullptr);
  }
  SpawnPlan plan;
  plan.path = path->c_str();
  plan.argv = args.data();
  plan.envp = options.env ? envp.data() : environ;
  plan.options = &options;
  Fd parent_pidfd;
  if (options.parent_death_signal != 0) {
    parent_pidfd = Fd(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
    if (!parent_pidfd) {
      return makeError(Errc::System, "pidfd_open of ourselves", errno);
    }
    plan.parent_pidfd = parent_pidfd.get();
  }
  int flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD;
  if (options.jail != nullptr) {
    flags |= jailCloneFlags();
  }

  // The child runs on a stack of its own, in our memory, until it execs; with every signal
  // blocked no handler of ours can run in it meanwhile.
  constexpr size_t kStack = size_t{256} * 1024;
  void* stack = ::mmap(nullptr, kStack, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  if (stack == MAP_FAILED) {
    return makeError(Errc::System, "allocating a spawn stack", errno);
  }
  sigset_t all;
  sigset_t old;
  sigfillset(&all);
  (void)::pthread_sigmask(SIG_SETMASK, &all, &old);
  int pidfd = -1;
  pid_t pid = ::clone(spawnChild, static_cast<char*>(stack) + kStack, flags, &plan, &pidfd);
  int clone_errno = errno;
  (void)::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  (void)::munmap(stack, kStack);
  if (pid < 0) {
    return makeError(Errc::System, fmt::format("spawning {}", argv[0]), clone_errno);
  }
  ChildProcess child;
  child.pid_ = pid;
  child.pidfd_ = Fd(pidfd);
  if (plan.error != 0) {
    // The child failed before exec (and exited 127): reap it and report why.
    siginfo_t info{};
    (void)::waitid(P_PIDFD, static_cast<id_t>(pidfd), &info, WEXITED);
    child.pid_ = -1;
    return makeError(plan.error == ENOENT ? Errc::NotFound : Errc::System,
                     fmt::format("spawning {}: {}", argv[0], plan.step), plan.error);
  }
  child.start_time_ = processStartTime(pid).value_or(0);
  return child;
}

Status ChildProcess::signal(int signo) const {
  if (!running()) {
    return makeError(Errc::Conflict, "process is not running");
  }
  if (pidfdSendSignal(pidfd_.get(), signo) != 0) {
    return makeError(Errc::System, fmt::format("signal {} to pid {}", signo, pid_), errno);
  }
  return ok();
}

Result<std::optional<ExitInfo>> ChildProcess::poll() {
  if (exit_) {
    return exit_;
  }
  if (pid_ <= 0) {
    return makeError(Errc::Conflict, "no process");
  }
  siginfo_t info{};
  if (::waitid(P_PIDFD, static_cast<id_t>(pidfd_.get()), &info, WEXITED | WNOHANG) != 0) {
    return makeError(Errc::System, "waitid", errno);
  }
  if (info.si_pid == 0) {
    return std::optional<ExitInfo>();
  }
  exit_ = fromSiginfo(info);
  return exit_;
}

Result<std::optional<ExitInfo>> ChildProcess::waitFor(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    ML_ASSIGN_OR_RETURN(auto e, poll());
    if (e) {
      return e;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return std::optional<ExitInfo>();
    }
    pollfd p{pidfd_.get(), POLLIN, 0};
    (void)::poll(&p, 1, static_cast<int>(left.count()));
  }
}

Result<ExitInfo> ChildProcess::terminate(std::chrono::milliseconds grace) {
  if (exit_) {
    return *exit_;
  }
  if (grace.count() > 0) {
    (void)signal(SIGTERM);
    ML_ASSIGN_OR_RETURN(auto e, waitFor(grace));
    if (e) {
      return *e;
    }
  }
  (void)signal(SIGKILL);
  ML_ASSIGN_OR_RETURN(auto e, waitFor(std::chrono::seconds(30)));
  if (!e) {
    return makeError(Errc::System, fmt::format("pid {} survived SIGKILL for 30 s", pid_));
  }
  return *e;
}

void ChildProcess::detach() {
  pid_ = -1;
  pidfd_.reset();
}

std::vector<std::string> minimalEnvironment() {
  static constexpr std::array<std::string_view, 7> kExact = {
      "PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR", "XDG_CACHE_HOME"};
  static constexpr std::array<std::string_view, 3> kPrefixes = {"LC_", "MATCHLOCK_", "SSL_CERT_"};
  std::vector<std::string> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view entry(*e);
    std::string_view name = entry.substr(0, entry.find('='));
    bool keep = std::find(kExact.begin(), kExact.end(), name) != kExact.end() ||
                std::any_of(kPrefixes.begin(), kPrefixes.end(),
                            [&](std::string_view p) { return name.starts_with(p); });
    if (keep) {
      out.emplace_back(entry);
    }
  }
  return out;
}

}  // namespace matchlock::sys
