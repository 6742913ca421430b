// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace matchlock::guestproto {

/// Messages on an exec stream (port 5000): one stream per process. Each message is
/// u8 kind, u32 big-endian length, payload. See schema/guest-protocol.v1.md.
enum class ExecKind : uint8_t {
  Start = 1,     ///< host -> guest, JSON ExecRequest; first message of the stream
  Started = 2,   ///< guest -> host, JSON {"pid": n}
  Stdin = 3,     ///< host -> guest, bytes
  StdinEof = 4,  ///< host -> guest, empty
  Stdout = 5,    ///< guest -> host, bytes (the terminal's output in TTY mode)
  Stderr = 6,    ///< guest -> host, bytes (never in TTY mode)
  Resize = 7,    ///< host -> guest, u16 rows, u16 cols
  Signal = 8,    ///< host -> guest, u32 signal number, delivered to the process group
  Exit = 9,      ///< guest -> host, JSON ExecExit; last message of the stream
};

inline constexpr uint32_t kMaxExecMessage = 1024 * 1024;

struct ExecRequest {
  std::vector<std::string> argv;  ///< non-empty; argv[0] resolved through PATH in the guest
  std::map<std::string, std::string> env;
  std::string cwd;   ///< empty: the user's home or /
  std::string user;  ///< "uid", "uid:gid", "name" or "name:group"; empty: root
  bool tty = false;
  uint16_t rows = 24;
  uint16_t cols = 80;
  /// Seconds between SIGTERM and SIGKILL of the process group when the exec is cancelled.
  uint32_t kill_grace_seconds = 5;
};

struct ExecExit {
  int code = 0;       ///< exit status, or 128 + signal when killed by a signal
  int signal = 0;     ///< the terminating signal, 0 when it exited
  std::string error;  ///< set when the process could not be started (code 127 or 126)
};

struct ExecMessage {
  ExecKind kind = ExecKind::Stdout;
  std::string payload;
};

std::string encodeExecMessage(ExecKind kind, std::string_view payload);
/// The Start message's JSON payload (encodeStart without the message header).
std::string startPayload(const ExecRequest& request);
std::string encodeStart(const ExecRequest& request);
std::string encodeResize(uint16_t rows, uint16_t cols);
std::string encodeSignal(uint32_t signo);
std::string encodeExit(const ExecExit& exit);

Result<ExecRequest> decodeStart(std::string_view payload);
Result<std::pair<uint16_t, uint16_t>> decodeResize(std::string_view payload);
Result<uint32_t> decodeSignal(std::string_view payload);
Result<ExecExit> decodeExit(std::string_view payload);

/// Incremental reader of exec messages from a stream's data.
class ExecMessageReader {
 public:
  Status feed(std::string_view bytes);
  std::optional<ExecMessage> next();

 private:
  std::string buf_;
  std::deque<ExecMessage> ready_;
  bool failed_ = false;
};

}  // namespace matchlock::guestproto
