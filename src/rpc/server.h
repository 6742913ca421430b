// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>

#include "common/result.h"

namespace matchlock::rpc {

struct ServerOptions {
  int in_fd = 0;   ///< newline-delimited JSON-RPC requests
  int out_fd = 1;  ///< responses and notifications, one object per line, writes serialised
  /// The accelerator `create` boots with (`--accel`).
  std::string accel = "auto";
};

/// `matchlock rpc`: upstream matchlock's JSON-RPC 2.0 surface on stdio (docs/rpc.md). Serves one
/// current sandbox at a time, created by `create` as a normal supervised sandbox owned by this
/// process: when the client goes away without `close` (stdin EOF, a broken stdout, this process
/// killed), the sandbox is stopped and removed, unless `create` asked to keep it. Returns when the
/// client closed or went away.
[[nodiscard]] Status serve(const ServerOptions& options);

}  // namespace matchlock::rpc
