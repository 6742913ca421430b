// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "common/fd.h"
#include "common/result.h"

namespace matchlock {

/// An append-only JSON-lines file of a sandbox's events (network events from the proxy, file
/// events from the VFS) with a size bound: when the next line would take it past `max_bytes`,
/// it is renamed to `<path>.1` (replacing the previous one) and a new file is started, so a
/// guest that floods the proxy or its mounts with operations costs the host at most twice
/// `max_bytes` of disk. Writes are unbuffered appends of whole lines; a failed write is dropped
/// (events must never stall the data path). Thread-safe: the proxy's thread and the supervisor's
/// loop share one instance per file (shared()).
class EventLog {
 public:
  static constexpr uint64_t kDefaultMaxBytes = 8ULL << 20;
  [[nodiscard]] static Result<std::unique_ptr<EventLog>> open(
      std::string path, uint64_t max_bytes = kDefaultMaxBytes);
  /// The process's one writer of `path`: every layer that logs events of a sandbox appends
  /// through the same instance, so that rotation sees every line.
  [[nodiscard]] static Result<std::shared_ptr<EventLog>> shared(const std::string& path);
  /// Appends one line (a newline is added).
  void append(std::string_view line);
  const std::string& path() const { return path_; }

 private:
  EventLog(std::string path, uint64_t max_bytes) : path_(std::move(path)), max_(max_bytes) {}
  Status reopen();

  std::mutex mu_;
  std::string path_;
  uint64_t max_;
  uint64_t size_ = 0;
  Fd fd_;
};

}  // namespace matchlock
