// SPDX-License-Identifier: Apache-2.0
#include "sys/netns.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

namespace matchlock::sys {
namespace {

constexpr const char* kNetnsDir = "/run/netns";

Status ifreqName(ifreq& ifr, const std::string& name) {
  if (name.empty() || name.size() >= IFNAMSIZ) {
    return makeError(Errc::InvalidSpec, fmt::format("interface name '{}' is not 1-15 bytes", name));
  }
  std::memcpy(ifr.ifr_name, name.c_str(), name.size() + 1);
  return ok();
}

Result<Fd> inetSocket() {
  Fd fd(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd) {
    return makeError(Errc::System, "socket(AF_INET)", errno);
  }
  return fd;
}

Status setFlagsUp(int sock, ifreq& ifr) {
  if (::ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) {
    return makeError(Errc::System, fmt::format("SIOCGIFFLAGS {}", ifr.ifr_name), errno);
  }
  ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP);  // NOLINT(google-runtime-int)
  if (::ioctl(sock, SIOCSIFFLAGS, &ifr) != 0) {
    return makeError(Errc::System, fmt::format("SIOCSIFFLAGS {}", ifr.ifr_name), errno);
  }
  return ok();
}

}  // namespace

std::string netnsPath(const std::string& name) {
  return fmt::format("{}/{}", kNetnsDir, name);
}

bool netnsExists(const std::string& name) {
  struct stat st {};
  return ::stat(netnsPath(name).c_str(), &st) == 0;
}

Status createNetns(const std::string& name) {
  if (name.empty() || name.find('/') != std::string::npos || name[0] == '.') {
    return makeError(Errc::InvalidSpec, fmt::format("bad namespace name '{}'", name));
  }
  if (::mkdir(kNetnsDir, 0755) != 0 && errno != EEXIST) {
    return makeError(Errc::System, fmt::format("mkdir {}", kNetnsDir), errno);
  }
  const std::string path = netnsPath(name);
  {
    Fd f(::open(path.c_str(), O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444));
    if (!f) {
      return makeError(errno == EEXIST ? Errc::Conflict : Errc::System,
                       fmt::format("creating {}", path), errno);
    }
  }
  Status result = ok();
  std::thread worker([&] {
    // Only this helper thread moves into the new namespace; it ends right after the bind mount.
    if (::unshare(CLONE_NEWNET) != 0) {
      result = makeError(Errc::System, "unshare(CLONE_NEWNET)", errno);
      return;
    }
    if (::mount("/proc/thread-self/ns/net", path.c_str(), nullptr, MS_BIND, nullptr) != 0) {
      result =
          makeError(Errc::System, fmt::format("bind-mounting the namespace on {}", path), errno);
    }
  });
  worker.join();
  if (!result) {
    (void)::unlink(path.c_str());
  }
  return result;
}

Result<Fd> openNetns(const std::string& name) {
  const std::string path = netnsPath(name);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    return makeError(errno == ENOENT ? Errc::NotFound : Errc::System,
                     fmt::format("opening {}", path), errno);
  }
  return fd;
}

Status deleteNetns(const std::string& name) {
  const std::string path = netnsPath(name);
  if (::umount2(path.c_str(), MNT_DETACH) != 0 && errno != EINVAL && errno != ENOENT) {
    return makeError(Errc::System, fmt::format("unmounting {}", path), errno);
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return makeError(Errc::System, fmt::format("removing {}", path), errno);
  }
  return ok();
}

Status runInNetns(const Fd& netns, const std::function<Status()>& fn) {
  Status result = ok();
  std::thread worker([&] {
    if (::setns(netns.get(), CLONE_NEWNET) != 0) {
      result = makeError(Errc::System, "setns(CLONE_NEWNET)", errno);
      return;
    }
    result = fn();
  });
  worker.join();
  return result;
}

Result<Fd> createTap(const std::string& name, TapLifetime lifetime) {
  Fd fd(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
  if (!fd) {
    return makeError(errno == ENOENT ? Errc::Unavailable : Errc::System, "opening /dev/net/tun",
                     errno);
  }
  ifreq ifr{};
  ML_RETURN_IF_ERROR(ifreqName(ifr, name));
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  if (::ioctl(fd.get(), TUNSETIFF, &ifr) != 0) {
    return makeError(Errc::System, fmt::format("TUNSETIFF {}", name), errno);
  }
  if (lifetime == TapLifetime::WithNamespace && ::ioctl(fd.get(), TUNSETPERSIST, 1) != 0) {
    return makeError(Errc::System, fmt::format("TUNSETPERSIST {}", name), errno);
  }
  return fd;
}

Status configureLink(const std::string& ifname, const std::string& address, int prefix, int mtu) {
  ML_ASSIGN_OR_RETURN(Fd sock, inetSocket());
  ifreq ifr{};
  ML_RETURN_IF_ERROR(ifreqName(ifr, ifname));
  ifr.ifr_mtu = mtu;
  if (::ioctl(sock.get(), SIOCSIFMTU, &ifr) != 0) {
    return makeError(Errc::System, fmt::format("setting MTU {} on {}", mtu, ifname), errno);
  }
  auto set_addr = [&](unsigned long req, uint32_t value,  // NOLINT(google-runtime-int)
                      const char* what) -> Status {
    ifreq r{};
    ML_RETURN_IF_ERROR(ifreqName(r, ifname));
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = value;
    std::memcpy(&r.ifr_addr, &sin, sizeof(sin));
    if (::ioctl(sock.get(), req, &r) != 0) {
      return makeError(Errc::System, fmt::format("setting the {} of {}", what, ifname), errno);
    }
    return ok();
  };
  in_addr a{};
  if (::inet_pton(AF_INET, address.c_str(), &a) != 1 || prefix < 0 || prefix > 32) {
    return makeError(Errc::InvalidSpec, fmt::format("bad IPv4 address {}/{}", address, prefix));
  }
  ML_RETURN_IF_ERROR(set_addr(SIOCSIFADDR, a.s_addr, "address"));
  uint32_t mask = prefix == 0 ? 0 : htonl(~uint32_t{0} << (32 - prefix));
  ML_RETURN_IF_ERROR(set_addr(SIOCSIFNETMASK, mask, "netmask"));
  return setFlagsUp(sock.get(), ifr);
}

Status loopbackUp() {
  ML_ASSIGN_OR_RETURN(Fd sock, inetSocket());
  ifreq ifr{};
  ML_RETURN_IF_ERROR(ifreqName(ifr, "lo"));
  return setFlagsUp(sock.get(), ifr);
}

}  // namespace matchlock::sys
