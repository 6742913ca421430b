// SPDX-License-Identifier: Apache-2.0
#include "common/fd.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

namespace matchlock {

void Fd::reset(int fd) {
  if (fd_ >= 0) {
    // Linux always releases the descriptor, even on EINTR; retrying could close a reused fd.
    (void)::close(fd_);
  }
  fd_ = fd;
}

Result<Fd> Fd::dup() const {
  int fd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) {
    return makeError(Errc::System, "dup", errno);
  }
  return Fd(fd);
}

Result<Pipe> Pipe::create(int extra_flags) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | extra_flags) != 0) {
    return makeError(Errc::System, "pipe2", errno);
  }
  return Pipe{Fd(fds[0]), Fd(fds[1])};
}

Result<Fd> openFile(const std::string& path, int flags, unsigned mode) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) {
    int err = errno;
    Errc code = err == ENOENT                     ? Errc::NotFound
                : (err == EACCES || err == EPERM) ? Errc::PermissionDenied
                                                  : Errc::System;
    return makeError(code, fmt::format("open {}", path), err);
  }
  return Fd(fd);
}

Status readFileChunks(const std::string& path, const std::function<void(std::string_view)>& chunk) {
  ML_ASSIGN_OR_RETURN(Fd fd, openFile(path, O_RDONLY));
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return makeError(Errc::System, fmt::format("read {}", path), errno);
    }
    if (n == 0) {
      return ok();
    }
    chunk(std::string_view(buf, static_cast<size_t>(n)));
  }
}

Result<std::string> readFile(const std::string& path) {
  std::string out;
  ML_RETURN_IF_ERROR(readFileChunks(path, [&](std::string_view c) { out.append(c); }));
  return out;
}

bool writeAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return false;
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

bool sendSome(int fd, std::string& buf) {
  size_t sent = 0;
  while (sent < buf.size()) {
    ssize_t n = ::send(fd, buf.data() + sent, buf.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    buf.erase(0, sent);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
  buf.clear();
  return true;
}

Status writeFileAtomic(const std::string& path, std::string_view data, unsigned mode) {
  std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  {
    ML_ASSIGN_OR_RETURN(Fd fd, openFile(tmp, O_WRONLY | O_CREAT | O_TRUNC, mode));
    size_t off = 0;
    while (off < data.size()) {
      ssize_t n = ::write(fd.get(), data.data() + off, data.size() - off);
      if (n < 0) {
        if (errno == EINTR) {
          continue;
        }
        int err = errno;
        (void)::unlink(tmp.c_str());
        return makeError(Errc::System, fmt::format("write {}", tmp), err);
      }
      off += static_cast<size_t>(n);
    }
    if (::fsync(fd.get()) != 0) {
      int err = errno;
      (void)::unlink(tmp.c_str());
      return makeError(Errc::System, fmt::format("fsync {}", tmp), err);
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    (void)::unlink(tmp.c_str());
    return makeError(Errc::System, fmt::format("rename {} -> {}", tmp, path), err);
  }
  return ok();
}

}  // namespace matchlock
