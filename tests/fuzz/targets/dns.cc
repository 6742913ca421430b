// SPDX-License-Identifier: Apache-2.0
// The sandbox resolver's DNS parsing: a query's question (bytes from the guest) and an upstream
// response's answer section (bytes from the network), which decide what is pinned for the
// proxy's destination check.
#include "net/dns.h"

#include <arpa/inet.h>

#include <string>

#include "fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view msg = fuzz::asView(data, size);
  uint16_t qtype = 0;
  size_t end = 0;
  std::string name = matchlock::net::dnsQuestionName(msg, &qtype, &end);
  if (!name.empty()) {
    FUZZ_CHECK(end >= 12 && end <= msg.size());
    FUZZ_CHECK(name.size() <= 253);
  }
  for (const auto& a : matchlock::net::dnsAnswerAddresses(msg, name.empty() ? 12 : end)) {
    unsigned char raw[16];
    FUZZ_CHECK(::inet_pton(AF_INET, a.ip.c_str(), raw) == 1 ||
               ::inet_pton(AF_INET6, a.ip.c_str(), raw) == 1);
  }
  return 0;
}
