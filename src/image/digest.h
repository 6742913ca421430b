// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <openssl/evp.h>

#include <string>
#include <string_view>

#include "common/cptr.h"
#include "common/result.h"

namespace matchlock::image {

/// A content digest "sha256:<64 lower-case hex>". Only sha256 is accepted (the OCI default and the
/// only algorithm registries use in practice); anything else is rejected as InvalidSpec.
struct Digest {
  std::string algo;  // "sha256"
  std::string hex;

  std::string str() const { return algo + ":" + hex; }
  bool operator==(const Digest&) const = default;
};

/// Parses and validates "sha256:<hex>".
[[nodiscard]] Result<Digest> parseDigest(std::string_view text);

/// Incremental SHA-256 (OpenSSL EVP).
class Sha256 {
 public:
  Sha256();
  void update(std::string_view data);
  /// Finishes and returns the digest; the object must not be updated afterwards.
  Digest finish();

 private:
  CPtr<EVP_MD_CTX, &EVP_MD_CTX_free> ctx_;
};

Digest digestOf(std::string_view data);

/// Hashes a whole file.
[[nodiscard]] Result<Digest> digestOfFile(const std::string& path);

}  // namespace matchlock::image
