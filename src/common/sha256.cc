// SPDX-License-Identifier: Apache-2.0
#include "common/sha256.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "common/result.h"
#include "common/strings.h"

namespace matchlock {

std::string sha256Hex(std::string_view data) {
  unsigned char md[SHA256_DIGEST_LENGTH];
  unsigned int len = 0;
  int rc = EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  ML_CHECK(rc == 1 && len == SHA256_DIGEST_LENGTH, "EVP_Digest(sha256) failed");
  return toHex(std::string_view(reinterpret_cast<const char*>(md), len));
}

std::string hmacSha256Hex(std::string_view key, std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  const unsigned char* out =
      HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
           reinterpret_cast<const unsigned char*>(data.data()), data.size(), md, &len);
  ML_CHECK(out != nullptr, "HMAC(sha256) failed");
  return toHex(std::string_view(reinterpret_cast<const char*>(md), len));
}

}  // namespace matchlock
