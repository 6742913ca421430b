// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <functional>
#include <string>

#include "common/fd.h"
#include "common/result.h"

namespace matchlock::sys {

/// Named network namespaces, compatible with iproute2: a namespace `NAME` is kept alive by a bind
/// mount of its nsfs inode on /run/netns/NAME, so `ip netns` lists it and it outlives the process
/// that made it. Needs CAP_SYS_ADMIN and CAP_NET_ADMIN.
std::string netnsPath(const std::string& name);

/// Creates the namespace NAME (AlreadyExists-safe: Conflict when the path is already a
/// namespace). The calling thread's own namespace is never changed: the work happens on a
/// short-lived helper thread.
[[nodiscard]] Status createNetns(const std::string& name);
/// Opens /run/netns/NAME (O_RDONLY|O_CLOEXEC). NotFound when it does not exist.
[[nodiscard]] Result<Fd> openNetns(const std::string& name);
/// Unmounts and removes /run/netns/NAME; the kernel destroys the namespace (and every device,
/// address and nftables table in it) once nothing else holds it. Idempotent.
[[nodiscard]] Status deleteNetns(const std::string& name);
/// True when /run/netns/NAME exists.
bool netnsExists(const std::string& name);

/// Runs `fn` on a helper thread that has joined the namespace `netns` (an fd from openNetns).
/// Sockets, TAP devices and netlink sockets created by `fn` belong to that namespace for their
/// whole life, whichever thread uses them later; the caller's thread stays where it is.
[[nodiscard]] Status runInNetns(const Fd& netns, const std::function<Status()>& fn);

enum class TapLifetime {
  WithFd,         ///< removed when its last fd closes (synchronously: an RCU grace period)
  WithNamespace,  ///< persistent: outlives its fds and goes with its namespace, which the kernel
                  ///< dismantles on its own workqueue (only for a namespace made to hold it)
};

/// Creates the TAP device `name` (IFF_TAP | IFF_NO_PI) in the calling thread's namespace and
/// returns its queue fd (non-blocking is left to the VMM).
[[nodiscard]] Result<Fd> createTap(const std::string& name,
                                   TapLifetime lifetime = TapLifetime::WithFd);

/// Sets `ifname`'s IPv4 address/prefix and MTU and brings it up (ioctl, in the calling thread's
/// namespace). `address` is dotted IPv4.
[[nodiscard]] Status configureLink(const std::string& ifname, const std::string& address,
                                   int prefix, int mtu);
/// Brings `lo` up in the calling thread's namespace.
[[nodiscard]] Status loopbackUp();

}  // namespace matchlock::sys
