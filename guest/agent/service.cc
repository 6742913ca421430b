// SPDX-License-Identifier: Apache-2.0
#include "guest/agent/service.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>

#include <nlohmann/json.hpp>

#include "common/fd.h"

namespace matchlock::guest {
namespace {

using Json = nlohmann::json;

int failWith(const std::string& message, int code = 1) {
  std::string line = message + "\n";
  (void)!::write(STDERR_FILENO, line.data(), line.size());
  return code;
}

std::string errnoText(int err) {
  return std::strerror(err);
}

/// Creates every missing directory above `path` with mode 0755.
int makeParents(const std::string& path) {
  for (size_t at = path.find('/', 1); at != std::string::npos; at = path.find('/', at + 1)) {
    std::string dir = path.substr(0, at);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      return errno;
    }
  }
  return 0;
}

int doWrite(const std::string& path, uint32_t mode) {
  if (int err = makeParents(path); err != 0) {
    return failWith(fmt::format("write {}: creating parent directories: {}", path, errnoText(err)));
  }
  mode_t m = mode == 0 ? 0644 : static_cast<mode_t>(mode & 07777);
  Fd file(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, m));
  if (!file) {
    return failWith(fmt::format("write {}: {}", path, errnoText(errno)));
  }
  const int fd = file.get();
  // The umask must not narrow the requested mode, and an existing file takes it too.
  if (::fchmod(fd, m) != 0) {
    int err = errno;
    return failWith(fmt::format("write {}: chmod: {}", path, errnoText(err)));
  }
  char buf[64 * 1024];
  for (;;) {
    ssize_t n = ::read(STDIN_FILENO, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      int err = errno;
      return failWith(fmt::format("write {}: reading the content: {}", path, errnoText(err)));
    }
    if (n == 0) {
      break;
    }
    if (!writeAll(fd, std::string_view(buf, static_cast<size_t>(n)))) {
      int err = errno;
      return failWith(fmt::format("write {}: {}", path, errnoText(err)));
    }
  }
  if (::close(file.release()) != 0) {  // a late write error (quota, I/O) surfaces here
    return failWith(fmt::format("write {}: {}", path, errnoText(errno)));
  }
  return 0;
}

int doRead(const std::string& path, uint64_t max_bytes) {
  Fd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  const int fd = file.get();
  if (!file) {
    return failWith(fmt::format("read {}: {}", path, errnoText(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return failWith(fmt::format("read {}: not a regular file", path));
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return failWith(fmt::format("read {}: file too large ({} bytes, the limit is {})", path,
                                st.st_size, max_bytes));
  }
  (void)::fcntl(fd, F_SETFL, 0);
  char buf[64 * 1024];
  uint64_t total = 0;
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      int err = errno;
      return failWith(fmt::format("read {}: {}", path, errnoText(err)));
    }
    if (n == 0) {
      break;
    }
    total += static_cast<uint64_t>(n);
    if (total > max_bytes) {  // grew while we read it
      return failWith(fmt::format("read {}: file too large (the limit is {})", path, max_bytes));
    }
    if (!writeAll(STDOUT_FILENO, std::string_view(buf, static_cast<size_t>(n)))) {
      return 1;  // the host went away
    }
  }
  return 0;
}

/// Go's os.FileMode bits, which upstream's agent sends as `mode`.
uint32_t goFileMode(mode_t m) {
  uint32_t mode = m & 0777;
  switch (m & S_IFMT) {
    case S_IFDIR:
      mode |= 1U << 31;
      break;
    case S_IFLNK:
      mode |= 1U << 27;
      break;
    case S_IFBLK:
      mode |= 1U << 26;
      break;
    case S_IFCHR:
      mode |= (1U << 26) | (1U << 21);
      break;
    case S_IFIFO:
      mode |= 1U << 25;
      break;
    case S_IFSOCK:
      mode |= 1U << 24;
      break;
    default:
      break;
  }
  if ((m & S_ISUID) != 0) {
    mode |= 1U << 23;
  }
  if ((m & S_ISGID) != 0) {
    mode |= 1U << 22;
  }
  if ((m & S_ISVTX) != 0) {
    mode |= 1U << 20;
  }
  return mode;
}

/// RFC 3339 in UTC with nanoseconds, trailing zeros trimmed (Go's time.Time in JSON).
std::string rfc3339(const timespec& ts) {
  tm t{};
  ::gmtime_r(&ts.tv_sec, &t);
  char head[32];
  std::strftime(head, sizeof(head), "%Y-%m-%dT%H:%M:%S", &t);
  std::string out = head;
  if (ts.tv_nsec != 0) {
    std::string frac = fmt::format("{:09d}", ts.tv_nsec);
    frac.erase(frac.find_last_not_of('0') + 1);
    out += "." + frac;
  }
  return out + "Z";
}

int doList(const std::string& path) {
  int dfd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    return failWith(fmt::format("list {}: {}", path, errnoText(errno)));
  }
  DIR* dir = ::fdopendir(dfd);  // owns dfd from here on
  if (dir == nullptr) {
    int err = errno;
    (void)::close(dfd);
    return failWith(fmt::format("list {}: {}", path, errnoText(err)));
  }
  Json files = Json::array();
  while (dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") {
      continue;
    }
    struct stat st {};
    if (::fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
      continue;  // vanished meanwhile
    }
    files.push_back({{"name", name},
                     {"size", static_cast<int64_t>(st.st_size)},
                     {"mode", goFileMode(st.st_mode)},
                     {"mod_time", rfc3339(st.st_mtim)},
                     {"is_dir", S_ISDIR(st.st_mode)}});
  }
  (void)::closedir(dir);
  std::string out = files.dump() + "\n";
  return writeAll(STDOUT_FILENO, out) ? 0 : 1;
}

int doForward(const std::string& host, int port) {
  sockaddr_storage addr{};
  socklen_t len = 0;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&addr);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&addr);
  if (::inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(static_cast<uint16_t>(port));
    len = sizeof(*v4);
  } else if (::inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(static_cast<uint16_t>(port));
    len = sizeof(*v6);
  } else {
    return failWith(fmt::format("forward: '{}' is not an IP address", host), 64);
  }
  Fd socket_fd(::socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const int sock = socket_fd.get();
  if (!socket_fd || ::connect(sock, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    return failWith(
        fmt::format("forward: connecting to {}:{} in the guest: {}", host, port, errnoText(errno)));
  }
  bool in_open = true;   // host -> guest service
  bool out_open = true;  // guest service -> host
  char buf[64 * 1024];
  while (in_open || out_open) {
    pollfd fds[2] = {{STDIN_FILENO, static_cast<short>(in_open ? POLLIN : 0), 0},
                     {sock, static_cast<short>(out_open ? POLLIN : 0), 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) {
        continue;
      }
      break;
    }
    if (in_open && (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      ssize_t n = ::read(STDIN_FILENO, buf, sizeof(buf));
      if (n > 0) {
        if (!writeAll(sock, std::string_view(buf, static_cast<size_t>(n)))) {
          break;  // the guest service reset the connection
        }
      } else if (n == 0 || errno != EINTR) {
        in_open = false;
        (void)::shutdown(sock, SHUT_WR);
      }
    }
    if (out_open && (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      ssize_t n = ::read(sock, buf, sizeof(buf));
      if (n > 0) {
        if (!writeAll(STDOUT_FILENO, std::string_view(buf, static_cast<size_t>(n)))) {
          break;  // the host went away
        }
      } else if (n == 0 || errno != EINTR) {
        out_open = false;
        (void)::close(STDOUT_FILENO);  // EOF towards the host
      }
    }
  }
  return 0;
}

int serve(std::string_view request) {
  Json j = Json::parse(request, nullptr, false);
  if (!j.is_object()) {
    return failWith("service: the request is not a JSON object", 64);
  }
  std::string op = j.value("op", "");
  std::string path = j.value("path", "");
  if (op == "forward") {
    int port = j.value("port", 0);
    if (port < 1 || port > 65535) {
      return failWith(fmt::format("forward: port {} is out of range", port), 64);
    }
    return doForward(j.value("host", "127.0.0.1"), port);
  }
  if (path.empty() || path[0] != '/') {
    return failWith(fmt::format("{}: the path must be absolute, got '{}'", op, path), 64);
  }
  if (op == "write") {
    return doWrite(path, j.value("mode", 0U));
  }
  if (op == "read") {
    return doRead(path, j.value("max_bytes", uint64_t{16} << 20));
  }
  if (op == "list") {
    return doList(path);
  }
  return failWith(fmt::format("service: unknown op '{}'", op), 64);
}

}  // namespace

int runService(std::string_view request) {
  // A peer that went away (the host, or the guest server of a forward) is a write error here,
  // not a silent death by SIGPIPE that would hide the reason.
  (void)std::signal(SIGPIPE, SIG_IGN);
  try {
    return serve(request);
  } catch (const Json::exception& e) {
    return failWith(fmt::format("service: bad request: {}", e.what()), 64);
  }
}

}  // namespace matchlock::guest
