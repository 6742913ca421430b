// SPDX-License-Identifier: Apache-2.0
#include "image/digest.h"

#include <fmt/format.h>

#include "common/fd.h"
#include "common/strings.h"

namespace matchlock::image {

Result<Digest> parseDigest(std::string_view text) {
  size_t colon = text.find(':');
  if (colon == std::string_view::npos) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid digest '{}': want sha256:<hex>", text));
  }
  std::string_view algo = text.substr(0, colon);
  std::string_view hex = text.substr(colon + 1);
  if (algo != "sha256") {
    return makeError(Errc::InvalidSpec,
                     fmt::format("unsupported digest algorithm '{}' in '{}'", algo, text));
  }
  if (hex.size() != 64) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid digest '{}': want 64 hex digits", text));
  }
  for (char c : hex) {
    bool is_hex = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
    if (!is_hex) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid digest '{}': want lower-case hex", text));
    }
  }
  return Digest{std::string(algo), std::string(hex)};
}

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  ML_CHECK(ctx_ != nullptr, "EVP_MD_CTX_new");
  ML_CHECK(EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) == 1, "EVP_DigestInit_ex");
}

void Sha256::update(std::string_view data) {
  ML_CHECK(EVP_DigestUpdate(ctx_.get(), data.data(), data.size()) == 1, "EVP_DigestUpdate");
}

Digest Sha256::finish() {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  ML_CHECK(EVP_DigestFinal_ex(ctx_.get(), out, &len) == 1, "EVP_DigestFinal_ex");
  return Digest{"sha256", toHex(std::string_view(reinterpret_cast<const char*>(out), len))};
}

Digest digestOf(std::string_view data) {
  Sha256 h;
  h.update(data);
  return h.finish();
}

Result<Digest> digestOfFile(const std::string& path) {
  Sha256 h;
  ML_RETURN_IF_ERROR(readFileChunks(path, [&](std::string_view c) { h.update(c); }));
  return h.finish();
}

}  // namespace matchlock::image
