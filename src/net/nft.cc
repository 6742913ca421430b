// SPDX-License-Identifier: Apache-2.0
#include "net/nft.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <libmnl/libmnl.h>
#include <libnftnl/batch.h>
#include <libnftnl/chain.h>
#include <libnftnl/expr.h>
#include <libnftnl/rule.h>
#include <libnftnl/table.h>
#include <linux/if.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "common/cptr.h"

namespace matchlock::net {
namespace {

using TablePtr = CPtr<nftnl_table, nftnl_table_free>;
using ChainPtr = CPtr<nftnl_chain, nftnl_chain_free>;
using RulePtr = CPtr<nftnl_rule, nftnl_rule_free>;
using MnlPtr = CPtr<mnl_socket, mnl_socket_close>;

// NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED).
constexpr uint32_t kCtEstablishedRelated = (1U << 1) | (1U << 2);
constexpr uint16_t kDnsPort = 53;

/// Builds one rule's expressions.
class RuleBuilder {
 public:
  RuleBuilder(const std::string& table, const std::string& chain) : rule_(nftnl_rule_alloc()) {
    nftnl_rule_set_u32(rule_.get(), NFTNL_RULE_FAMILY, NFPROTO_INET);
    nftnl_rule_set_str(rule_.get(), NFTNL_RULE_TABLE, table.c_str());
    nftnl_rule_set_str(rule_.get(), NFTNL_RULE_CHAIN, chain.c_str());
  }
  RuleBuilder& meta(uint32_t key) {
    nftnl_expr* e = nftnl_expr_alloc("meta");
    nftnl_expr_set_u32(e, NFTNL_EXPR_META_KEY, key);
    nftnl_expr_set_u32(e, NFTNL_EXPR_META_DREG, NFT_REG_1);
    return add(e);
  }
  RuleBuilder& cmp(const void* data, uint32_t len, uint32_t op = NFT_CMP_EQ) {
    nftnl_expr* e = nftnl_expr_alloc("cmp");
    nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_SREG, NFT_REG_1);
    nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_OP, op);
    nftnl_expr_set(e, NFTNL_EXPR_CMP_DATA, data, len);
    return add(e);
  }
  RuleBuilder& ipv4() {
    uint8_t proto = NFPROTO_IPV4;
    return meta(NFT_META_NFPROTO).cmp(&proto, sizeof(proto));
  }
  RuleBuilder& ifname(uint32_t key, const std::string& name) {
    char buf[IFNAMSIZ] = {};
    std::memcpy(buf, name.data(), std::min(name.size(), sizeof(buf) - 1));
    return meta(key).cmp(buf, static_cast<uint32_t>(name.size() + 1));
  }
  RuleBuilder& l4proto(uint8_t proto) { return meta(NFT_META_L4PROTO).cmp(&proto, sizeof(proto)); }
  RuleBuilder& dport(uint16_t port) {
    nftnl_expr* e = nftnl_expr_alloc("payload");
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, NFT_PAYLOAD_TRANSPORT_HEADER);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, 2);  // TCP and UDP: destination port
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, 2);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_DREG, NFT_REG_1);
    add(e);
    uint16_t be = htons(port);
    return cmp(&be, sizeof(be));
  }
  RuleBuilder& ctEstablishedOrRelated() {
    nftnl_expr* ct = nftnl_expr_alloc("ct");
    nftnl_expr_set_u32(ct, NFTNL_EXPR_CT_KEY, NFT_CT_STATE);
    nftnl_expr_set_u32(ct, NFTNL_EXPR_CT_DREG, NFT_REG_1);
    add(ct);
    nftnl_expr* bw = nftnl_expr_alloc("bitwise");
    uint32_t mask = kCtEstablishedRelated;
    uint32_t zero = 0;
    nftnl_expr_set_u32(bw, NFTNL_EXPR_BITWISE_SREG, NFT_REG_1);
    nftnl_expr_set_u32(bw, NFTNL_EXPR_BITWISE_DREG, NFT_REG_1);
    nftnl_expr_set_u32(bw, NFTNL_EXPR_BITWISE_LEN, sizeof(uint32_t));
    nftnl_expr_set(bw, NFTNL_EXPR_BITWISE_MASK, &mask, sizeof(mask));
    nftnl_expr_set(bw, NFTNL_EXPR_BITWISE_XOR, &zero, sizeof(zero));
    add(bw);
    return cmp(&zero, sizeof(zero), NFT_CMP_NEQ);
  }
  RuleBuilder& redirect(uint16_t port) {
    nftnl_expr* imm = nftnl_expr_alloc("immediate");
    uint16_t be = htons(port);
    nftnl_expr_set_u32(imm, NFTNL_EXPR_IMM_DREG, NFT_REG_1);
    nftnl_expr_set(imm, NFTNL_EXPR_IMM_DATA, &be, sizeof(be));
    add(imm);
    nftnl_expr* redir = nftnl_expr_alloc("redir");
    nftnl_expr_set_u32(redir, NFTNL_EXPR_REDIR_REG_PROTO_MIN, NFT_REG_1);
    return add(redir);
  }
  RuleBuilder& accept() {
    nftnl_expr* e = nftnl_expr_alloc("immediate");
    nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT);
    nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_VERDICT, NF_ACCEPT);
    return add(e);
  }
  RulePtr take() { return std::move(rule_); }

 private:
  RuleBuilder& add(nftnl_expr* e) {
    nftnl_rule_add_expr(rule_.get(), e);  // the rule owns the expression
    return *this;
  }
  RulePtr rule_;
};

struct ChainDef {
  const char* name;
  const char* type;
  uint32_t hook;
  int32_t prio;
  uint32_t policy;
};

/// A batch being assembled (libmnl's batch over one buffer): every message asks for an ACK, so
/// that the first failing one is reported with its errno.
class Batch {
 public:
  Batch() : buf_(kBufSize), batch_(mnl_nlmsg_batch_start(buf_.data(), buf_.size())) {
    nftnl_batch_begin(static_cast<char*>(mnl_nlmsg_batch_current(batch_.get())), seq_++);
    (void)mnl_nlmsg_batch_next(batch_.get());
  }
  nlmsghdr* header(uint16_t type, uint16_t flags) {
    ++messages_;
    return nftnl_nlmsg_build_hdr(static_cast<char*>(mnl_nlmsg_batch_current(batch_.get())), type,
                                 NFPROTO_INET, flags | NLM_F_ACK, seq_++);
  }
  void next() { (void)mnl_nlmsg_batch_next(batch_.get()); }
  Status send() {
    nftnl_batch_end(static_cast<char*>(mnl_nlmsg_batch_current(batch_.get())), seq_++);
    (void)mnl_nlmsg_batch_next(batch_.get());
    MnlPtr nl(mnl_socket_open2(NETLINK_NETFILTER, SOCK_CLOEXEC));
    if (!nl) {
      return makeError(Errc::System, "opening a netfilter netlink socket", errno);
    }
    if (mnl_socket_bind(nl.get(), 0, MNL_SOCKET_AUTOPID) < 0) {
      return makeError(Errc::System, "binding the netfilter netlink socket", errno);
    }
    // Bounded: a kernel that never answers must not hang a sandbox start.
    timeval tv{5, 0};
    (void)::setsockopt(mnl_socket_get_fd(nl.get()), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (mnl_socket_sendto(nl.get(), mnl_nlmsg_batch_head(batch_.get()),
                          mnl_nlmsg_batch_size(batch_.get())) < 0) {
      return makeError(Errc::System, "sending the nftables batch", errno);
    }
    const uint32_t port = mnl_socket_get_portid(nl.get());
    std::vector<char> rx(kBufSize);
    // One ACK (or error) per message between the batch's begin and end markers.
    for (uint32_t pending = messages_; pending > 0;) {
      ssize_t n = mnl_socket_recvfrom(nl.get(), rx.data(), rx.size());
      if (n < 0) {
        return makeError(Errc::System, "reading nftables acknowledgements", errno);
      }
      if (mnl_cb_run(rx.data(), static_cast<size_t>(n), 0, port, nullptr, nullptr) < 0) {
        return makeError(errno == EEXIST ? Errc::Conflict : Errc::System,
                         "the kernel refused the nftables batch", errno);
      }
      auto* h = reinterpret_cast<nlmsghdr*>(rx.data());
      int left = static_cast<int>(n);
      while (mnl_nlmsg_ok(h, left) && pending > 0) {
        --pending;
        h = mnl_nlmsg_next(h, &left);
      }
    }
    return ok();
  }

 private:
  static constexpr size_t kBufSize = 16384;  // the whole table is a few hundred bytes
  std::vector<char> buf_;
  CPtr<mnl_nlmsg_batch, mnl_nlmsg_batch_stop> batch_;
  uint32_t seq_ = 1;
  uint32_t messages_ = 0;
};

}  // namespace

std::string renderRules(const SandboxRules& r) {
  return fmt::format(
      "table inet {t} {{\n"
      "  chain prerouting {{\n"
      "    type nat hook prerouting priority -100; policy accept;\n"
      "    meta nfproto ipv4 iifname \"{i}\" meta l4proto tcp redirect to :{p}\n"
      "    meta nfproto ipv4 iifname \"{i}\" meta l4proto udp udp dport 53 redirect to :{d}\n"
      "  }}\n"
      "  chain input {{\n"
      "    type filter hook input priority 0; policy drop;\n"
      "    iifname \"lo\" accept\n"
      "    meta nfproto ipv4 iifname \"{i}\" meta l4proto tcp tcp dport {p} accept\n"
      "    meta nfproto ipv4 iifname \"{i}\" meta l4proto udp udp dport {d} accept\n"
      "  }}\n"
      "  chain forward {{\n"
      "    type filter hook forward priority 0; policy drop;\n"
      "  }}\n"
      "  chain output {{\n"
      "    type filter hook output priority 0; policy drop;\n"
      "    oifname \"lo\" accept\n"
      "    ct state established,related accept\n"
      "  }}\n"
      "}}\n",
      fmt::arg("t", r.table), fmt::arg("i", r.tap), fmt::arg("p", r.proxy_port),
      fmt::arg("d", r.dns_port));
}

Status installRules(const SandboxRules& r) {
  if (r.table.empty() || r.tap.empty() || r.proxy_port == 0 || r.dns_port == 0) {
    return makeError(Errc::Internal, "installRules: incomplete rule set");
  }
  Batch batch;
  {
    TablePtr t(nftnl_table_alloc());
    nftnl_table_set_u32(t.get(), NFTNL_TABLE_FAMILY, NFPROTO_INET);
    nftnl_table_set_str(t.get(), NFTNL_TABLE_NAME, r.table.c_str());
    nftnl_table_nlmsg_build_payload(batch.header(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL),
                                    t.get());
    batch.next();
  }
  const ChainDef chains[] = {
      {"prerouting", "nat", NF_INET_PRE_ROUTING, -100, NF_ACCEPT},
      {"input", "filter", NF_INET_LOCAL_IN, 0, NF_DROP},
      {"forward", "filter", NF_INET_FORWARD, 0, NF_DROP},
      {"output", "filter", NF_INET_LOCAL_OUT, 0, NF_DROP},
  };
  for (const ChainDef& c : chains) {
    ChainPtr ch(nftnl_chain_alloc());
    nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_TABLE, r.table.c_str());
    nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_NAME, c.name);
    nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_TYPE, c.type);
    nftnl_chain_set_u32(ch.get(), NFTNL_CHAIN_HOOKNUM, c.hook);
    nftnl_chain_set_s32(ch.get(), NFTNL_CHAIN_PRIO, c.prio);
    nftnl_chain_set_u32(ch.get(), NFTNL_CHAIN_POLICY, c.policy);
    nftnl_chain_nlmsg_build_payload(batch.header(NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_EXCL),
                                    ch.get());
    batch.next();
  }
  std::vector<RulePtr> rules;
  rules.push_back(RuleBuilder(r.table, "prerouting")
                      .ipv4()
                      .ifname(NFT_META_IIFNAME, r.tap)
                      .l4proto(IPPROTO_TCP)
                      .redirect(r.proxy_port)
                      .take());
  rules.push_back(RuleBuilder(r.table, "prerouting")
                      .ipv4()
                      .ifname(NFT_META_IIFNAME, r.tap)
                      .l4proto(IPPROTO_UDP)
                      .dport(kDnsPort)
                      .redirect(r.dns_port)
                      .take());
  rules.push_back(RuleBuilder(r.table, "input").ifname(NFT_META_IIFNAME, "lo").accept().take());
  // The only two ports of the gateway the guest may reach: the proxy (TCP) and resolver (UDP).
  for (auto [proto, port] : {std::pair<uint8_t, uint16_t>{IPPROTO_TCP, r.proxy_port},
                             std::pair<uint8_t, uint16_t>{IPPROTO_UDP, r.dns_port}}) {
    rules.push_back(RuleBuilder(r.table, "input")
                        .ipv4()
                        .ifname(NFT_META_IIFNAME, r.tap)
                        .l4proto(proto)
                        .dport(port)
                        .accept()
                        .take());
  }
  rules.push_back(RuleBuilder(r.table, "output").ifname(NFT_META_OIFNAME, "lo").accept().take());
  rules.push_back(RuleBuilder(r.table, "output").ctEstablishedOrRelated().accept().take());
  for (const RulePtr& rule : rules) {
    nftnl_rule_nlmsg_build_payload(batch.header(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND),
                                   rule.get());
    batch.next();
  }
  if (Status st = batch.send(); !st) {
    return makeError(st.error().withContext(fmt::format("installing nftables table {}", r.table)));
  }
  return ok();
}

Status deleteTable(const std::string& name) {
  Batch batch;
  TablePtr t(nftnl_table_alloc());
  nftnl_table_set_u32(t.get(), NFTNL_TABLE_FAMILY, NFPROTO_INET);
  nftnl_table_set_str(t.get(), NFTNL_TABLE_NAME, name.c_str());
  nftnl_table_nlmsg_build_payload(batch.header(NFT_MSG_DELTABLE, 0), t.get());
  batch.next();
  Status st = batch.send();
  if (!st && st.error().sysErrno() == ENOENT) {
    return ok();
  }
  return st;
}

}  // namespace matchlock::net
