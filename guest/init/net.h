// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>

#include "common/result.h"

namespace matchlock::guest {

/// What the host asks for on the kernel command line (matchlock.ip=ADDR/PREFIX,
/// matchlock.gw=ADDR, matchlock.mtu=N). Empty `address` = no NIC configuration.
struct NetConfig {
  std::string iface = "eth0";
  std::string address;  ///< "10.213.0.2/24"
  std::string gateway;  ///< "10.213.0.1"
  int mtu = 1500;
};

/// Brings `lo` up. Always called: programs expect a loopback even without a NIC.
Status bringUpLoopback();

/// Configures the NIC with rtnetlink (the image need not have `ip`): MTU, up, IPv4 address,
/// default route. NotFound when the interface does not exist.
Status configureInterface(const NetConfig& config);

}  // namespace matchlock::guest
