// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "common/fd.h"
#include "ev/loop.h"
#include "guest/agent/confine.h"
#include "guestproto/exec.h"
#include "guestproto/mux.h"

namespace matchlock::guest {

/// One process run for one exec stream (port 5000): spawns it from the Start message, pumps
/// stdin/stdout/stderr (or a pty) with backpressure in both directions, forwards resizes and
/// signals, and reports Exit after the output is drained. The agent owns sessions, routes stream
/// events and reaped exit statuses to them, and destroys a session once done() is true.
class ExecSession {
 public:
  /// `activity` runs whenever the session queued something on the mux or finished, so the owner
  /// can flush the channel (the session's own fd callbacks run outside the owner's code paths).
  ExecSession(ev::Loop& loop, guestproto::Mux& mux, uint32_t stream, std::function<void()> activity,
              std::string cgroup_procs = "",
              const std::map<std::string, std::string>* base_env = nullptr, bool service = false,
              Isolation isolation = Isolation::Full);
  ExecSession(const ExecSession&) = delete;
  ExecSession& operator=(const ExecSession&) = delete;
  ExecSession(ExecSession&&) = delete;
  ExecSession& operator=(ExecSession&&) = delete;
  ~ExecSession();

  void onData(std::string_view data);
  /// The host will send nothing more (half-close): stdin ends.
  void onRemoteClose();
  /// The stream is gone (client disconnected or cancelled): terminate the process group.
  void onReset();
  /// The process was reaped with this wait status.
  void onExit(int wait_status);
  /// The mux may have gained credit: resume reading output that was paused.
  void resume();

  pid_t pid() const { return pid_; }
  bool done() const { return done_; }

 private:
  void start(std::string_view payload);
  /// The process a Start payload asks for: an ExecRequest, or for a service stream the agent's
  /// own binary in its `__service` mode (root, cwd /, no sandbox env).
  Result<guestproto::ExecRequest> requestOf(std::string_view payload) const;
  /// The child's exec report: EOF (exec succeeded: relay its output) or a failure. Read from the
  /// loop, never waited for: a child whose chdir or exec goes through a host-served mount needs
  /// this very process to relay its FUSE requests.
  void onExecReport();
  void fail(int code, const std::string& error);
  void readOutput(Fd& fd, ev::Watch& watch, guestproto::ExecKind kind);
  void writeStdin();
  void closeStdinIfDone();
  void maybeFinish();
  void finish();
  void cancel();
  void send(std::string bytes);

  ev::Loop& loop_;
  guestproto::Mux& mux_;
  uint32_t stream_;
  std::function<void()> activity_;
  std::string cgroup_procs_;
  const std::map<std::string, std::string>* base_env_ = nullptr;  ///< owned by the Agent
  bool service_ = false;
  Isolation isolation_ = Isolation::Full;  ///< None for service streams
  guestproto::ExecMessageReader reader_;
  bool started_ = false;
  bool tty_ = false;
  bool stream_gone_ = false;
  bool done_ = false;
  bool stdin_eof_ = false;
  bool finished_early_ = false;
  bool tty_eof_sent_ = false;  // exec failed; Exit already sent, waiting only to reap
  pid_t pid_ = -1;
  std::optional<int> exit_status_;
  uint32_t kill_grace_seconds_ = 5;

  Fd stdin_;
  Fd stdout_;  // the pty master in TTY mode
  Fd stderr_;
  ev::Watch stdin_watch_;
  ev::Watch stdout_watch_;
  ev::Watch stderr_watch_;
  std::string stdin_buf_;
  size_t withheld_credit_ = 0;
  ev::Timer kill_timer_;
  ev::Timer drain_timer_;
  Fd report_;  ///< the child's CLOEXEC error pipe until it has exec'd or failed
  ev::Watch report_watch_;
  std::string cwd_;
  std::string argv0_;
};

}  // namespace matchlock::guest
