// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>

#include "common/fd.h"
#include "common/result.h"
#include "guestproto/exec.h"

namespace matchlock::runtime {

struct ExecClientOptions {
  guestproto::ExecRequest request;
  /// Forward our stdin (-i). Without it the process gets an immediate EOF.
  bool forward_stdin = false;
  /// How long to wait for the supervisor's control socket to accept.
  int connect_timeout_ms = 10000;
};

/// Connects to a supervisor's control socket, retrying until `timeout_ms` (it may be starting).
[[nodiscard]] Result<Fd> connectControl(const std::string& path, int timeout_ms);

/// Runs one process in a sandbox through its supervisor's control socket and relays stdio
/// (and, with a TTY, raw mode and window size) until it exits. Ctrl-C without a TTY cancels:
/// the connection closes and the guest terminates the process group. Returns the process's exit
/// code (128 + signal when killed).
Result<int> runExec(const std::string& control_socket, const ExecClientOptions& options);

/// Sends a one-line JSON request ({"op": "stop"} or "status") and returns the reply line.
Result<std::string> controlRequest(const std::string& control_socket, const std::string& op,
                                   int timeout_ms = 5000);
/// The same with a whole request object already serialized as one JSON line (no newline).
Result<std::string> controlRequestLine(const std::string& control_socket,
                                       const std::string& request, int timeout_ms = 5000);

}  // namespace matchlock::runtime
