// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <string>

#include "common/result.h"

namespace matchlock::net {

/// The nftables table that seals one sandbox's namespace (family inet, built with libnftnl and
/// sent in one libmnl batch, so it appears whole or not at all). In text form (renderRules):
///
///   table inet ml_<id> {
///     chain prerouting { type nat hook prerouting priority -100; policy accept;
///       meta nfproto ipv4 iifname "<tap>" meta l4proto tcp redirect to :<proxy_port>
///       meta nfproto ipv4 iifname "<tap>" meta l4proto udp udp dport 53 redirect to :<dns_port> }
///     chain input { type filter hook input priority 0; policy drop;
///       iifname "lo" accept
///       meta nfproto ipv4 iifname "<tap>" meta l4proto tcp tcp dport <proxy_port> accept
///       meta nfproto ipv4 iifname "<tap>" meta l4proto udp udp dport <dns_port> accept }
///     chain forward { type filter hook forward priority 0; policy drop; }
///     chain output { type filter hook output priority 0; policy drop;
///       oifname "lo" accept
///       ct state established,related accept }
///   }
///
/// Every guest TCP connection lands on the proxy, every guest DNS query on the resolver; all
/// else (other UDP, ICMP, IPv6 of every kind, other protocols, the gateway's other ports, any
/// forwarding) is dropped, and nothing in the namespace can open a connection of its own.
struct SandboxRules {
  std::string table;  ///< ml_<8 hex>
  std::string tap;    ///< ml<8 hex>
  uint16_t proxy_port = 0;
  uint16_t dns_port = 0;
};

/// The rules above as `nft -f` text (documentation, tests and `inspect`).
std::string renderRules(const SandboxRules& rules);

/// Installs the table in the calling thread's network namespace (replacing nothing: Conflict if
/// it exists). Errors carry the kernel's errno.
[[nodiscard]] Status installRules(const SandboxRules& rules);

/// Deletes table `name` (family inet) in the calling thread's namespace; a missing table is
/// success.
[[nodiscard]] Status deleteTable(const std::string& name);

}  // namespace matchlock::net
