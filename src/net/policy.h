// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace matchlock::net {

/// Upstream's host-pattern semantics, case-insensitive (DNS names are), applied to `host` with any
/// ":port" suffix and a trailing dot removed:
///   "*"            everything
///   "*.example.com" any name ending in ".example.com" (not "example.com" itself)
///   "api.*"        any name starting with "api."
///   "a*b*c"        literal prefix, suffix and ordered middle pieces
///   anything else  exact equality
bool matchHostPattern(std::string_view pattern, std::string_view host);

/// Lower-cases, strips ":port" (and IPv6 brackets) and a trailing dot.
std::string normalizeHost(std::string_view host);

/// Why an IP literal is in a blocked range ("private", "loopback", "link-local", "cgnat",
/// "metadata", "unspecified", "multicast", "broadcast"), or "" for a public address. Returns ""
/// when `ip` is not an IP literal.
std::string_view blockedRange(std::string_view ip);

/// True when `text` is an IPv4 or IPv6 literal.
bool isIpLiteral(std::string_view text);

/// A policy decision. `reason` uses upstream's block_reason strings where one exists.
struct Decision {
  bool allowed = false;
  std::string reason;
};

/// Inputs of a policy (a subset of spec::NetworkSpec, kept here so net does not depend on spec).
struct PolicyConfig {
  bool no_network = false;
  std::vector<std::string> allow_hosts;  ///< patterns; IP literals and CIDRs are allowed too
  bool block_private_ips = true;
};

/// An immutable, compiled egress policy. Cheap to share between threads.
class Policy {
 public:
  static Result<Policy> compile(const PolicyConfig& config);

  /// Decision for a connection to host name or IP literal `host` (from SNI, Host or the original
  /// destination). Names are checked against the allow-list only; use checkDestination() for the
  /// address actually dialled.
  Decision checkHost(std::string_view host) const;

  /// Decision for the IP address the proxy is about to dial: blocked ranges unless an IP or CIDR
  /// entry of the allow-list explicitly covers it.
  Decision checkDestination(std::string_view ip) const;

  /// Decision for a non-HTTP TCP connection, which carries no name: the IP must be on the list
  /// (IP or CIDR entry, or "*" / an empty list) and pass checkDestination().
  Decision checkRawTcp(std::string_view ip) const;

  const PolicyConfig& config() const { return config_; }
  /// An empty allow-list means "allow every public host" (upstream's semantics).
  bool allowsAnyHost() const;

 private:
  struct Cidr {
    unsigned char addr[16];
    int family;
    int prefix;
  };
  bool ipExplicitlyAllowed(std::string_view ip) const;

  PolicyConfig config_;
  std::vector<std::string> patterns_;  ///< normalized name patterns
  std::vector<Cidr> cidrs_;            ///< IP and CIDR entries
};

/// The live policy of one sandbox: readers take an immutable snapshot with one atomic load (no
/// lock on the connection path); writers build a new Policy and swap it in. Runtime edits follow
/// upstream's allow_list_add/delete semantics.
class PolicyStore {
 public:
  explicit PolicyStore(Policy initial)
      : current_(std::make_shared<const Policy>(std::move(initial))) {}

  std::shared_ptr<const Policy> snapshot() const { return current_.load(); }

  /// Replaces the whole policy.
  void replace(Policy policy);

  /// Adds hosts (trimmed, de-duplicated); returns only the entries actually added.
  Result<std::vector<std::string>> addHosts(const std::vector<std::string>& hosts);
  /// Removes hosts; returns the entries actually removed.
  Result<std::vector<std::string>> deleteHosts(const std::vector<std::string>& hosts);

 private:
  std::atomic<std::shared_ptr<const Policy>> current_;
  std::mutex writer_mutex_;  ///< serializes writers only
};

}  // namespace matchlock::net
