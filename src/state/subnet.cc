// SPDX-License-Identifier: Apache-2.0
#include "state/subnet.h"

#include <fmt/format.h>

#include <charconv>
#include <cstdlib>

namespace matchlock::state {
namespace {

// Parses a decimal number without sign or leading zeros, at most `max`.
bool parseDecimal(std::string_view text, uint32_t max, uint32_t& out) {
  if (text.empty() || text.size() > 10 || (text.size() > 1 && text[0] == '0')) {
    return false;
  }
  uint64_t value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr != text.data() + text.size() || value > max) {
    return false;
  }
  out = static_cast<uint32_t>(value);
  return true;
}

}  // namespace

std::string formatIpv4(uint32_t address) {
  return fmt::format("{}.{}.{}.{}", (address >> 24) & 0xff, (address >> 16) & 0xff,
                     (address >> 8) & 0xff, address & 0xff);
}

Result<Ipv4Cidr> Ipv4Cidr::parse(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return makeError(Errc::InvalidSpec, fmt::format("invalid IPv4 CIDR '{}': {}", text, why));
  };
  const size_t slash = text.find('/');
  if (slash == std::string_view::npos) {
    return bad("expected a.b.c.d/prefix");
  }
  std::string_view addr = text.substr(0, slash);
  uint32_t prefix = 0;
  if (!parseDecimal(text.substr(slash + 1), 32, prefix)) {
    return bad("prefix must be 0..32");
  }
  uint32_t address = 0;
  int octets = 0;
  while (true) {
    const size_t dot = addr.find('.');
    std::string_view part = addr.substr(0, dot);
    uint32_t octet = 0;
    if (octets == 4 || !parseDecimal(part, 255, octet)) {
      return bad("expected four octets 0..255");
    }
    address = (address << 8) | octet;
    ++octets;
    if (dot == std::string_view::npos) {
      break;
    }
    addr.remove_prefix(dot + 1);
  }
  if (octets != 4) {
    return bad("expected four octets 0..255");
  }
  const uint32_t host_mask = prefix == 0 ? 0xffffffffU : (prefix == 32 ? 0U : (~0U >> prefix));
  if ((address & host_mask) != 0) {
    return bad(fmt::format("host bits set (did you mean {}/{}?)", formatIpv4(address & ~host_mask),
                           prefix));
  }
  return Ipv4Cidr{address, static_cast<int>(prefix)};
}

std::string Ipv4Cidr::toString() const {
  return fmt::format("{}/{}", formatIpv4(address), prefix);
}

Result<SubnetPool> SubnetPool::create(Ipv4Cidr base, int subnet_prefix) {
  if (subnet_prefix < base.prefix || subnet_prefix > 30) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("subnet prefix /{} does not fit pool {}: it must be between /{} "
                                 "and /30",
                                 subnet_prefix, base.toString(), base.prefix));
  }
  return SubnetPool(base, subnet_prefix);
}

Result<SubnetPool> SubnetPool::parse(std::string_view text) {
  std::string_view cidr = text;
  uint32_t subnet_prefix = 24;
  if (const size_t colon = text.find(':'); colon != std::string_view::npos) {
    cidr = text.substr(0, colon);
    std::string_view prefix = text.substr(colon + 1);
    if (prefix.starts_with('/')) {
      prefix.remove_prefix(1);
    }
    if (!parseDecimal(prefix, 32, subnet_prefix)) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid subnet pool '{}': expected <cidr>[:<prefix>], e.g. {}",
                                   text, kDefault));
    }
  }
  auto base = Ipv4Cidr::parse(cidr);
  if (!base.has_value()) {
    return makeError(std::move(base).error().withContext(fmt::format("subnet pool '{}'", text)));
  }
  return create(*base, static_cast<int>(subnet_prefix));
}

Result<SubnetPool> SubnetPool::fromEnv() {
  // Read once at startup, before any threads exist.
  const char* env = std::getenv(std::string(kEnvVar).c_str());  // NOLINT(concurrency-mt-unsafe)
  if (env == nullptr || *env == '\0') {
    return defaultPool();
  }
  auto pool = parse(env);
  if (!pool.has_value()) {
    return makeError(std::move(pool).error().withContext(kEnvVar));
  }
  return pool;
}

SubnetPool SubnetPool::defaultPool() {
  return SubnetPool(Ipv4Cidr{0x0ad50000U, 16}, 24);
}

Result<SubnetAllocation> SubnetPool::at(int64_t index) const {
  if (index < 0 || index >= size()) {
    return makeError(Errc::Internal,
                     fmt::format("subnet index {} outside pool {}", index, toString()));
  }
  const uint64_t network =
      uint64_t{base_.address} + (static_cast<uint64_t>(index) << (32 - subnet_prefix_));
  const auto net = static_cast<uint32_t>(network);
  return SubnetAllocation{index, Ipv4Cidr{net, subnet_prefix_}.toString(), formatIpv4(net + 1),
                          formatIpv4(net + 2)};
}

std::string SubnetPool::toString() const {
  return fmt::format("{}:{}", base_.toString(), subnet_prefix_);
}

}  // namespace matchlock::state
