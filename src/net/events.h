// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

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

}  // namespace matchlock::net
