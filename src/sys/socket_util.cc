// SPDX-License-Identifier: Apache-2.0
#include "sys/socket_util.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/tcp.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>

#include <cerrno>
#include <charconv>
#include <cstring>

namespace matchlock::sys {

namespace {

// From <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h>, which clash with glibc's
// socket headers.
constexpr int kSoOriginalDst = 80;
constexpr int kIp6tSoOriginalDst = 80;

bool parseIp(std::string_view ip, SockAddr* out) {
  std::string s(ip);
  sockaddr_in v4{};
  if (::inet_pton(AF_INET, s.c_str(), &v4.sin_addr) == 1) {
    v4.sin_family = AF_INET;
    std::memcpy(&out->storage, &v4, sizeof(v4));
    out->len = sizeof(v4);
    return true;
  }
  sockaddr_in6 v6{};
  if (::inet_pton(AF_INET6, s.c_str(), &v6.sin6_addr) == 1) {
    v6.sin6_family = AF_INET6;
    std::memcpy(&out->storage, &v6, sizeof(v6));
    out->len = sizeof(v6);
    return true;
  }
  return false;
}

bool isWildcard(const SockAddr& addr) {
  if (addr.family() == AF_INET) {
    sockaddr_in v4{};
    std::memcpy(&v4, &addr.storage, sizeof(v4));
    return v4.sin_addr.s_addr == htonl(INADDR_ANY);
  }
  sockaddr_in6 v6{};
  std::memcpy(&v6, &addr.storage, sizeof(v6));
  return IN6_IS_ADDR_UNSPECIFIED(&v6.sin6_addr);
}

}  // namespace

Result<SockAddr> SockAddr::parse(std::string_view text) {
  SockAddr out;
  std::string_view host = text;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string_view::npos) {
      return makeError(Errc::InvalidSpec, fmt::format("bad address '{}'", text));
    }
    host = text.substr(1, close - 1);
    if (close + 1 < text.size()) {
      if (text[close + 1] != ':') {
        return makeError(Errc::InvalidSpec, fmt::format("bad address '{}'", text));
      }
      port_text = text.substr(close + 2);
    }
  } else if (text.find(':') == text.rfind(':') && text.find(':') != std::string_view::npos) {
    size_t colon = text.find(':');
    host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
  }
  if (!parseIp(host, &out)) {
    return makeError(Errc::InvalidSpec, fmt::format("bad address '{}'", text));
  }
  if (!port_text.empty()) {
    unsigned port = 0;
    auto [ptr, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc() || ptr != port_text.data() + port_text.size() || port > 65535) {
      return makeError(Errc::InvalidSpec, fmt::format("bad port in '{}'", text));
    }
    out.setPort(static_cast<uint16_t>(port));
  }
  return out;
}

SockAddr SockAddr::fromIp(std::string_view ip, uint16_t port) {
  SockAddr out;
  if (parseIp(ip, &out)) {
    out.setPort(port);
  }
  return out;
}

uint16_t SockAddr::port() const {
  if (family() == AF_INET) {
    sockaddr_in v4{};
    std::memcpy(&v4, &storage, sizeof(v4));
    return ntohs(v4.sin_port);
  }
  if (family() == AF_INET6) {
    sockaddr_in6 v6{};
    std::memcpy(&v6, &storage, sizeof(v6));
    return ntohs(v6.sin6_port);
  }
  return 0;
}

void SockAddr::setPort(uint16_t port) {
  if (family() == AF_INET) {
    sockaddr_in v4{};
    std::memcpy(&v4, &storage, sizeof(v4));
    v4.sin_port = htons(port);
    std::memcpy(&storage, &v4, sizeof(v4));
  } else if (family() == AF_INET6) {
    sockaddr_in6 v6{};
    std::memcpy(&v6, &storage, sizeof(v6));
    v6.sin6_port = htons(port);
    std::memcpy(&storage, &v6, sizeof(v6));
  }
}

std::string SockAddr::ip() const {
  char buf[INET6_ADDRSTRLEN] = {};
  if (family() == AF_INET) {
    sockaddr_in v4{};
    std::memcpy(&v4, &storage, sizeof(v4));
    ::inet_ntop(AF_INET, &v4.sin_addr, buf, sizeof(buf));
  } else if (family() == AF_INET6) {
    sockaddr_in6 v6{};
    std::memcpy(&v6, &storage, sizeof(v6));
    ::inet_ntop(AF_INET6, &v6.sin6_addr, buf, sizeof(buf));
  }
  return buf;
}

std::string SockAddr::toString() const {
  if (family() == AF_INET6) {
    return fmt::format("[{}]:{}", ip(), port());
  }
  return fmt::format("{}:{}", ip(), port());
}

Result<Fd> listenTcp(const SockAddr& addr, int backlog, bool allow_wildcard) {
  if (!allow_wildcard && isWildcard(addr)) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("refusing to listen on wildcard address {}", addr.toString()));
  }
  Fd fd(::socket(addr.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    return makeError(Errc::System, "socket", errno);
  }
  int one = 1;
  (void)::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd.get(), addr.raw(), addr.len) != 0) {
    return makeError(Errc::System, fmt::format("bind {}", addr.toString()), errno);
  }
  if (::listen(fd.get(), backlog) != 0) {
    return makeError(Errc::System, "listen", errno);
  }
  return fd;
}

Result<Fd> bindUdp(const SockAddr& addr, bool allow_wildcard) {
  if (!allow_wildcard && isWildcard(addr)) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("refusing to bind wildcard address {}", addr.toString()));
  }
  Fd fd(::socket(addr.family(), SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    return makeError(Errc::System, "socket", errno);
  }
  if (::bind(fd.get(), addr.raw(), addr.len) != 0) {
    return makeError(Errc::System, fmt::format("bind {}", addr.toString()), errno);
  }
  return fd;
}

Result<Fd> connectTcpNonBlocking(const SockAddr& addr) {
  Fd fd(::socket(addr.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    return makeError(Errc::System, "socket", errno);
  }
  int one = 1;
  (void)::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (::connect(fd.get(), addr.raw(), addr.len) != 0 && errno != EINPROGRESS) {
    return makeError(Errc::Unavailable, fmt::format("connect {}", addr.toString()), errno);
  }
  return fd;
}

Result<Fd> connectUnixNonBlocking(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return makeError(Errc::InvalidSpec, fmt::format("bad Unix socket path '{}'", path));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    return makeError(Errc::System, "socket", errno);
  }
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return makeError(errno == ENOENT ? Errc::NotFound : Errc::Unavailable,
                     fmt::format("connect {}", path), errno);
  }
  return fd;
}

Result<Fd> listenUnix(const std::string& path, int backlog) {
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) {
    return makeError(Errc::System, "socket", errno);
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return makeError(Errc::InvalidSpec, fmt::format("socket path too long: {}", path));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  (void)::unlink(path.c_str());
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return makeError(Errc::System, fmt::format("bind {}", path), errno);
  }
  (void)::chmod(path.c_str(), 0600);
  if (::listen(fd.get(), backlog) != 0) {
    return makeError(Errc::System, fmt::format("listen {}", path), errno);
  }
  return fd;
}

Result<Fd> acceptNonBlocking(int listen_fd, SockAddr* peer) {
  SockAddr tmp;
  tmp.len = sizeof(tmp.storage);
  int fd = ::accept4(listen_fd, tmp.raw(), &tmp.len, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) {
      return Fd();
    }
    return makeError(Errc::System, "accept4", errno);
  }
  int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (peer != nullptr) {
    *peer = tmp;
  }
  return Fd(fd);
}

int socketError(int fd) {
  int err = 0;
  socklen_t len = sizeof(err);
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
    return errno;
  }
  return err;
}

Result<SockAddr> localAddress(int fd) {
  SockAddr out;
  out.len = sizeof(out.storage);
  if (::getsockname(fd, out.raw(), &out.len) != 0) {
    return makeError(Errc::System, "getsockname", errno);
  }
  return out;
}

Result<SockAddr> originalDestination(int fd) {
  SockAddr out;
  ML_ASSIGN_OR_RETURN(SockAddr local, localAddress(fd));
  out.len = sizeof(out.storage);
  int rc = local.family() == AF_INET6
               ? ::getsockopt(fd, SOL_IPV6, kIp6tSoOriginalDst, out.raw(), &out.len)
               : ::getsockopt(fd, SOL_IP, kSoOriginalDst, out.raw(), &out.len);
  if (rc != 0) {
    return makeError(Errc::NotFound, "SO_ORIGINAL_DST", errno);
  }
  return out;
}

Status setTimeouts(int fd, int timeout_ms) {
  timeval tv{};
  tv.tv_sec = timeout_ms / 1000;
  tv.tv_usec = static_cast<suseconds_t>(timeout_ms % 1000) * 1000;
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
      ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
    return makeError(Errc::System, "setsockopt timeouts", errno);
  }
  return ok();
}

Status requireSameUid(int fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return makeError(Errc::System, "SO_PEERCRED", errno);
  }
  if (cred.uid != ::geteuid()) {
    return makeError(Errc::PermissionDenied,
                     fmt::format("refused a connection from uid {} (pid {}): only uid {} may use "
                                 "this sandbox",
                                 cred.uid, cred.pid, ::geteuid()));
  }
  return ok();
}

}  // namespace matchlock::sys
