// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string_view>

namespace matchlock::guest {

/// `matchlock-guest __service <json>`: one guest service, run by the agent as a child process
/// for a port-5003 stream (schema/guest-protocol.v1.md), with the stream's Stdin/Stdout/Stderr as
/// its stdio. Blocking I/O is fine here: this is not the agent's loop.
///
/// - `{"op": "write", "path", "mode"}`: stdin to the file, parents created 0755, the mode (0 means
///   0644) applied to new and existing files alike.
/// - `{"op": "read", "path", "max_bytes"}`: a regular file to stdout, refused above max_bytes.
/// - `{"op": "list", "path"}`: a JSON array of `{"name", "size", "mode", "mod_time", "is_dir"}`.
/// - `{"op": "forward", "port", "host"}`: a TCP connection to host:port (127.0.0.1 by default)
///   relayed to stdin/stdout; stdin's EOF half-closes it.
///
/// Errors go to stderr as one line; the exit code is 0 on success, 1 on failure, 64 on a bad
/// request.
int runService(std::string_view request);

}  // namespace matchlock::guest
