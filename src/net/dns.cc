// SPDX-License-Identifier: Apache-2.0
#include "net/dns.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <sys/socket.h>

#include <cerrno>
#include <system_error>

#include "common/log.h"

namespace matchlock::net {

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kHeader = 12;
constexpr uint16_t kTypeA = 1;
constexpr uint16_t kTypeAaaa = 28;
constexpr uint16_t kClassIn = 1;
constexpr int kRcodeNxDomain = 3;
constexpr int kRcodeRefused = 5;
constexpr std::chrono::seconds kQueryTimeout{5};

uint16_t get16(std::string_view m, size_t off) {
  return static_cast<uint16_t>((static_cast<unsigned char>(m[off]) << 8) |
                               static_cast<unsigned char>(m[off + 1]));
}

void put16(std::string* m, size_t off, uint16_t v) {
  (*m)[off] = static_cast<char>(v >> 8);
  (*m)[off + 1] = static_cast<char>(v & 0xff);
}

/// Skips a (possibly compressed) name starting at `off`; returns the offset after it or npos.
size_t skipName(std::string_view m, size_t off) {
  for (int labels = 0; labels < 128; ++labels) {
    if (off >= m.size()) {
      return std::string_view::npos;
    }
    auto len = static_cast<unsigned char>(m[off]);
    if (len == 0) {
      return off + 1;
    }
    if ((len & 0xc0) == 0xc0) {
      return off + 2 <= m.size() ? off + 2 : std::string_view::npos;
    }
    if ((len & 0xc0) != 0) {
      return std::string_view::npos;
    }
    off += 1 + len;
  }
  return std::string_view::npos;
}

/// A header-plus-question answer with `rcode` and no records.
std::string errorReply(std::string_view query, size_t question_end, int rcode) {
  std::string r(query.substr(0, question_end));
  uint16_t flags = get16(r, 2);
  flags = static_cast<uint16_t>((flags & 0x0100) | 0x8000 | 0x0080 | rcode);  // QR, RD kept, RA
  put16(&r, 2, flags);
  put16(&r, 6, 0);
  put16(&r, 8, 0);
  put16(&r, 10, 0);
  return r;
}

}  // namespace

std::string dnsQuestionName(std::string_view msg, uint16_t* qtype, size_t* end) {
  if (msg.size() < kHeader || get16(msg, 4) != 1) {
    return "";
  }
  std::string name;
  size_t off = kHeader;
  for (;;) {
    if (off >= msg.size()) {
      return "";
    }
    auto len = static_cast<unsigned char>(msg[off]);
    if (len == 0) {
      ++off;
      break;
    }
    if (len > 63 || off + 1 + len > msg.size()) {
      return "";  // compression is not valid in a question
    }
    if (!name.empty()) {
      name += '.';
    }
    name.append(msg.substr(off + 1, len));
    off += 1 + len;
    if (name.size() > 253) {
      return "";
    }
  }
  if (off + 4 > msg.size()) {
    return "";
  }
  *qtype = get16(msg, off);
  *end = off + 4;
  return name.empty() ? "." : normalizeHost(name);
}

std::vector<DnsAddress> dnsAnswerAddresses(std::string_view msg, size_t off) {
  std::vector<DnsAddress> out;
  if (msg.size() < kHeader) {
    return out;
  }
  uint16_t ancount = get16(msg, 6);
  for (uint16_t i = 0; i < ancount; ++i) {
    off = skipName(msg, off);
    if (off == std::string_view::npos || off + 10 > msg.size()) {
      break;
    }
    uint16_t type = get16(msg, off);
    uint16_t klass = get16(msg, off + 2);
    uint32_t ttl = (static_cast<uint32_t>(get16(msg, off + 4)) << 16) | get16(msg, off + 6);
    uint16_t rdlen = get16(msg, off + 8);
    off += 10;
    if (off + rdlen > msg.size()) {
      break;
    }
    char text[INET6_ADDRSTRLEN] = {};
    if (klass == kClassIn && type == kTypeA && rdlen == 4) {
      ::inet_ntop(AF_INET, msg.data() + off, text, sizeof(text));
    } else if (klass == kClassIn && type == kTypeAaaa && rdlen == 16) {
      ::inet_ntop(AF_INET6, msg.data() + off, text, sizeof(text));
    }
    if (text[0] != '\0') {
      out.push_back(DnsAddress{text, ttl});
    }
    off += rdlen;
  }
  return out;
}

void DnsPins::pin(std::string_view name, std::string_view ip, std::chrono::seconds ttl) {
  auto keep = std::max(ttl, kMinPin);
  auto until = Clock::now() + keep;
  auto& slot = pins_[{normalizeHost(name), std::string(ip)}];
  slot = std::max(slot, until);
}

bool DnsPins::allows(std::string_view name, std::string_view ip) const {
  auto it = pins_.find({normalizeHost(name), std::string(ip)});
  return it != pins_.end() && it->second >= Clock::now();
}

std::vector<std::string> DnsPins::namesFor(std::string_view ip) const {
  std::vector<std::string> names;
  auto now = Clock::now();
  for (const auto& [key, until] : pins_) {
    if (key.second == ip && until >= now) {
      names.push_back(key.first);
    }
  }
  return names;
}

struct DnsResolver::PendingQuery {
  sys::SockAddr client;
  uint16_t client_id = 0;
  std::string name;
  Fd socket;
  ev::Watch watch;
  sys::SockAddr upstream;
  Clock::time_point deadline;
};

Result<std::unique_ptr<DnsResolver>> DnsResolver::create(ev::Loop& loop,
                                                         const sys::SockAddr& listen,
                                                         std::vector<sys::SockAddr> upstreams,
                                                         std::shared_ptr<PolicyStore> policy,
                                                         DnsPins* pins) {
  if (upstreams.empty()) {
    return makeError(Errc::InvalidSpec, "the sandbox resolver needs at least one upstream server");
  }
  std::unique_ptr<DnsResolver> r(new DnsResolver(loop, std::move(policy), pins));
  r->upstreams_ = std::move(upstreams);
  ML_ASSIGN_OR_RETURN(r->socket_, sys::bindUdp(listen));
  ML_ASSIGN_OR_RETURN(r->address_, sys::localAddress(r->socket_.get()));
  DnsResolver* raw = r.get();
  ML_ASSIGN_OR_RETURN(r->watch_,
                      loop.watch(r->socket_.get(), ev::kRead, [raw](uint32_t) { raw->onQuery(); }));
  ML_ASSIGN_OR_RETURN(r->sweep_timer_, loop.timer([raw] { raw->sweep(); }));
  ML_RETURN_IF_ERROR(r->sweep_timer_.arm(std::chrono::seconds(1), std::chrono::seconds(1)));
  ML_LOG(proxy, info, "sandbox resolver listening on {}", r->address_.toString());
  return r;
}

DnsResolver::DnsResolver(ev::Loop& loop, std::shared_ptr<PolicyStore> policy, DnsPins* pins)
    : loop_(loop), policy_(std::move(policy)), pins_(pins) {}

DnsResolver::~DnsResolver() {
  pending_.clear();
  watch_.reset();
}

void DnsResolver::onQuery() {
  for (int i = 0; i < 64; ++i) {
    char buf[1500];
    sys::SockAddr from;
    from.len = sizeof(from.storage);
    ssize_t n = ::recvfrom(socket_.get(), buf, sizeof(buf), 0, from.raw(), &from.len);
    if (n < 0) {
      return;
    }
    std::string_view query(buf, static_cast<size_t>(n));
    if (query.size() < kHeader || (get16(query, 2) & 0x8000) != 0) {
      continue;  // too short, or a response
    }
    uint16_t qtype = 0;
    size_t qend = 0;
    std::string name = dnsQuestionName(query, &qtype, &qend);
    std::string reply;
    if (name.empty() || ((get16(query, 2) >> 11) & 0xf) != 0 || get16(query, 4 + 2) != 0) {
      if (qend == 0) {
        continue;  // unparseable: drop
      }
      reply = errorReply(query, qend, kRcodeRefused);
    } else {
      Decision d = policy_->snapshot()->checkHost(name);
      if (!d.allowed || isIpLiteral(name)) {
        ML_LOG(proxy, info, "DNS: NXDOMAIN for {} ({})", name, d.allowed ? "IP literal" : d.reason);
        reply = errorReply(query, qend, kRcodeNxDomain);
      }
    }
    if (!reply.empty()) {
      (void)::sendto(socket_.get(), reply.data(), reply.size(), 0, from.raw(), from.len);
      continue;
    }
    // Forward on a fresh socket (random source port per query, against cache poisoning).
    auto pq = std::make_unique<PendingQuery>();
    pq->client = from;
    pq->client_id = get16(query, 0);
    pq->name = name;
    pq->upstream = upstreams_[next_id_ % upstreams_.size()];
    pq->deadline = Clock::now() + kQueryTimeout;
    pq->socket.reset(::socket(pq->upstream.family(), SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!pq->socket) {
      continue;
    }
    uint16_t id = next_id_++;
    std::string fwd(query);
    put16(&fwd, 0, id);
    if (::sendto(pq->socket.get(), fwd.data(), fwd.size(), 0, pq->upstream.raw(),
                 pq->upstream.len) < 0) {
      ML_LOG(proxy, warn, "DNS: forwarding to {}: {}", pq->upstream.toString(),
             std::generic_category().message(errno));
      std::string fail = errorReply(query, qend, 2);  // SERVFAIL
      (void)::sendto(socket_.get(), fail.data(), fail.size(), 0, from.raw(), from.len);
      continue;
    }
    auto w = loop_.watch(pq->socket.get(), ev::kRead, [this, id](uint32_t) { onUpstream(id); });
    if (!w) {
      continue;
    }
    pq->watch = std::move(*w);
    pending_[id] = std::move(pq);
  }
}

void DnsResolver::onUpstream(uint16_t upstream_id) {
  auto it = pending_.find(upstream_id);
  if (it == pending_.end()) {
    return;
  }
  PendingQuery& pq = *it->second;
  char buf[4096];
  sys::SockAddr from;
  from.len = sizeof(from.storage);
  ssize_t n = ::recvfrom(pq.socket.get(), buf, sizeof(buf), 0, from.raw(), &from.len);
  if (n < 0) {
    return;
  }
  std::string msg(buf, static_cast<size_t>(n));
  if (from.toString() != pq.upstream.toString() || msg.size() < kHeader ||
      get16(msg, 0) != upstream_id || (get16(msg, 2) & 0x8000) == 0) {
    return;  // spoofed or stray: keep waiting
  }
  uint16_t qtype = 0;
  size_t off = 0;
  std::string qname = dnsQuestionName(msg, &qtype, &off);
  if (qname != pq.name) {
    return;
  }
  for (const DnsAddress& a : dnsAnswerAddresses(msg, off)) {
    if (pins_ != nullptr) {
      // CNAME chains: every address in the answer is pinned for the name that was asked.
      pins_->pin(pq.name, a.ip, std::chrono::seconds(a.ttl));
      ML_LOG(proxy, debug, "DNS: pinned {} -> {}", pq.name, a.ip);
    }
  }
  put16(&msg, 0, pq.client_id);
  (void)::sendto(socket_.get(), msg.data(), msg.size(), 0, pq.client.raw(), pq.client.len);
  pending_.erase(it);
}

void DnsResolver::sweep() {
  auto now = Clock::now();
  std::erase_if(pending_, [&](const auto& kv) { return kv.second->deadline < now; });
}

}  // namespace matchlock::net
