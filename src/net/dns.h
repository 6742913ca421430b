// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"
#include "net/policy.h"
#include "sys/socket_util.h"

namespace matchlock::net {

/// The addresses the sandbox resolver handed out, per name. A connection to an address that was
/// never returned for the requested name is refused: this closes the direct-IP bypass and DNS
/// rebinding. Loop thread only.
class DnsPins {
 public:
  /// Records that `ip` was answered for `name` (normalized), valid for at least `ttl` (pins are
  /// kept for max(ttl, kMinPin) so that connection reuse after a short TTL keeps working).
  void pin(std::string_view name, std::string_view ip, std::chrono::seconds ttl);
  /// True when `ip` was answered for `name` and the pin has not expired.
  bool allows(std::string_view name, std::string_view ip) const;
  /// The names `ip` is currently pinned for (linear scan; the table is small).
  std::vector<std::string> namesFor(std::string_view ip) const;
  size_t size() const { return pins_.size(); }

  static constexpr std::chrono::seconds kMinPin{300};

 private:
  std::map<std::pair<std::string, std::string>, std::chrono::steady_clock::time_point> pins_;
};

/// A small UDP DNS resolver for one sandbox: answers only names the policy allows (NXDOMAIN
/// otherwise; REFUSED for anything that is not a standard query), forwards allowed questions to
/// the upstream resolvers and pins the A/AAAA answers in DnsPins.
class DnsResolver {
 public:
  static Result<std::unique_ptr<DnsResolver>> create(ev::Loop& loop, const sys::SockAddr& listen,
                                                     std::vector<sys::SockAddr> upstreams,
                                                     std::shared_ptr<PolicyStore> policy,
                                                     DnsPins* pins);
  DnsResolver(const DnsResolver&) = delete;
  DnsResolver& operator=(const DnsResolver&) = delete;
  DnsResolver(DnsResolver&&) = delete;
  DnsResolver& operator=(DnsResolver&&) = delete;
  ~DnsResolver();

  sys::SockAddr address() const { return address_; }

 private:
  struct PendingQuery;
  DnsResolver(ev::Loop& loop, std::shared_ptr<PolicyStore> policy, DnsPins* pins);
  void onQuery();
  void onUpstream(uint16_t upstream_id);
  void sweep();

  ev::Loop& loop_;
  std::shared_ptr<PolicyStore> policy_;
  DnsPins* pins_;
  Fd socket_;
  ev::Watch watch_;
  sys::SockAddr address_;
  std::vector<sys::SockAddr> upstreams_;
  uint16_t next_id_ = 1;
  std::map<uint16_t, std::unique_ptr<PendingQuery>> pending_;
  ev::Timer sweep_timer_;
};

/// Parses the first question name of a DNS message ("" on malformed input); `qtype` receives the
/// question type and `end` the offset after the question. Exposed for tests.
std::string dnsQuestionName(std::string_view msg, uint16_t* qtype, size_t* end);

/// An A or AAAA record of an answer section.
struct DnsAddress {
  std::string ip;  ///< textual address
  uint32_t ttl = 0;
};
/// The A and AAAA records (class IN) of a response's answer section, which starts at `off` (the
/// end of the question); stops at the first malformed record. Exposed for tests and fuzzing.
std::vector<DnsAddress> dnsAnswerAddresses(std::string_view msg, size_t off);

}  // namespace matchlock::net
