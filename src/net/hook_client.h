// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"

namespace matchlock::net {

/// One call to an SDK callback socket (reference §4.8, docs/egress.md "SDK callbacks"): connects
/// to the Unix socket, writes the request as one JSON line, half-closes, and reads one JSON
/// answer (ended by a newline or by the peer closing). Bounded by `timeout` and by kMaxAnswer
/// bytes. `done` runs once, on the loop, with the answer's bytes or the reason it failed; it
/// may destroy the client. Destroying the client earlier cancels the call (no callback).
class HookClient {
 public:
  using Done = std::function<void(Result<std::string>)>;
  static constexpr size_t kMaxAnswer = size_t{48} << 20;  ///< a 32 MiB body, base64'd

  /// Fails at once (no callback) when the socket cannot be reached.
  static Result<std::unique_ptr<HookClient>> start(ev::Loop& loop, const std::string& socket,
                                                   std::string request,
                                                   std::chrono::milliseconds timeout, Done done);
  HookClient(const HookClient&) = delete;
  HookClient& operator=(const HookClient&) = delete;
  HookClient(HookClient&&) = delete;
  HookClient& operator=(HookClient&&) = delete;
  ~HookClient() = default;

 private:
  HookClient(Fd fd, std::string request, Done done)
      : fd_(std::move(fd)), out_(std::move(request)), done_(std::move(done)) {}
  void onEvent(uint32_t events);
  void finish(Result<std::string> r);

  Fd fd_;
  ev::Watch watch_;
  ev::Timer timer_;
  std::string out_;
  std::string in_;
  Done done_;
  bool shut_ = false;
};

}  // namespace matchlock::net
