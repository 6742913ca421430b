// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"
#include "guestproto/exec.h"

namespace matchlock::runtime {

/// One exec (or guest service) relayed through a sandbox supervisor's control socket, driven by
/// an ev::Loop: the non-blocking counterpart of runExec() for servers that run many at once
/// (`matchlock rpc`, port forwards). Closing or destroying it cancels: the supervisor resets the
/// guest stream and the guest terminates the process group.
///
/// Flow control is end to end: the supervisor grants the guest credit only for bytes that reached
/// this socket, so pauseOutput() (stop reading) pushes back to the guest process's stdout.
class ExecChannel {
 public:
  struct Callbacks {
    /// The guest started the process (exec), or the service.
    std::function<void()> on_started;
    /// Stdout or Stderr bytes, in order.
    std::function<void(guestproto::ExecKind kind, std::string_view data)> on_output;
    /// The process ended (or could not start: exit.error is set). Last callback.
    std::function<void(const guestproto::ExecExit& exit)> on_exit;
    /// The supervisor refused the request or the connection broke. Last callback.
    std::function<void(const Error& error)> on_error;
    /// Everything queued (stdin) has been written to the supervisor.
    std::function<void()> on_drained;
  };

  /// `op` is "exec" (start = guestproto::startPayload's JSON request) or "service" (start = the
  /// service's JSON request, schema/guest-protocol.v1.md). Callbacks run on the loop, never from
  /// inside open(); the owner must not destroy the channel from inside one of them (post it
  /// instead).
  [[nodiscard]] static Result<std::unique_ptr<ExecChannel>> open(ev::Loop& loop,
                                                                 const std::string& control_socket,
                                                                 std::string_view op,
                                                                 std::string_view start,
                                                                 Callbacks callbacks);
  ExecChannel(const ExecChannel&) = delete;
  ExecChannel& operator=(const ExecChannel&) = delete;
  ExecChannel(ExecChannel&&) = delete;
  ExecChannel& operator=(ExecChannel&&) = delete;
  ~ExecChannel();

  /// Queues bytes for the process's stdin (split into exec messages).
  void sendStdin(std::string_view data);
  void stdinEof();
  void resize(uint16_t rows, uint16_t cols);
  void signal(uint32_t signo);
  /// Cancels: closes the connection. No callback runs afterwards.
  void close();
  /// Stops (or resumes) reading the process's output.
  void pauseOutput(bool paused);
  /// Bytes queued towards the supervisor (stdin not yet written).
  size_t pendingInput() const { return out_.size(); }
  bool finished() const { return !fd_; }

 private:
  ExecChannel(ev::Loop& loop, Fd fd, Callbacks callbacks)
      : loop_(loop), fd_(std::move(fd)), cb_(std::move(callbacks)) {}
  void onEvents(uint32_t events);
  void onReadable();
  void flush();
  void updateInterest();
  void fail(Error error);
  void queue(std::string bytes);

  ev::Loop& loop_;
  Fd fd_;
  Callbacks cb_;
  ev::Watch watch_;
  std::string out_;
  std::string line_;  // the supervisor's reply line, until complete
  bool have_reply_ = false;
  bool paused_ = false;
  guestproto::ExecMessageReader reader_;
};

/// How a guest service ended (callService).
struct ServiceResult {
  guestproto::ExecExit exit;
  std::string err;  ///< its stderr (the reason, on failure)
};

/// Runs one guest service (port 5003) to completion on a private loop, for commands such as
/// `matchlock cp`: `input_fd` (or -1) is streamed to its stdin in chunks and its stdout goes to
/// `sink` as it arrives. Bounded by `timeout`: on expiry the service is cancelled.
[[nodiscard]] Result<ServiceResult> callService(const std::string& control_socket,
                                                std::string_view request, int input_fd,
                                                const std::function<void(std::string_view)>& sink,
                                                std::chrono::milliseconds timeout);

}  // namespace matchlock::runtime
