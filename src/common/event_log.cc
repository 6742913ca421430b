// SPDX-License-Identifier: Apache-2.0
#include "common/event_log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <map>

#include "common/log.h"

namespace matchlock {

Result<std::unique_ptr<EventLog>> EventLog::open(std::string path, uint64_t max_bytes) {
  std::unique_ptr<EventLog> log(new EventLog(std::move(path), max_bytes));
  ML_RETURN_IF_ERROR(log->reopen());
  return log;
}

Result<std::shared_ptr<EventLog>> EventLog::shared(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::weak_ptr<EventLog>> logs;
  std::lock_guard lock(mu);
  if (auto it = logs.find(path); it != logs.end()) {
    if (auto live = it->second.lock()) {
      return live;
    }
  }
  ML_ASSIGN_OR_RETURN(std::unique_ptr<EventLog> log, open(path));
  std::shared_ptr<EventLog> shared(std::move(log));
  logs[path] = shared;
  return shared;
}

Status EventLog::reopen() {
  int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) {
    return makeError(Errc::System, "opening " + path_, errno);
  }
  fd_.reset(fd);
  struct stat st {};
  size_ = ::fstat(fd_.get(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  return ok();
}

void EventLog::append(std::string_view text) {
  std::string line(text);
  line += '\n';
  std::lock_guard lock(mu_);
  if (size_ > 0 && size_ + line.size() > max_) {
    const std::string previous = path_ + ".1";
    if (::rename(path_.c_str(), previous.c_str()) != 0 || !reopen()) {
      ML_LOG(common, warn, "rotating {}: errno {}; events are dropped", path_, errno);
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

}  // namespace matchlock
