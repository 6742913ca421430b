// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/result.h"

namespace matchlock::state {

/// An IPv4 network in CIDR form. `address` is in host byte order.
struct Ipv4Cidr {
  uint32_t address = 0;
  int prefix = 0;

  /// Parses "a.b.c.d/p" strictly: four decimal octets without leading zeros, 0 <= p <= 32, and no
  /// host bits set. Errors are InvalidSpec.
  [[nodiscard]] static Result<Ipv4Cidr> parse(std::string_view text);
  std::string toString() const;
  bool operator==(const Ipv4Cidr&) const = default;
};

/// "a.b.c.d" for a host-order address.
std::string formatIpv4(uint32_t address);

/// One sandbox's subnet: the pool index plus the derived addresses (gateway = .1, guest = .2 of
/// the subnet).
struct SubnetAllocation {
  int64_t index = 0;
  std::string cidr;
  std::string gateway;
  std::string guest_ip;
  bool operator==(const SubnetAllocation&) const = default;
};

/// A pool of equally sized subnets carved out of a base network, e.g. 10.213.0.0/16 split into
/// /24s (256 subnets, index 0 = 10.213.0.0/24).
class SubnetPool {
 public:
  static constexpr std::string_view kEnvVar = "MATCHLOCK_SUBNET_POOL";
  static constexpr std::string_view kDefault = "10.213.0.0/16:24";

  /// Builds a pool. The per-sandbox prefix must be at least the base prefix and at most 30 (a
  /// subnet needs a network address, the gateway, the guest and a broadcast address).
  [[nodiscard]] static Result<SubnetPool> create(Ipv4Cidr base, int subnet_prefix);
  /// Parses "10.213.0.0/16:24"; "10.213.0.0/16" means /24 subnets. Errors are InvalidSpec.
  [[nodiscard]] static Result<SubnetPool> parse(std::string_view text);
  /// $MATCHLOCK_SUBNET_POOL if set and non-empty, else kDefault.
  [[nodiscard]] static Result<SubnetPool> fromEnv();
  /// The built-in default pool (kDefault).
  static SubnetPool defaultPool();

  /// Number of subnets in the pool.
  int64_t size() const { return int64_t{1} << (subnet_prefix_ - base_.prefix); }
  /// The allocation for `index` (0 <= index < size(); Internal otherwise).
  [[nodiscard]] Result<SubnetAllocation> at(int64_t index) const;
  const Ipv4Cidr& base() const { return base_; }
  int subnetPrefix() const { return subnet_prefix_; }
  /// "10.213.0.0/16:24".
  std::string toString() const;

 private:
  SubnetPool(Ipv4Cidr base, int subnet_prefix) : base_(base), subnet_prefix_(subnet_prefix) {}

  Ipv4Cidr base_;
  int subnet_prefix_;
};

}  // namespace matchlock::state
