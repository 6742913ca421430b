// SPDX-License-Identifier: Apache-2.0
#include "sys/process.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include "sys/process_ref.h"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace matchlock::sys {
namespace {

// glibc 2.36's <sys/pidfd.h> lacks extern "C", so C++ cannot link its declarations: use the
// system calls directly (Linux >= 5.3).
int pidfdOpen(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}
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

Result<ChildProcess> ChildProcess::spawn(const std::vector<std::string>& argv,
                                         const SpawnOptions& options) {
  if (argv.empty()) {
    return makeError(Errc::Internal, "spawn with an empty argv");
  }
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&actions);
  posix_spawnattr_init(&attr);
  struct Cleanup {
    posix_spawn_file_actions_t* a;
    posix_spawnattr_t* b;
    ~Cleanup() {
      posix_spawn_file_actions_destroy(a);
      posix_spawnattr_destroy(b);
    }
  } cleanup{&actions, &attr};
  if (options.null_stdin) {
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  }
  if (!options.stdout_path.empty()) {
    posix_spawn_file_actions_addopen(&actions, 1, options.stdout_path.c_str(),
                                     O_WRONLY | O_CREAT | O_APPEND, 0600);
  }
  if (!options.stderr_path.empty()) {
    if (options.stderr_path == options.stdout_path) {
      posix_spawn_file_actions_adddup2(&actions, 1, 2);
    } else {
      posix_spawn_file_actions_addopen(&actions, 2, options.stderr_path.c_str(),
                                       O_WRONLY | O_CREAT | O_APPEND, 0600);
    }
  }
  for (int fd : options.inherit_fds) {
    // dup2 onto itself clears FD_CLOEXEC in the child (glibc >= 2.29 semantics).
    posix_spawn_file_actions_adddup2(&actions, fd, fd);
  }
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;  // NOLINT(google-runtime-int)
  if (options.new_session) {
    flags |= POSIX_SPAWN_SETSID;
  }
  posix_spawnattr_setflags(&attr, flags);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  sigset_t all;
  sigfillset(&all);
  posix_spawnattr_setsigdefault(&attr, &all);

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
  pid_t pid = 0;
  int rc = ::posix_spawnp(&pid, args[0], &actions, &attr, args.data(),
                          options.env ? envp.data() : environ);
  if (rc != 0) {
    return makeError(rc == ENOENT ? Errc::NotFound : Errc::System,
                     fmt::format("spawning {}", argv[0]), rc);
  }
  ChildProcess child;
  child.pid_ = pid;
  child.pidfd_ = Fd(pidfdOpen(pid));
  if (!child.pidfd_) {
    int err = errno;
    (void)::kill(pid, SIGKILL);
    (void)::waitpid(pid, nullptr, 0);
    child.pid_ = -1;
    return makeError(Errc::System, "pidfd_open", err);
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
