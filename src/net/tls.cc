// SPDX-License-Identifier: Apache-2.0
#include "net/tls.h"

#include <fmt/format.h>
#include <openssl/bio.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>

#include "common/strings.h"
#include "net/policy.h"

namespace matchlock::net {

namespace {

using BioPtr = CPtr<BIO, &BIO_free>;
using X509ExtPtr = CPtr<X509_EXTENSION, &X509_EXTENSION_free>;
using BignumPtr = CPtr<BIGNUM, &BN_free>;

constexpr int kLeafCacheMax = 4096;

Result<EvpPkeyPtr> generateEcKey() {
  EvpPkeyPtr key(EVP_EC_gen("P-256"));
  if (!key) {
    return makeError(Errc::Internal, "EC key generation: " + sslErrorString());
  }
  return key;
}

Status addExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509ExtPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1) {
    return makeError(Errc::Internal, fmt::format("x509 extension {}: {}", nid, sslErrorString()));
  }
  return ok();
}

Status randomSerial(X509* cert) {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) {
    return makeError(Errc::Internal, "RAND_bytes");
  }
  bytes[0] &= 0x7f;  // positive
  BignumPtr bn(BN_bin2bn(bytes, sizeof(bytes), nullptr));
  if (!bn || BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert)) == nullptr) {
    return makeError(Errc::Internal, "serial: " + sslErrorString());
  }
  return ok();
}

Status setName(X509_NAME* name, std::string_view cn) {
  std::string s(cn.substr(0, 64));  // CN is limited to 64 characters
  if (X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>("Matchlock"), -1, -1,
                                 0) != 1 ||
      X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(s.c_str()), -1, -1,
                                 0) != 1) {
    return makeError(Errc::Internal, "x509 name: " + sslErrorString());
  }
  return ok();
}

}  // namespace

std::string sslErrorString() {
  unsigned long code = ERR_get_error();  // NOLINT(google-runtime-int)
  std::string out;
  while (code != 0) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof(buf));
    out = buf;
    code = ERR_get_error();
  }
  return out.empty() ? "unknown TLS error" : out;
}

Result<std::unique_ptr<CertAuthority>> CertAuthority::generate(std::string_view common_name) {
  std::unique_ptr<CertAuthority> ca(new CertAuthority());
  ML_ASSIGN_OR_RETURN(ca->ca_key_, generateEcKey());
  ML_ASSIGN_OR_RETURN(ca->leaf_key_, generateEcKey());
  X509Ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), 2) != 1) {
    return makeError(Errc::Internal, "X509_new");
  }
  ML_RETURN_IF_ERROR(randomSerial(cert.get()));
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -300);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 60L * 60 * 24 * 365 * 10);
  ML_RETURN_IF_ERROR(setName(X509_get_subject_name(cert.get()), common_name));
  X509_set_issuer_name(cert.get(), X509_get_subject_name(cert.get()));
  X509_set_pubkey(cert.get(), ca->ca_key_.get());
  ML_RETURN_IF_ERROR(
      addExtension(cert.get(), cert.get(), NID_basic_constraints, "critical,CA:TRUE,pathlen:0"));
  ML_RETURN_IF_ERROR(
      addExtension(cert.get(), cert.get(), NID_key_usage, "critical,keyCertSign,cRLSign"));
  ML_RETURN_IF_ERROR(addExtension(cert.get(), cert.get(), NID_subject_key_identifier, "hash"));
  if (X509_sign(cert.get(), ca->ca_key_.get(), EVP_sha256()) == 0) {
    return makeError(Errc::Internal, "CA sign: " + sslErrorString());
  }
  ca->ca_cert_ = std::move(cert);
  return ca;
}

std::string CertAuthority::certPem() const {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), ca_cert_.get()) != 1) {
    return "";
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);  // NOLINT(google-runtime-int)
  return {data, static_cast<size_t>(len)};
}

Result<std::shared_ptr<const LeafCert>> CertAuthority::leafFor(std::string_view name) {
  std::string key = toLower(name);
  {
    std::lock_guard lock(mutex_);
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      return it->second;
    }
  }
  ML_ASSIGN_OR_RETURN(auto leaf, mint(key));
  std::lock_guard lock(mutex_);
  if (cache_.size() >= kLeafCacheMax) {
    cache_.clear();
  }
  cache_.emplace(key, leaf);
  return leaf;
}

size_t CertAuthority::cacheSize() const {
  std::lock_guard lock(mutex_);
  return cache_.size();
}

Result<std::shared_ptr<const LeafCert>> CertAuthority::mint(const std::string& name) const {
  if (name.empty() || name.size() > 253 ||
      name.find_first_of(",\r\n\0 ", 0, 5) != std::string::npos) {
    return makeError(Errc::InvalidSpec, "invalid server name for a certificate");
  }
  X509Ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), 2) != 1) {
    return makeError(Errc::Internal, "X509_new");
  }
  ML_RETURN_IF_ERROR(randomSerial(cert.get()));
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -300);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 60L * 60 * 24 * 365);
  ML_RETURN_IF_ERROR(setName(X509_get_subject_name(cert.get()), name));
  X509_set_issuer_name(cert.get(), X509_get_subject_name(ca_cert_.get()));
  X509_set_pubkey(cert.get(), leaf_key_.get());
  std::string san = isIpLiteral(name) ? "IP:" + name : "DNS:" + name;
  ML_RETURN_IF_ERROR(addExtension(cert.get(), ca_cert_.get(), NID_subject_alt_name, san));
  ML_RETURN_IF_ERROR(addExtension(cert.get(), ca_cert_.get(), NID_basic_constraints, "CA:FALSE"));
  ML_RETURN_IF_ERROR(
      addExtension(cert.get(), ca_cert_.get(), NID_key_usage, "critical,digitalSignature"));
  ML_RETURN_IF_ERROR(addExtension(cert.get(), ca_cert_.get(), NID_ext_key_usage, "serverAuth"));
  ML_RETURN_IF_ERROR(
      addExtension(cert.get(), ca_cert_.get(), NID_authority_key_identifier, "keyid:always"));
  if (X509_sign(cert.get(), ca_key_.get(), EVP_sha256()) == 0) {
    return makeError(Errc::Internal, "leaf sign: " + sslErrorString());
  }
  auto leaf = std::make_shared<LeafCert>();
  leaf->cert = std::move(cert);
  return std::shared_ptr<const LeafCert>(std::move(leaf));
}

Result<SslCtxPtr> makeServerContext() {
  SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()));
  if (!ctx) {
    return makeError(Errc::Internal, "SSL_CTX_new: " + sslErrorString());
  }
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                  SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  // Stateless tickets only (no server-side cache). One ticket also matters for latency: it is the
  // server's only flight after the client's Finished in TLS 1.3, and without it a Nagle-enabled
  // client's first request waits for our delayed ACK (~40 ms). The policy decision runs in the
  // ClientHello callback, which resumption does not skip.
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(ctx.get(), 1);
  SSL_CTX_set_alpn_select_cb(
      ctx.get(),
      [](SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
         unsigned int inlen, void*) -> int {
        // Only HTTP/1.1 is offered for now: the request rewriting (secrets) is HTTP/1.x.
        static const unsigned char kHttp11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
        unsigned char* selected = nullptr;
        if (SSL_select_next_proto(&selected, outlen, kHttp11, sizeof(kHttp11), in, inlen) ==
            OPENSSL_NPN_NEGOTIATED) {
          *out = selected;
          return SSL_TLSEXT_ERR_OK;
        }
        return SSL_TLSEXT_ERR_NOACK;
      },
      nullptr);
  return ctx;
}

Result<SslCtxPtr> makeClientContext(const std::string& ca_file) {
  SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx) {
    return makeError(Errc::Internal, "SSL_CTX_new: " + sslErrorString());
  }
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                  SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  // The system trust store, always, plus the extra bundle when there is one. The store is the
  // hashed certificate directory, looked up lazily at verification time: parsing the whole
  // system bundle up front costs tens of milliseconds per sandbox (and as much again to free).
  // Without a hashed directory, the bundle file is loaded as a fallback.
  const char* dir = std::getenv(X509_get_default_cert_dir_env());
  if (dir == nullptr || *dir == '\0') {
    dir = X509_get_default_cert_dir();
  }
  struct stat st {};
  if (::stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) {
    if (SSL_CTX_load_verify_dir(ctx.get(), dir) != 1) {
      return makeError(Errc::Internal,
                       fmt::format("loading the system trust store {}: {}", dir, sslErrorString()));
    }
  } else if (SSL_CTX_set_default_verify_paths(ctx.get()) != 1) {
    return makeError(Errc::Internal, "loading the system trust store: " + sslErrorString());
  }
  if (!ca_file.empty() && SSL_CTX_load_verify_file(ctx.get(), ca_file.c_str()) != 1) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("loading CA bundle {}: {}", ca_file, sslErrorString()));
  }
  static const unsigned char kAlpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(ctx.get(), kAlpn, sizeof(kAlpn));
  return ctx;
}

std::string serverNameFromExtension(const unsigned char* p, size_t len) {
  // ServerNameList: u16 length, then entries of u8 type, u16 length, name.
  if (len < 5) {
    return "";
  }
  size_t list_len = (static_cast<size_t>(p[0]) << 8) | p[1];
  if (list_len + 2 != len || p[2] != TLSEXT_NAMETYPE_host_name) {
    return "";
  }
  size_t name_len = (static_cast<size_t>(p[3]) << 8) | p[4];
  if (name_len + 5 > len || name_len == 0) {
    return "";
  }
  return {reinterpret_cast<const char*>(p + 5), name_len};
}

bool alpnListHas(const unsigned char* p, size_t len, std::string_view protocol) {
  // ProtocolNameList: u16 length, then entries of u8 length, name.
  if (len < 2) {
    return false;
  }
  size_t i = 2;
  while (i < len) {
    size_t n = p[i];
    if (i + 1 + n > len) {
      return false;
    }
    if (std::string_view(reinterpret_cast<const char*>(p + i + 1), n) == protocol) {
      return true;
    }
    i += 1 + n;
  }
  return false;
}

std::string clientHelloServerName(SSL* ssl) {
  const unsigned char* p = nullptr;
  size_t len = 0;
  if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &p, &len) == 0) {
    return "";
  }
  return serverNameFromExtension(p, len);
}

bool clientHelloOffers(SSL* ssl, std::string_view protocol) {
  const unsigned char* p = nullptr;
  size_t len = 0;
  if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_application_layer_protocol_negotiation, &p,
                                &len) == 0) {
    return false;
  }
  return alpnListHas(p, len, protocol);
}

bool isValidServerName(std::string_view name) {
  return name.size() <= 253 && std::all_of(name.begin(), name.end(), [](char c) {
           return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '-' || c == '_' || c == '.';
         });
}

}  // namespace matchlock::net
