// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/fd.h"
#include "common/result.h"

namespace matchlock::net {

/// One proxied (or blocked) request, in the shape of upstream's `event` notification with a
/// `network` payload (reference §2.4). Byte counts are body bytes actually relayed (upstream only
/// reports Content-Length). Never carries secret values: URLs are taken before substitution.
struct NetworkEvent {
  int64_t timestamp = 0;  ///< Unix seconds, as upstream
  std::string method;
  std::string url;  ///< scheme://host/path (no query: it may carry placeholders)
  std::string host;
  std::string path;
  int status_code = 0;
  uint64_t request_bytes = 0;
  uint64_t response_bytes = 0;
  int64_t duration_ms = 0;
  bool blocked = false;
  std::string block_reason;
};

/// {"type":"network","timestamp":...,"network":{...}} on one line (no trailing newline).
std::string toJsonLine(const NetworkEvent& event);

/// Receives events on the proxy's loop thread; must not block.
using EventSink = std::function<void(const NetworkEvent&)>;

/// An append-only JSON-lines file of events with a size bound: when the next line would take
/// it past `max_bytes`, it is renamed to `<path>.1` (replacing the previous one) and a new file
/// is started, so a guest that floods the proxy with requests costs the host at most twice
/// `max_bytes` of disk. Writes are unbuffered appends of whole lines; a failed write is dropped
/// (events must never stall the proxy). Single-threaded: the proxy's loop thread.
class EventLog {
 public:
  static constexpr uint64_t kDefaultMaxBytes = 8ULL << 20;
  [[nodiscard]] static Result<std::unique_ptr<EventLog>> open(
      std::string path, uint64_t max_bytes = kDefaultMaxBytes);
  void append(const NetworkEvent& event);
  const std::string& path() const { return path_; }

 private:
  EventLog(std::string path, uint64_t max_bytes) : path_(std::move(path)), max_(max_bytes) {}
  Status reopen();

  std::string path_;
  uint64_t max_;
  uint64_t size_ = 0;
  Fd fd_;
};

}  // namespace matchlock::net
