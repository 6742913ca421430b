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

Result<std::unique_ptr<EventLog>> EventLog::open(std::string path, uint64_t max_bytes) {
  std::unique_ptr<EventLog> log(new EventLog(std::move(path), max_bytes));
  ML_RETURN_IF_ERROR(log->reopen());
  return log;
}

Status EventLog::reopen() {
  ML_ASSIGN_OR_RETURN(fd_, openFile(path_, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  struct stat st {};
  size_ = ::fstat(fd_.get(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  return ok();
}

void EventLog::append(const NetworkEvent& event) {
  std::string line = toJsonLine(event) + "\n";
  if (size_ > 0 && size_ + line.size() > max_) {
    const std::string previous = path_ + ".1";
    if (::rename(path_.c_str(), previous.c_str()) != 0 || !reopen()) {
      ML_LOG(net, warn, "rotating {}: errno {}; events are dropped", path_, errno);
      fd_.reset();
      return;
    }
  }
  if (!fd_) {
    return;
  }
  ssize_t n = ::write(fd_.get(), line.data(), line.size());
  if (n > 0) {
    size_ += static_cast<uint64_t>(n);
  }
}

}  // namespace matchlock::net
