// SPDX-License-Identifier: Apache-2.0
#include "net/policy.h"

#include <arpa/inet.h>
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "common/strings.h"

namespace matchlock::net {

namespace {

struct IpBytes {
  int family = 0;  // AF_INET or AF_INET6
  unsigned char b[16] = {};
};

bool parseIpBytes(std::string_view text, IpBytes* out) {
  std::string s(text);
  if (::inet_pton(AF_INET, s.c_str(), out->b) == 1) {
    out->family = AF_INET;
    return true;
  }
  if (::inet_pton(AF_INET6, s.c_str(), out->b) == 1) {
    out->family = AF_INET6;
    // Judge IPv4-mapped addresses (::ffff:a.b.c.d) as the IPv4 address they carry.
    static constexpr unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (std::memcmp(out->b, kMapped, 12) == 0) {
      std::memmove(out->b, out->b + 12, 4);
      std::memset(out->b + 4, 0, 12);
      out->family = AF_INET;
    }
    return true;
  }
  return false;
}

bool prefixMatch(const unsigned char* a, const unsigned char* b, int prefix) {
  int full = prefix / 8;
  if (std::memcmp(a, b, static_cast<size_t>(full)) != 0) {
    return false;
  }
  int rest = prefix % 8;
  if (rest == 0) {
    return true;
  }
  auto mask = static_cast<unsigned char>(0xff << (8 - rest));
  return (a[full] & mask) == (b[full] & mask);
}

struct Range {
  int family;
  unsigned char addr[16];
  int prefix;
  std::string_view reason;
};

// Order matters: the first match names the reason (metadata before link-local).
const Range kBlockedRanges[] = {
    {AF_INET, {169, 254, 169, 254}, 32, "metadata"},
    {AF_INET, {0}, 8, "unspecified"},
    {AF_INET, {10}, 8, "private"},
    {AF_INET, {100, 64}, 10, "cgnat"},
    {AF_INET, {127}, 8, "loopback"},
    {AF_INET, {169, 254}, 16, "link-local"},
    {AF_INET, {172, 16}, 12, "private"},
    {AF_INET, {192, 168}, 16, "private"},
    {AF_INET, {192, 0, 0}, 24, "private"},
    {AF_INET, {198, 18}, 15, "private"},
    {AF_INET, {224}, 4, "multicast"},
    {AF_INET, {240}, 4, "broadcast"},
    {AF_INET6, {0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54}, 128, "metadata"},
    {AF_INET6, {0}, 128, "unspecified"},
    {AF_INET6, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, 128, "loopback"},
    {AF_INET6, {0xfc}, 7, "private"},
    {AF_INET6, {0xfe, 0x80}, 10, "link-local"},
    {AF_INET6, {0xff}, 8, "multicast"},
    {AF_INET6, {0x00, 0x64, 0xff, 0x9b}, 96, "private"},  // NAT64 could reach private v4
};

bool globMatch(std::string_view pattern, std::string_view host) {
  // Literal prefix before the first '*', literal suffix after the last, middle pieces in order.
  size_t first = pattern.find('*');
  size_t last = pattern.rfind('*');
  std::string_view prefix = pattern.substr(0, first);
  std::string_view suffix = pattern.substr(last + 1);
  if (host.size() < prefix.size() + suffix.size() || !host.starts_with(prefix) ||
      !host.ends_with(suffix)) {
    return false;
  }
  if (last == first) {
    return true;
  }
  std::string_view middle = host.substr(prefix.size(), host.size() - prefix.size() - suffix.size());
  std::string_view pieces = pattern.substr(first + 1, last - first - 1);
  size_t pos = 0;
  while (!pieces.empty()) {
    size_t star = pieces.find('*');
    std::string_view piece = pieces.substr(0, star);
    if (!piece.empty()) {
      size_t found = middle.find(piece, pos);
      if (found == std::string_view::npos) {
        return false;
      }
      pos = found + piece.size();
    }
    if (star == std::string_view::npos) {
      break;
    }
    pieces.remove_prefix(star + 1);
  }
  return true;
}

}  // namespace

std::string normalizeHost(std::string_view host) {
  host = trim(host);
  if (!host.empty() && host.front() == '[') {
    size_t close = host.find(']');
    if (close != std::string_view::npos) {
      host = host.substr(1, close - 1);
    }
  } else if (host.find(':') != std::string_view::npos && host.find(':') == host.rfind(':')) {
    host = host.substr(0, host.find(':'));  // "name:port"; a bare IPv6 literal has several ':'
  }
  if (!host.empty() && host.back() == '.') {
    host.remove_suffix(1);
  }
  return toLower(host);
}

bool matchHostPattern(std::string_view pattern, std::string_view host) {
  std::string p = toLower(trim(pattern));
  std::string h = normalizeHost(host);
  if (p.empty() || h.empty()) {
    return false;
  }
  if (p == "*") {
    return true;
  }
  size_t stars = static_cast<size_t>(std::count(p.begin(), p.end(), '*'));
  if (stars == 0) {
    return p == h;
  }
  if (stars == 1 && p.starts_with("*.")) {
    std::string_view pv = p;
    return h.size() > p.size() - 1 && h.ends_with(pv.substr(1));
  }
  if (stars == 1 && p.ends_with(".*")) {
    std::string_view pv = p;
    return h.size() > p.size() - 1 && h.starts_with(pv.substr(0, p.size() - 1));
  }
  return globMatch(p, h);
}

bool isIpLiteral(std::string_view text) {
  IpBytes ip;
  return parseIpBytes(text, &ip);
}

std::string_view blockedRange(std::string_view ip) {
  IpBytes bytes;
  if (!parseIpBytes(ip, &bytes)) {
    return "";
  }
  for (const Range& r : kBlockedRanges) {
    if (r.family == bytes.family && prefixMatch(bytes.b, r.addr, r.prefix)) {
      return r.reason;
    }
  }
  return "";
}

Result<Policy> Policy::compile(const PolicyConfig& config) {
  Policy p;
  p.config_ = config;
  for (const std::string& raw : config.allow_hosts) {
    std::string entry = toLower(trim(raw));
    if (entry.empty()) {
      continue;
    }
    std::string_view addr = entry;
    int prefix = -1;
    size_t slash = entry.find('/');
    if (slash != std::string::npos) {
      std::string_view ev = entry;
      addr = ev.substr(0, slash);
      std::string_view len = ev.substr(slash + 1);
      int value = 0;
      auto [ptr, ec] = std::from_chars(len.data(), len.data() + len.size(), value);
      if (ec != std::errc() || ptr != len.data() + len.size()) {
        return makeError(Errc::InvalidSpec, fmt::format("bad CIDR '{}'", raw));
      }
      prefix = value;
    }
    IpBytes bytes;
    if (parseIpBytes(addr, &bytes)) {
      int max = bytes.family == AF_INET ? 32 : 128;
      if (prefix < 0) {
        prefix = max;
      }
      if (prefix > max) {
        return makeError(Errc::InvalidSpec, fmt::format("bad CIDR '{}'", raw));
      }
      Cidr c{};
      std::memcpy(c.addr, bytes.b, sizeof(c.addr));
      c.family = bytes.family;
      c.prefix = prefix;
      p.cidrs_.push_back(c);
      continue;
    }
    if (slash != std::string::npos) {
      return makeError(Errc::InvalidSpec, fmt::format("bad CIDR '{}'", raw));
    }
    p.patterns_.push_back(std::move(entry));
  }
  return p;
}

bool Policy::allowsAnyHost() const {
  if (patterns_.empty() && cidrs_.empty()) {
    return true;
  }
  return std::find(patterns_.begin(), patterns_.end(), "*") != patterns_.end();
}

bool Policy::ipExplicitlyAllowed(std::string_view ip) const {
  IpBytes bytes;
  if (!parseIpBytes(ip, &bytes)) {
    return false;
  }
  return std::any_of(cidrs_.begin(), cidrs_.end(), [&](const Cidr& c) {
    return c.family == bytes.family && prefixMatch(bytes.b, c.addr, c.prefix);
  });
}

Decision Policy::checkHost(std::string_view host) const {
  if (config_.no_network) {
    return {false, "network disabled"};
  }
  std::string h = normalizeHost(host);
  if (isIpLiteral(h)) {
    if (ipExplicitlyAllowed(h)) {
      return {true, ""};
    }
    if (!allowsAnyHost()) {
      return {false, "host not in allowlist"};
    }
    return checkDestination(h);
  }
  if (allowsAnyHost()) {
    return {true, ""};
  }
  for (const std::string& p : patterns_) {
    if (matchHostPattern(p, h)) {
      return {true, ""};
    }
  }
  return {false, "host not in allowlist"};
}

Decision Policy::checkDestination(std::string_view ip) const {
  if (config_.no_network) {
    return {false, "network disabled"};
  }
  if (ipExplicitlyAllowed(ip)) {
    return {true, ""};
  }
  std::string_view range = blockedRange(ip);
  if (config_.block_private_ips && !range.empty()) {
    return {false, fmt::format("destination {} is in a blocked range ({})", ip, range)};
  }
  return {true, ""};
}

Decision Policy::checkRawTcp(std::string_view ip) const {
  if (config_.no_network) {
    return {false, "network disabled"};
  }
  if (!allowsAnyHost() && !ipExplicitlyAllowed(ip)) {
    return {false, "host not in allowlist"};
  }
  return checkDestination(ip);
}

void PolicyStore::replace(Policy policy) {
  std::lock_guard lock(writer_mutex_);
  current_.store(std::make_shared<const Policy>(std::move(policy)));
}

Result<std::vector<std::string>> PolicyStore::addHosts(const std::vector<std::string>& hosts) {
  std::lock_guard lock(writer_mutex_);
  PolicyConfig config = current_.load()->config();
  std::vector<std::string> added;
  for (const std::string& raw : hosts) {
    std::string h = toLower(trim(raw));
    if (h.empty() || std::find(config.allow_hosts.begin(), config.allow_hosts.end(), h) !=
                         config.allow_hosts.end()) {
      continue;
    }
    config.allow_hosts.push_back(h);
    added.push_back(h);
  }
  ML_ASSIGN_OR_RETURN(Policy next, Policy::compile(config));
  current_.store(std::make_shared<const Policy>(std::move(next)));
  return added;
}

Result<std::vector<std::string>> PolicyStore::deleteHosts(const std::vector<std::string>& hosts) {
  std::lock_guard lock(writer_mutex_);
  PolicyConfig config = current_.load()->config();
  std::vector<std::string> removed;
  for (const std::string& raw : hosts) {
    std::string h = toLower(trim(raw));
    auto it = std::find(config.allow_hosts.begin(), config.allow_hosts.end(), h);
    if (it != config.allow_hosts.end()) {
      config.allow_hosts.erase(it);
      removed.push_back(h);
    }
  }
  ML_ASSIGN_OR_RETURN(Policy next, Policy::compile(config));
  current_.store(std::make_shared<const Policy>(std::move(next)));
  return removed;
}

}  // namespace matchlock::net
