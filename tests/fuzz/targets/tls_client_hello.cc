// SPDX-License-Identifier: Apache-2.0
// The first bytes a guest sends on a TLS connection, through OpenSSL's server handshake up to the
// ClientHello callback, where the proxy reads the server name and the ALPN list; and the two
// extension parsers on raw extension bodies. A name that passes isValidServerName is a DNS name
// only.
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <string>

#include "fuzz_check.h"
#include "net/tls.h"

namespace net = matchlock::net;

namespace {

int onHello(SSL* ssl, int* alert, void*) {
  std::string sni = net::clientHelloServerName(ssl);
  (void)net::clientHelloOffers(ssl, "h2");
  (void)net::clientHelloOffers(ssl, "http/1.1");
  if (net::isValidServerName(sni)) {
    FUZZ_CHECK(sni.size() <= 253 && sni.find_first_of("/:@ \r\n%") == std::string::npos);
  }
  *alert = SSL_AD_INTERNAL_ERROR;
  return SSL_CLIENT_HELLO_ERROR;  // stop here: what follows is OpenSSL's, not ours
}

SSL_CTX* context() {
  static SSL_CTX* ctx = [] {
    SSL_CTX* c = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_client_hello_cb(c, onHello, nullptr);
    return c;
  }();
  return ctx;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 0 && data[0] == 0xff) {
    // Raw extension bodies.
    const unsigned char* p = data + 1;
    size_t len = size - 1;
    std::string name = net::serverNameFromExtension(p, len);
    FUZZ_CHECK(name.size() + 5 <= std::max<size_t>(len, 5));
    (void)net::alpnListHas(p, len, "h2");
    return 0;
  }
  SSL* ssl = SSL_new(context());
  BIO* in = BIO_new_mem_buf(data, static_cast<int>(size));
  BIO* out = BIO_new(BIO_s_mem());
  SSL_set_bio(ssl, in, out);
  (void)SSL_accept(ssl);
  SSL_free(ssl);
  ERR_clear_error();
  return 0;
}
