// SPDX-License-Identifier: Apache-2.0
#include "guest/init/net.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string_view>
#include <vector>

#include "common/fd.h"

namespace matchlock::guest {
namespace {

/// One rtnetlink request built in a byte buffer: header, family struct, then attributes.
class NlRequest {
 public:
  NlRequest(uint16_t type, uint16_t flags) {
    buf_.resize(NLMSG_HDRLEN);
    hdr()->nlmsg_type = type;
    hdr()->nlmsg_flags = static_cast<uint16_t>(NLM_F_REQUEST | NLM_F_ACK | flags);
    hdr()->nlmsg_seq = ++seq_;
    sync();
  }
  template <class T>
  void body(const T& t) {
    append(&t, sizeof(t));
  }
  void attr(uint16_t type, const void* data, size_t len) {
    rtattr a{};
    a.rta_len = static_cast<uint16_t>(RTA_LENGTH(len));
    a.rta_type = type;
    append(&a, sizeof(a));
    append(data, len);
  }
  std::string_view bytes() const { return {buf_.data(), buf_.size()}; }

 private:
  nlmsghdr* hdr() { return reinterpret_cast<nlmsghdr*>(buf_.data()); }
  void append(const void* p, size_t len) {
    const char* c = static_cast<const char*>(p);
    buf_.insert(buf_.end(), c, c + len);
    buf_.resize(NLMSG_ALIGN(buf_.size()), '\0');
    sync();
  }
  void sync() { hdr()->nlmsg_len = static_cast<uint32_t>(buf_.size()); }

  std::vector<char> buf_;
  static inline uint32_t seq_ = 0;
};

Status talk(const NlRequest& req, std::string_view what) {
  Fd fd(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE));
  if (!fd) {
    return makeError(Errc::System, "netlink socket", errno);
  }
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  auto bytes = req.bytes();
  if (::sendto(fd.get(), bytes.data(), bytes.size(), 0, reinterpret_cast<sockaddr*>(&kernel),
               sizeof(kernel)) < 0) {
    return makeError(Errc::System, fmt::format("netlink {}", what), errno);
  }
  char reply[4096];
  ssize_t n = ::recv(fd.get(), reply, sizeof(reply), 0);
  if (n < static_cast<ssize_t>(NLMSG_HDRLEN + sizeof(nlmsgerr))) {
    return makeError(Errc::System, fmt::format("netlink {}: no acknowledgement", what), errno);
  }
  const auto* h = reinterpret_cast<const nlmsghdr*>(reply);
  if (h->nlmsg_type == NLMSG_ERROR) {
    const auto* err = reinterpret_cast<const nlmsgerr*>(reply + NLMSG_HDRLEN);
    if (err->error != 0 && err->error != -EEXIST) {
      return makeError(Errc::System, fmt::format("netlink {}", what), -err->error);
    }
  }
  return ok();
}

Status linkUp(int index, int mtu) {
  NlRequest req(RTM_NEWLINK, 0);
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  ifi.ifi_index = index;
  ifi.ifi_flags = IFF_UP;
  ifi.ifi_change = IFF_UP;
  req.body(ifi);
  if (mtu > 0) {
    auto m = static_cast<uint32_t>(mtu);
    req.attr(IFLA_MTU, &m, sizeof(m));
  }
  return talk(req, "link up");
}

}  // namespace

Status bringUpLoopback() {
  unsigned index = ::if_nametoindex("lo");
  if (index == 0) {
    return makeError(Errc::NotFound, "no loopback interface", errno);
  }
  return linkUp(static_cast<int>(index), 0);
}

Status configureInterface(const NetConfig& c) {
  unsigned index = ::if_nametoindex(c.iface.c_str());
  if (index == 0) {
    return makeError(Errc::NotFound, fmt::format("no network interface {}", c.iface));
  }
  size_t slash = c.address.find('/');
  std::string ip = c.address.substr(0, slash);
  int prefix = slash == std::string::npos ? 24 : std::atoi(c.address.c_str() + slash + 1);
  in_addr addr{};
  if (::inet_pton(AF_INET, ip.c_str(), &addr) != 1 || prefix < 0 || prefix > 32) {
    return makeError(Errc::InvalidSpec, fmt::format("bad address '{}'", c.address));
  }
  ML_RETURN_IF_ERROR(linkUp(static_cast<int>(index), c.mtu));

  NlRequest a(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
  ifaddrmsg ifa{};
  ifa.ifa_family = AF_INET;
  ifa.ifa_prefixlen = static_cast<unsigned char>(prefix);
  ifa.ifa_index = index;
  a.body(ifa);
  a.attr(IFA_LOCAL, &addr, sizeof(addr));
  a.attr(IFA_ADDRESS, &addr, sizeof(addr));
  ML_RETURN_IF_ERROR(talk(a, "address"));

  if (!c.gateway.empty()) {
    in_addr gw{};
    if (::inet_pton(AF_INET, c.gateway.c_str(), &gw) != 1) {
      return makeError(Errc::InvalidSpec, fmt::format("bad gateway '{}'", c.gateway));
    }
    NlRequest r(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE);
    rtmsg rt{};
    rt.rtm_family = AF_INET;
    rt.rtm_table = RT_TABLE_MAIN;
    rt.rtm_protocol = RTPROT_BOOT;
    rt.rtm_scope = RT_SCOPE_UNIVERSE;
    rt.rtm_type = RTN_UNICAST;
    r.body(rt);
    r.attr(RTA_GATEWAY, &gw, sizeof(gw));
    auto oif = static_cast<uint32_t>(index);
    r.attr(RTA_OIF, &oif, sizeof(oif));
    ML_RETURN_IF_ERROR(talk(r, "default route"));
  }
  return ok();
}

}  // namespace matchlock::guest
