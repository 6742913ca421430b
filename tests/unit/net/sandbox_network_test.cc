// SPDX-License-Identifier: Apache-2.0
#include "net/sandbox_network.h"

#include <unistd.h>

#include <cstdio>
#include <string>

#include <catch2/catch.hpp>

#include "net/nft.h"
#include "sys/netns.h"

namespace net = matchlock::net;
namespace sys = matchlock::sys;

namespace {

/// Output of a shell command (tests only).
std::string capture(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");  // NOLINT(android-cloexec-pipe)
  if (p == nullptr) {
    return out;
  }
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) {
    out.append(buf, n);
  }
  (void)::pclose(p);
  return out;
}

}  // namespace

TEST_CASE("network names derive from the sandbox id", "[sandbox_network]") {
  auto n = net::networkNames("vm-0e6cfd30");
  CHECK(n.netns == "ml-0e6cfd30");
  CHECK(n.tap == "ml0e6cfd30");
  CHECK(n.table == "ml_0e6cfd30");
  CHECK(n.tap.size() < 16);  // IFNAMSIZ
}

TEST_CASE("network config round-trips through JSON without secret values", "[sandbox_network]") {
  net::NetworkConfig c;
  c.enabled = true;
  c.names = net::networkNames("vm-01234567");
  c.gateway = "10.213.4.1";
  c.guest_ip = "10.213.4.2";
  c.mtu = 1400;
  c.allow_hosts = {"api.example.com", "*.pypi.org"};
  c.block_private_ips = false;
  c.dns_servers = {"198.51.100.53"};
  c.secrets = {{"API_KEY", {"api.example.com"}}};
  auto j = net::toJson(c);
  auto back = net::networkConfigFromJson(j);
  REQUIRE(back);
  CHECK(back->names.table == "ml_01234567");
  CHECK(back->mtu == 1400);
  CHECK(back->allow_hosts == c.allow_hosts);
  CHECK_FALSE(back->block_private_ips);
  REQUIRE(back->secrets.size() == 1);
  CHECK(back->secrets[0].hosts == std::vector<std::string>{"api.example.com"});
  CHECK(j.dump().find("value") == std::string::npos);
  CHECK_FALSE(net::networkConfigFromJson({{"secrets", {{{"hosts", {"x"}}}}}}));
}

TEST_CASE("the rule text says what the table does", "[nft]") {
  net::SandboxRules r{"ml_abc", "mlabc", 40001, 40002};
  std::string text = net::renderRules(r);
  CHECK(text.find("iifname \"mlabc\" meta l4proto tcp redirect to :40001") != std::string::npos);
  CHECK(text.find("udp dport 53 redirect to :40002") != std::string::npos);
  CHECK(text.find("chain forward {\n    type filter hook forward priority 0; policy drop;") !=
        std::string::npos);
}

TEST_CASE("a namespace with the sandbox table, built by libnftnl", "[nft][privileged]") {
  if (::geteuid() != 0) {
    WARN("needs root: namespaces and nftables");
    return;
  }
  const std::string ns = "ml-unit" + std::to_string(::getpid() % 100000);
  REQUIRE(sys::createNetns(ns));
  CHECK(sys::netnsExists(ns));
  CHECK(sys::createNetns(ns).error().code() == matchlock::Errc::Conflict);
  auto fd = sys::openNetns(ns);
  REQUIRE(fd);
  net::SandboxRules r{"ml_unit", "mlunit0", 40001, 40002};
  matchlock::Status st = sys::runInNetns(*fd, [&]() -> matchlock::Status {
    auto tap = sys::createTap(r.tap);
    if (!tap) {
      return matchlock::makeError(tap.error());
    }
    if (auto c = sys::configureLink(r.tap, "10.213.9.1", 24, 1400); !c) {
      return c;
    }
    if (auto i = net::installRules(r); !i) {
      return i;
    }
    auto again = net::installRules(r);
    CHECK_FALSE(again);  // the table exists: never replaced behind our back
    return matchlock::ok();
  });
  REQUIRE(st);
  std::string listed = capture("ip netns exec " + ns + " nft list table inet ml_unit 2>&1");
  CHECK(listed.find("redirect to :40001") != std::string::npos);
  CHECK(listed.find("udp dport 53 redirect to :40002") != std::string::npos);
  CHECK(listed.find("policy drop") != std::string::npos);
  CHECK(listed.find("ct state established,related accept") != std::string::npos);
  // The host namespace never sees the table.
  CHECK(capture("nft list tables 2>&1").find("ml_unit") == std::string::npos);
  st = sys::runInNetns(*fd, [&] { return net::deleteTable(r.table); });
  CHECK(st);
  st = sys::runInNetns(*fd, [&] { return net::deleteTable(r.table); });
  CHECK(st);  // idempotent
  REQUIRE(sys::deleteNetns(ns));
  CHECK_FALSE(sys::netnsExists(ns));
  CHECK(sys::deleteNetns(ns));  // idempotent
}
