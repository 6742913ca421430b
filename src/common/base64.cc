// SPDX-License-Identifier: Apache-2.0
#include "common/base64.h"

#include <openssl/evp.h>

#include <algorithm>

namespace matchlock {

std::string base64Encode(std::string_view in) {
  std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(in.data()),
                          static_cast<int>(in.size()));
  out.resize(static_cast<size_t>(std::max(n, 0)));
  return out;
}

Result<std::string> base64Decode(std::string_view in) {
  if (in.size() % 4 != 0 || in.size() > (size_t{1} << 30)) {
    return makeError(Errc::InvalidSpec, "invalid base64: bad length");
  }
  size_t pad = 0;
  while (pad < 2 && pad < in.size() && in[in.size() - 1 - pad] == '=') {
    ++pad;
  }
  for (size_t i = 0; i + pad < in.size(); ++i) {
    char c = in[i];
    bool valid = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '+' || c == '/';
    if (!valid) {
      return makeError(Errc::InvalidSpec, "invalid base64: unexpected character");
    }
  }
  std::string out(in.size() / 4 * 3 + 1, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(in.data()),
                          static_cast<int>(in.size()));
  if (n < 0 || static_cast<size_t>(n) < pad) {
    return makeError(Errc::InvalidSpec, "invalid base64");
  }
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

}  // namespace matchlock
