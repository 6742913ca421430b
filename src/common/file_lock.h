// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <optional>
#include <string>

#include "common/fd.h"
#include "common/result.h"

namespace matchlock {

/// An flock held until destruction (closing the descriptor releases it). The kernel drops the lock
/// when the holder dies, so a SIGKILLed holder never leaves a stale lock behind.
class FileLock {
 public:
  enum class Mode { Shared, Exclusive };
  /// Blocks until the lock is granted. The file is created (0600) if needed.
  [[nodiscard]] static Result<FileLock> acquire(const std::string& path, Mode mode);
  /// Tries without blocking; nullopt when another holder has it.
  [[nodiscard]] static Result<std::optional<FileLock>> tryAcquire(const std::string& path,
                                                                  Mode mode);
  /// Waits at most `timeout`; Errc::Conflict naming the path when it is still held.
  [[nodiscard]] static Result<FileLock> acquireWithin(const std::string& path, Mode mode,
                                                      std::chrono::milliseconds timeout);

  /// The lock's descriptor (e.g. to write the holder's pid into the file).
  int fd() const { return fd_.get(); }

 private:
  explicit FileLock(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;
};

}  // namespace matchlock
