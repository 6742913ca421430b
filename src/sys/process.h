// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "sys/jail.h"

namespace matchlock::sys {

struct SpawnOptions {
  /// Files for stdout/stderr (opened O_APPEND|O_CREAT, 0600); empty = inherit. Same path for
  /// both means one file.
  std::string stdout_path;
  std::string stderr_path;
  /// stdin from /dev/null when true (the default), else inherited.
  bool null_stdin = true;
  /// Start a new session (setsid): the child survives our terminal's signals.
  bool new_session = false;
  /// Extra fds the child inherits at the same numbers (every other fd is CLOEXEC).
  std::vector<int> inherit_fds;
  /// A signal the child gets when the thread that spawned it dies (PR_SET_PDEATHSIG, checked
  /// against the race with a parent that died before it was set); 0 = none.
  int parent_death_signal = 0;
  /// A jail the child enters before exec (planJail; owned by the caller until spawn returns).
  /// Paths in argv are then paths inside the jail.
  const JailPlan* jail = nullptr;
  /// The child's whole environment ("NAME=value" each); nullopt = ours.
  std::optional<std::vector<std::string>> env;
};

/// posix_spawnp's lookup: `name` itself when it holds a slash, else the first executable
/// PATH/name. NotFound when there is none.
Result<std::string> findExecutable(const std::string& name);

/// Our environment reduced to what a long-lived helper of ours needs: PATH, HOME, USER, LANG,
/// LC_*, TZ, TMPDIR, XDG_CACHE_HOME, MATCHLOCK_* and SSL_CERT_*. Everything else (a secret read
/// from an env var, tokens, the caller's proxies) stays out of its /proc/PID/environ and of
/// everything it starts.
std::vector<std::string> minimalEnvironment();

/// How a child ended.
struct ExitInfo {
  int code = 0;    ///< exit status, or 128 + signal
  int signal = 0;  ///< terminating signal, 0 if it exited
};

/// An owned child process: pid, a pidfd (no pid-reuse races) and its start time (procfs field 22,
/// for ProcessRef records). The destructor kills (SIGKILL) and reaps it unless detach() was
/// called.
class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ~ChildProcess();

  static Result<ChildProcess> spawn(const std::vector<std::string>& argv,
                                    const SpawnOptions& options = {});

  pid_t pid() const { return pid_; }
  const Fd& pidfd() const { return pidfd_; }
  uint64_t startTime() const { return start_time_; }
  bool running() const { return pid_ > 0 && !exit_; }

  Status signal(int signo) const;
  /// Non-blocking check; returns the exit once the child has ended (and reaps it).
  Result<std::optional<ExitInfo>> poll();
  /// Waits up to `timeout` for the child to end.
  Result<std::optional<ExitInfo>> waitFor(std::chrono::milliseconds timeout);
  /// SIGTERM, then SIGKILL after `grace`; always reaps. Returns how it ended.
  Result<ExitInfo> terminate(std::chrono::milliseconds grace);
  /// Gives up ownership: the child keeps running and is not reaped by us.
  void detach();

 private:
  pid_t pid_ = -1;
  Fd pidfd_;
  uint64_t start_time_ = 0;
  std::optional<ExitInfo> exit_;
};

}  // namespace matchlock::sys
