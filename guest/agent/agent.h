// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "ev/loop.h"
#include "guest/agent/exec_session.h"
#include "guest/agent/vfs_relay.h"
#include "guestproto/mux.h"

namespace matchlock::guest {

/// The guest side of the host<->guest channel: speaks guestproto over one byte stream, runs exec
/// sessions, reaps children (it is PID 1 in the VM), announces readiness on port 5002 and obeys
/// the host's shutdown request.
class Agent {
 public:
  struct Options {
    /// A virtio-serial port reports "host not connected" as EOF/HUP: wait for the host (again)
    /// instead of exiting. For a socket (tests) EOF ends the agent.
    bool reconnectable = false;
    std::string version = "0.1.0";
    /// cgroup.procs file every exec'd process joins ("" = none).
    std::string cgroup_procs;
    /// Environment every exec starts from (under the request's own env).
    std::map<std::string, std::string> base_env;
    /// How execs are confined (Namespaces when the sandbox is privileged).
    Isolation isolation = Isolation::Full;
    /// Host-served filesystems, mounted when the host first connects and before the agent
    /// reports ready (a failed mount is reported instead of readiness).
    std::vector<VfsRelay::Spec> vfs;
  };

  /// Takes ownership of `channel` (made non-blocking). Blocks SIGCHLD for its signalfd.
  static Result<std::unique_ptr<Agent>> create(ev::Loop& loop, Fd channel, Options options);
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;
  Agent(Agent&&) = delete;
  Agent& operator=(Agent&&) = delete;
  ~Agent();

  /// Set when the host asked for a shutdown; the loop is stopped.
  bool shutdownRequested() const { return shutdown_; }

 private:
  Agent(ev::Loop& loop, Fd channel, Fd sigchld, Options options);
  Status init();
  void newMux();
  void onReadable(uint32_t events);
  void onDisconnected();
  void flush();
  void reap();
  void onControl(uint32_t stream, std::string_view data);
  void sweep();
  /// Coalesced flush + sweep on the next loop turn (sessions call it from their fd callbacks).
  void scheduleFlush();

  ev::Loop& loop_;
  Fd channel_;
  Fd sigchld_;
  Options options_;
  ev::Watch channel_watch_;
  ev::Watch sigchld_watch_;
  ev::Timer reconnect_timer_;
  std::unique_ptr<guestproto::Mux> mux_;
  std::string out_;
  std::map<uint32_t, std::unique_ptr<ExecSession>> sessions_;  // by stream
  /// Sessions whose stream is gone but whose process still runs (being terminated).
  std::map<pid_t, std::unique_ptr<ExecSession>> orphaned_;
  std::map<uint32_t, std::string> control_;  // host-opened port 5002 streams
  std::vector<std::unique_ptr<VfsRelay>> relays_;
  bool vfs_mounted_ = false;
  /// Mounts the host-served filesystems (first connection only) and attaches each to a new VFS
  /// stream. Returns "" or why a mount failed.
  std::string startVfs();
  VfsRelay* relayFor(uint32_t stream);
  bool shutdown_ = false;
  bool flush_scheduled_ = false;
  bool mux_started_ = false;
};

}  // namespace matchlock::guest
