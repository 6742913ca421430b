// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "common/fd.h"
#include "common/result.h"

namespace matchlock::sys {

/// An IPv4 or IPv6 socket address (value type).
struct SockAddr {
  sockaddr_storage storage{};
  socklen_t len = 0;

  /// Parses "1.2.3.4:80", "[::1]:80", or an address without port (port 0).
  static Result<SockAddr> parse(std::string_view text);
  static SockAddr fromIp(std::string_view ip, uint16_t port);
  int family() const { return storage.ss_family; }
  uint16_t port() const;
  void setPort(uint16_t port);
  /// The address without port ("1.2.3.4" or "::1").
  std::string ip() const;
  /// "1.2.3.4:80" or "[::1]:80".
  std::string toString() const;
  const sockaddr* raw() const { return reinterpret_cast<const sockaddr*>(&storage); }
  sockaddr* raw() { return reinterpret_cast<sockaddr*>(&storage); }
};

/// A non-blocking, CLOEXEC TCP listener bound to `addr` (SO_REUSEADDR). Refuses the wildcard
/// address unless `allow_wildcard`: sandbox-facing listeners must bind to the sandbox side only.
Result<Fd> listenTcp(const SockAddr& addr, int backlog = 512, bool allow_wildcard = false);

/// A non-blocking, CLOEXEC UDP socket bound to `addr`.
Result<Fd> bindUdp(const SockAddr& addr, bool allow_wildcard = false);

/// Starts a non-blocking connect; completion is signalled by writability (check with
/// socketError()).
Result<Fd> connectTcpNonBlocking(const SockAddr& addr);

/// A non-blocking, CLOEXEC connection to the Unix stream socket at `path`. Unix sockets connect
/// at once or fail (a full backlog is EAGAIN: an error here, not a wait).
Result<Fd> connectUnixNonBlocking(const std::string& path);

/// A non-blocking, CLOEXEC Unix stream listener at `path`, mode 0600 (a stale socket file there
/// is replaced).
Result<Fd> listenUnix(const std::string& path, int backlog = 64);

/// Checks a connected Unix socket's peer (SO_PEERCRED): ok when it runs as our effective uid,
/// a PermissionDenied error naming its uid and pid otherwise.
Status requireSameUid(int fd);

/// accept4 with SOCK_NONBLOCK|SOCK_CLOEXEC. Returns an empty Fd on EAGAIN.
Result<Fd> acceptNonBlocking(int listen_fd, SockAddr* peer = nullptr);

/// The pending SO_ERROR of a socket (0 when none).
int socketError(int fd);

/// The local address of a socket.
Result<SockAddr> localAddress(int fd);

/// The destination a connection had before an nftables/iptables REDIRECT or DNAT
/// (SO_ORIGINAL_DST, IPv4 only; IP6T_SO_ORIGINAL_DST for IPv6).
Result<SockAddr> originalDestination(int fd);

/// Sets a receive/send timeout (SO_RCVTIMEO/SO_SNDTIMEO) for blocking sockets.
Status setTimeouts(int fd, int timeout_ms);

}  // namespace matchlock::sys
