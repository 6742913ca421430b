// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "common/cptr.h"
#include "common/result.h"

namespace matchlock::net {

using SslCtxPtr = CPtr<SSL_CTX, &SSL_CTX_free>;
using SslPtr = CPtr<SSL, &SSL_free>;
using X509Ptr = CPtr<X509, &X509_free>;
using EvpPkeyPtr = CPtr<EVP_PKEY, &EVP_PKEY_free>;

/// The newest OpenSSL error queue entry as text (clears the queue).
std::string sslErrorString();

/// A minted leaf certificate; shares the CA's leaf key.
struct LeafCert {
  X509Ptr cert;
};

/// A per-sandbox MITM certificate authority: an EC P-256 key and a self-signed CA certificate,
/// generated in memory (the key never touches disk), plus a cache of leaf certificates minted per
/// server name. Thread-safe.
class CertAuthority {
 public:
  static Result<std::unique_ptr<CertAuthority>> generate(
      std::string_view common_name = "Matchlock Sandbox CA");

  /// The CA certificate in PEM, to install in the guest's trust store.
  std::string certPem() const;
  X509* caCert() const { return ca_cert_.get(); }
  /// The key every leaf certificate carries (one key per sandbox, as mitmproxy does, keeps minting
  /// to a signature).
  EVP_PKEY* leafKey() const { return leaf_key_.get(); }

  /// The leaf for `name` (DNS name or IP literal), minted on first use and cached.
  Result<std::shared_ptr<const LeafCert>> leafFor(std::string_view name);
  size_t cacheSize() const;

 private:
  CertAuthority() = default;
  Result<std::shared_ptr<const LeafCert>> mint(const std::string& name) const;

  EvpPkeyPtr ca_key_;
  X509Ptr ca_cert_;
  EvpPkeyPtr leaf_key_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::shared_ptr<const LeafCert>> cache_;
};

/// ClientHello peeking (the guest's bytes, parsed in the proxy's ClientHello callback). The
/// extension parsers take the extension's body as OpenSSL hands it over and read nothing outside
/// it.
/// The host_name entry of a server_name extension body; "" when absent or malformed.
std::string serverNameFromExtension(const unsigned char* p, size_t len);
/// Whether an ALPN extension body lists `protocol`.
bool alpnListHas(const unsigned char* p, size_t len, std::string_view protocol);
/// The ClientHello's server name ("" when it sent none or a malformed one).
std::string clientHelloServerName(SSL* ssl);
/// Whether the ClientHello offers ALPN `protocol`.
bool clientHelloOffers(SSL* ssl, std::string_view protocol);
/// SNI is a DNS name: letters, digits, '-', '_', '.' (it ends up in certificates, events and
/// response headers, so nothing else is let through).
bool isValidServerName(std::string_view name);

/// Server-side (guest-facing) TLS context: TLS 1.2/1.3, ALPN "http/1.1".
Result<SslCtxPtr> makeServerContext();

/// Client-side (upstream) TLS context verifying peers against `ca_file` when non-empty, else the
/// system trust store. Verification is never disabled.
Result<SslCtxPtr> makeClientContext(const std::string& ca_file);

}  // namespace matchlock::net
