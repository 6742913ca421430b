// SPDX-License-Identifier: Apache-2.0
#include "common/file_lock.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>

#include <thread>

namespace matchlock {
namespace {

int flockOp(FileLock::Mode mode) {
  return mode == FileLock::Mode::Shared ? LOCK_SH : LOCK_EX;
}

}  // namespace

Result<FileLock> FileLock::acquire(const std::string& path, Mode mode) {
  ML_ASSIGN_OR_RETURN(Fd fd, openFile(path, O_RDWR | O_CREAT, 0600));
  while (::flock(fd.get(), flockOp(mode)) != 0) {
    if (errno != EINTR) {
      return makeError(Errc::System, fmt::format("flock {}", path), errno);
    }
  }
  return FileLock(std::move(fd));
}

Result<std::optional<FileLock>> FileLock::tryAcquire(const std::string& path, Mode mode) {
  ML_ASSIGN_OR_RETURN(Fd fd, openFile(path, O_RDWR | O_CREAT, 0600));
  while (::flock(fd.get(), flockOp(mode) | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return std::optional<FileLock>();
    }
    if (errno != EINTR) {
      return makeError(Errc::System, fmt::format("flock {}", path), errno);
    }
  }
  return std::optional<FileLock>(FileLock(std::move(fd)));
}

Result<FileLock> FileLock::acquireWithin(const std::string& path, Mode mode,
                                         std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    ML_ASSIGN_OR_RETURN(std::optional<FileLock> lock, tryAcquire(path, mode));
    if (lock) {
      return std::move(*lock);
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return makeError(Errc::Conflict,
                       fmt::format("{} is still locked after {} ms", path, timeout.count()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace matchlock
