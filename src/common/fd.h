// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <functional>
#include <string>
#include <string_view>

#include "common/result.h"

namespace matchlock {

/// Owning, move-only file descriptor. Closes in its destructor (EINTR is not retried: on Linux the
/// descriptor is released even when close() reports EINTR).
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset(other.release());
    }
    return *this;
  }
  ~Fd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  /// Gives up ownership and returns the descriptor.
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  /// Closes the current descriptor (if any) and takes ownership of `fd`.
  void reset(int fd = -1);
  /// Duplicates with O_CLOEXEC.
  Result<Fd> dup() const;

 private:
  int fd_ = -1;
};

/// A CLOEXEC pipe.
struct Pipe {
  Fd read;
  Fd write;
  static Result<Pipe> create(int extra_flags = 0);
};

/// Opens `path` with O_CLOEXEC added.
Result<Fd> openFile(const std::string& path, int flags, unsigned mode = 0);

/// Reads a whole file into a string.
Result<std::string> readFile(const std::string& path);

/// Streams a file through `chunk` (64 KiB at a time) without holding it in memory.
Status readFileChunks(const std::string& path, const std::function<void(std::string_view)>& chunk);

/// Writes all of `data` to a blocking fd (retrying on EINTR and short writes). False on error,
/// with errno set.
bool writeAll(int fd, std::string_view data);

/// Non-blocking send of as much of `buf` as the socket takes now (MSG_NOSIGNAL), erasing what was
/// sent. False on a hard error (the peer is gone); true when all was sent or the socket is full.
bool sendSome(int fd, std::string& buf);

/// Writes `data` to `path` atomically (temp file in the same directory, fsync, rename).
Status writeFileAtomic(const std::string& path, std::string_view data, unsigned mode = 0644);

}  // namespace matchlock
