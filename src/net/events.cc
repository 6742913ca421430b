// SPDX-License-Identifier: Apache-2.0
#include "net/events.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>

#include <nlohmann/json.hpp>

#include "common/log.h"

namespace matchlock::net {

std::string toJsonLine(const NetworkEvent& e) {
  nlohmann::json network = {
      {"method", e.method},
      {"url", e.url},
      {"host", e.host},
      {"path", e.path},
      {"status_code", e.status_code},
      {"request_bytes", e.request_bytes},
      {"response_bytes", e.response_bytes},
      {"duration_ms", e.duration_ms},
      {"blocked", e.blocked},
  };
  if (e.blocked) {
    network["block_reason"] = e.block_reason;
  }
  nlohmann::json event = {{"type", "network"}, {"timestamp", e.timestamp}, {"network", network}};
  // Replace invalid UTF-8 rather than throwing: paths come from the network.
  return event.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace matchlock::net
