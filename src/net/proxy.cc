// SPDX-License-Identifier: Apache-2.0
#include "net/proxy.h"

#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <optional>
#include <system_error>

#include "common/log.h"
#include "common/scope_exit.h"
#include "common/wipe.h"
#include "net/dns.h"
#include "net/hook_client.h"
#include "net/intercept.h"

namespace matchlock::net {

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kReadChunk = size_t{64} * 1024;
constexpr size_t kMaxBuffered = size_t{512} * 1024;  // per direction, before reads pause
constexpr int kMaxPumpRounds = 256;

int64_t unixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

enum class Io { Ok, Again, Eof, Error };

/// One end of a proxied connection: a socket, optionally with TLS, and its pending output.
struct Side {
  Fd fd;
  SslPtr ssl;
  ev::Watch watch;
  std::string out;
  size_t out_off = 0;
  /// Wipe output once written or dropped, and on destruction: set on the upstream side, whose
  /// requests carry secret values after substitution.
  bool wipe_out = false;
  bool eof = false;
  bool shut_wr = false;
  bool read_wants_write = false;
  bool write_wants_read = false;

  Side() = default;
  Side(const Side&) = delete;
  Side& operator=(const Side&) = delete;
  Side(Side&&) = delete;
  Side& operator=(Side&&) = delete;
  ~Side() {
    if (wipe_out) {
      wipe(out);
    }
  }

  size_t pending() const { return out.size() - out_off; }

  void append(std::string_view data) {
    if (wipe_out) {
      wipeAppend(out, data);
    } else {
      out.append(data);
    }
  }

  /// Drops all output, written or not.
  void discardOut() {
    if (wipe_out) {
      wipe(out.data(), out.size());
    }
    out.clear();
    out_off = 0;
  }

  Io read(char* buf, size_t cap, size_t* n) {
    *n = 0;
    if (ssl) {
      read_wants_write = false;
      ERR_clear_error();
      int r = SSL_read(ssl.get(), buf, static_cast<int>(cap));
      if (r > 0) {
        *n = static_cast<size_t>(r);
        return Io::Ok;
      }
      switch (SSL_get_error(ssl.get(), r)) {
        case SSL_ERROR_WANT_READ:
          return Io::Again;
        case SSL_ERROR_WANT_WRITE:
          read_wants_write = true;
          return Io::Again;
        case SSL_ERROR_ZERO_RETURN:
          return Io::Eof;
        case SSL_ERROR_SYSCALL:
          return r == 0 ? Io::Eof : Io::Error;
        default:
          return Io::Error;
      }
    }
    ssize_t r = ::recv(fd.get(), buf, cap, 0);
    if (r > 0) {
      *n = static_cast<size_t>(r);
      return Io::Ok;
    }
    if (r == 0) {
      return Io::Eof;
    }
    return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? Io::Again : Io::Error;
  }

  /// Writes pending output. Returns Error on a fatal error, Ok when something was written.
  Io flush() {
    bool wrote = false;
    while (pending() > 0) {
      const char* p = out.data() + out_off;
      size_t len = pending();
      if (ssl) {
        write_wants_read = false;
        ERR_clear_error();
        int r = SSL_write(ssl.get(), p, static_cast<int>(std::min<size_t>(len, 1 << 20)));
        if (r <= 0) {
          int err = SSL_get_error(ssl.get(), r);
          if (err == SSL_ERROR_WANT_WRITE) {
            break;
          }
          if (err == SSL_ERROR_WANT_READ) {
            write_wants_read = true;
            break;
          }
          return Io::Error;
        }
        out_off += static_cast<size_t>(r);
      } else {
        ssize_t r = ::send(fd.get(), p, len, MSG_NOSIGNAL);
        if (r < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            break;
          }
          return Io::Error;
        }
        out_off += static_cast<size_t>(r);
      }
      wrote = true;
    }
    if (out_off == out.size()) {
      discardOut();
    } else if (out_off > (1 << 20)) {
      if (wipe_out) {
        wipe(out.data(), out_off);
      }
      out.erase(0, out_off);
      out_off = 0;
    }
    return wrote ? Io::Ok : Io::Again;
  }
};

struct PendingRequest {
  std::string method;
  std::string path;
  std::string url;
  Clock::time_point start;
  uint64_t request_bytes = 0;
  /// The request as the before phase left it (method and target; headers too when an
  /// after-phase callback may need them), before secret substitution: placeholders only.
  http::Head rule_view;
};

/// Wipes what may hold a secret value after substitution: the header values and the target.
void wipeHead(http::Head* head) {
  for (http::Header& h : head->headers) {
    wipe(h.value);
  }
  wipe(head->target);
}

bool looksLikeHttp(const unsigned char* p, size_t n) {
  // Request methods are upper-case tokens followed by a space.
  size_t i = 0;
  while (i < n && p[i] >= 'A' && p[i] <= 'Z') {
    ++i;
  }
  return i > 0 && (i == n || p[i] == ' ');
}

}  // namespace

class Proxy::Connection {
 public:
  enum class Mode { Sniff, Handshake, Http, Raw };
  enum class Up { None, Connecting, Handshake, Ready, Failed };

  Connection(Proxy& proxy, Fd fd, sys::SockAddr orig)
      : proxy_(proxy), orig_(orig), policy_(proxy.policy_->snapshot()) {
    client_.fd = std::move(fd);
    upstream_.wipe_out = true;
    touch();
    sniff_deadline_ = Clock::now() + proxy_.options_.sniff_timeout;
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  Connection(Connection&&) = delete;
  Connection& operator=(Connection&&) = delete;
  ~Connection() = default;

  Status start() {
    ML_ASSIGN_OR_RETURN(client_.watch,
                        proxy_.loop_.watch(client_.fd.get(), ev::kRead,
                                           [this](uint32_t events) { onEvent(events); }));
    return ok();
  }

  /// Called by the proxy's sweep timer.
  void tick(Clock::time_point now) {
    if (closed_) {
      return;
    }
    if (mode_ == Mode::Sniff && now >= sniff_deadline_) {
      startRaw();
      pump();
      return;
    }
    if (up_ == Up::Connecting || up_ == Up::Handshake) {
      if (now >= up_deadline_) {
        failUpstream("upstream connect timed out");
        pump();
        return;
      }
    }
    if (now - last_activity_ > proxy_.options_.idle_timeout) {
      close("idle timeout");
    }
  }

  /// TLS ClientHello callback: decides the host and installs the leaf certificate.
  int onClientHello(SSL* ssl) {
    if (hello_seen_) {
      return SSL_CLIENT_HELLO_SUCCESS;  // resumed after the upstream handshake (see below)
    }
    hello_seen_ = true;
    std::string sni = clientHelloServerName(ssl);
    if (!isValidServerName(sni)) {
      ML_LOG(proxy, debug, "rejecting a ClientHello with a malformed server name");
      return SSL_CLIENT_HELLO_ERROR;
    }
    host_ = normalizeHost(sni.empty() ? orig_.ip() : sni);
    decide();
    auto leaf = proxy_.ca_->leafFor(host_);
    if (!leaf) {
      ML_LOG(proxy, debug, "no certificate for {}: {}", host_, leaf.error().toString());
      return SSL_CLIENT_HELLO_ERROR;
    }
    leaf_ = *leaf;
    if (SSL_use_certificate(ssl, leaf_->cert.get()) != 1 ||
        SSL_use_PrivateKey(ssl, proxy_.ca_->leafKey()) != 1) {
      return SSL_CLIENT_HELLO_ERROR;
    }
    // HTTP/2 pass-through: only when nothing in the headers may need rewriting (no secrets, no
    // interception rules), as HPACK-coded headers are relayed untouched. The client's handshake
    // is paused until the upstream handshake tells us whether upstream speaks h2; the ALPN
    // answer follows upstream.
    auto secrets = proxy_.secrets();
    auto rules = proxy_.rules();
    if (denied_reason_.empty() && clientHelloOffers(ssl, "h2") && (!secrets || secrets->empty()) &&
        (!rules || rules->empty())) {
      alpn_probe_ = true;
      client_paused_ = true;
      connectUpstream();
      if (up_ != Up::Failed) {
        return SSL_CLIENT_HELLO_RETRY;
      }
      client_paused_ = false;
    }
    return SSL_CLIENT_HELLO_SUCCESS;
  }

  /// ALPN selection towards the client: h2 only when upstream agreed to h2, else http/1.1.
  int selectAlpn(const unsigned char** out, unsigned char* outlen, const unsigned char* in,
                 unsigned int inlen) const {
    static const unsigned char kH2[] = {2, 'h', '2'};
    static const unsigned char kHttp11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    unsigned char* selected = nullptr;
    if (upstream_h2_ && SSL_select_next_proto(&selected, outlen, kH2, sizeof(kH2), in, inlen) ==
                            OPENSSL_NPN_NEGOTIATED) {
      *out = selected;
      return SSL_TLSEXT_ERR_OK;
    }
    if (SSL_select_next_proto(&selected, outlen, kHttp11, sizeof(kHttp11), in, inlen) ==
        OPENSSL_NPN_NEGOTIATED) {
      *out = selected;
      return SSL_TLSEXT_ERR_OK;
    }
    return SSL_TLSEXT_ERR_NOACK;
  }

 private:
  void touch() { last_activity_ = Clock::now(); }

  /// Decides whether host_ may be reached at orig_ (allow-list, blocked ranges, DNS pins).
  void decide() {
    Decision d = policy_->checkHost(host_);
    if (d.allowed) {
      d = policy_->checkDestination(orig_.ip());
    }
    if (d.allowed && proxy_.pins_ != nullptr && !isIpLiteral(host_) &&
        !proxy_.pins_->allows(host_, orig_.ip())) {
      d = {false, fmt::format("destination {} was not resolved for {} by the sandbox resolver",
                              orig_.ip(), host_)};
    }
    decided_ = true;
    denied_reason_ = d.allowed ? "" : d.reason;
  }

  void onEvent(uint32_t events) {
    if (closed_) {
      return;
    }
    if ((events & EPOLLERR) != 0) {
      close("socket error");
      return;
    }
    pump();
    if (!closed_ && (events & EPOLLHUP) != 0 && !progressed_) {
      close("hang-up");
    }
  }

  void onUpstreamEvent(uint32_t events) {
    if (closed_) {
      return;
    }
    if (up_ == Up::Connecting) {
      int err = sys::socketError(upstream_.fd.get());
      if (err != 0 || (events & EPOLLERR) != 0) {
        failUpstream(fmt::format("failed to connect to {}: {}", orig_.toString(),
                                 std::generic_category().message(err != 0 ? err : ECONNREFUSED)));
        pump();
        return;
      }
      if ((events & ev::kWrite) == 0) {
        return;
      }
      onConnected();
    }
    pump();
    if (closed_ || (events & (EPOLLHUP | EPOLLERR)) == 0 || progressed_) {
      return;
    }
    if (up_ != Up::Ready) {
      close("upstream hang-up");
      return;
    }
    // Level-triggered HUP/ERR keep firing while reads are paused (backpressure): stop watching.
    // pump() still reads the socket (to its EOF or error) when the client side drains.
    upstream_.watch.reset();
  }

  // --- protocol detection -------------------------------------------------------------------

  void sniff() {
    unsigned char peek[8];
    ssize_t n = ::recv(client_.fd.get(), peek, sizeof(peek), MSG_PEEK);
    if (n == 0) {
      close("client closed before sending");
      return;
    }
    if (n < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        close("recv error");
      }
      return;
    }
    if (peek[0] == 0x16) {
      startTls();
    } else if (looksLikeHttp(peek, static_cast<size_t>(n))) {
      mode_ = Mode::Http;
    } else {
      startRaw();
    }
  }

  void startTls() {
    tls_ = true;
    client_.ssl.reset(SSL_new(proxy_.server_ctx_.get()));
    if (!client_.ssl || SSL_set_fd(client_.ssl.get(), client_.fd.get()) != 1) {
      close("SSL_new failed");
      return;
    }
    SSL_set_app_data(client_.ssl.get(), this);
    SSL_set_accept_state(client_.ssl.get());
    mode_ = Mode::Handshake;
  }

  void startRaw() {
    mode_ = Mode::Raw;
    host_ = orig_.ip();
    Decision d = policy_->checkRawTcp(orig_.ip());
    if (!d.allowed && proxy_.pins_ != nullptr) {
      // Non-HTTP TCP carries no name, but the sandbox resolver knows which allowed name this
      // address was answered for (e.g. ssh to a resolved, allowed git host).
      for (const std::string& name : proxy_.pins_->namesFor(orig_.ip())) {
        if (policy_->checkHost(name).allowed) {
          d = policy_->checkDestination(orig_.ip());
          host_ = name;
          break;
        }
      }
    }
    if (!d.allowed) {
      NetworkEvent e = baseEvent("", "", orig_.toString());
      e.blocked = true;
      e.block_reason = d.reason;
      emit(e);
      ML_LOG(proxy, info, "blocked raw TCP to {}: {}", orig_.toString(), d.reason);
      close("blocked");
      return;
    }
    connectUpstream();
  }

  // --- upstream -------------------------------------------------------------------------------

  void connectUpstream() {
    if (up_ != Up::None) {
      return;
    }
    auto fd = sys::connectTcpNonBlocking(orig_);
    if (!fd) {
      failUpstream(fd.error().toString());
      return;
    }
    upstream_.fd = std::move(*fd);
    auto w = proxy_.loop_.watch(upstream_.fd.get(), ev::kWrite,
                                [this](uint32_t events) { onUpstreamEvent(events); });
    if (!w) {
      failUpstream(w.error().toString());
      return;
    }
    upstream_.watch = std::move(*w);
    up_ = Up::Connecting;
    up_deadline_ = Clock::now() + proxy_.options_.connect_timeout;
  }

  void onConnected() {
    if (!tls_) {
      up_ = Up::Ready;
      return;
    }
    upstream_.ssl.reset(SSL_new(proxy_.client_ctx_.get()));
    SSL* ssl = upstream_.ssl.get();
    if (ssl == nullptr || SSL_set_fd(ssl, upstream_.fd.get()) != 1) {
      failUpstream("SSL_new failed");
      return;
    }
    if (isIpLiteral(host_)) {
      X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host_.c_str());
    } else {
      // SSL_set_tlsext_host_name() is a macro with an old-style cast.
      SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, host_.data());
      SSL_set1_host(ssl, host_.c_str());
    }
    if (alpn_probe_) {
      static const unsigned char kOffer[] = {2,   'h', '2', 8,   'h', 't',
                                             't', 'p', '/', '1', '.', '1'};
      SSL_set_alpn_protos(ssl, kOffer, sizeof(kOffer));
    }
    SSL_set_connect_state(ssl);
    up_ = Up::Handshake;
  }

  /// Drives a TLS handshake; returns true when complete. On failure sets *error.
  static bool handshake(Side& side, uint32_t* want, std::string* error) {
    ERR_clear_error();
    int r = SSL_do_handshake(side.ssl.get());
    if (r == 1) {
      *want = 0;
      return true;
    }
    int err = SSL_get_error(side.ssl.get(), r);
    if (err == SSL_ERROR_WANT_READ) {
      *want = ev::kRead;
    } else if (err == SSL_ERROR_WANT_WRITE) {
      *want = ev::kWrite;
    } else if (err == SSL_ERROR_WANT_CLIENT_HELLO_CB) {
      *want = 0;  // paused by onClientHello until the upstream handshake is done
    } else {
      long verify = SSL_get_verify_result(side.ssl.get());  // NOLINT(google-runtime-int)
      if (verify != X509_V_OK) {
        *error = fmt::format("upstream certificate verification failed: {}",
                             X509_verify_cert_error_string(verify));
      } else {
        *error = fmt::format("TLS handshake failed: {}", sslErrorString());
      }
    }
    return false;
  }

  void failUpstream(std::string reason) {
    up_ = Up::Failed;
    upstream_.watch.reset();
    upstream_.ssl.reset();
    upstream_.fd.reset();
    upstream_.discardOut();
    up_error_ = std::move(reason);
    ML_LOG(proxy, info, "upstream {} ({}) failed: {}", host_, orig_.toString(), up_error_);
    if (mode_ == Mode::Raw) {
      NetworkEvent e = baseEvent("", "", orig_.toString());
      e.status_code = 0;
      e.blocked = false;
      e.block_reason = up_error_;
      emit(e);
      close("upstream failed");
      return;
    }
    // Requests already forwarded get the 502; otherwise the next request does.
    if (!pending_.empty()) {
      PendingRequest req = pending_.front();
      pending_.clear();
      respondAndClose(req, 502, "Bad Gateway", up_error_, true);
    }
  }

  // --- pump -----------------------------------------------------------------------------------

  bool canReadClient() const {
    if (client_.eof || closing_ || reject_pending_) {
      return false;
    }
    if (mode_ == Mode::Sniff || mode_ == Mode::Handshake) {
      return true;
    }
    if (mode_ == Mode::Raw) {
      return up_ == Up::Ready && upstream_.pending() < kMaxBuffered;
    }
    return req_buf_.size() < proxy_.options_.limits.max_head_bytes + kReadChunk &&
           upstream_.pending() < kMaxBuffered;
  }

  bool canReadUpstream() const {
    return up_ == Up::Ready && !upstream_.eof && !held_resp_ && client_.pending() < kMaxBuffered &&
           !(closing_ && mode_ != Mode::Raw);
  }

  void pump() {
    progressed_ = false;
    for (int round = 0; round < kMaxPumpRounds && !closed_; ++round) {
      bool progress = false;
      if (mode_ == Mode::Sniff) {
        sniff();
        if (closed_ || mode_ == Mode::Sniff) {
          break;
        }
        progress = true;
      }
      if (up_ == Up::Handshake) {
        std::string error;
        if (handshake(upstream_, &up_hs_want_, &error)) {
          up_ = Up::Ready;
          const unsigned char* proto = nullptr;
          unsigned int proto_len = 0;
          SSL_get0_alpn_selected(upstream_.ssl.get(), &proto, &proto_len);
          upstream_h2_ = proto_len == 2 && proto[0] == 'h' && proto[1] == '2';
          progress = true;
        } else if (!error.empty()) {
          failUpstream(error);
          progress = true;
        }
      }
      if (client_paused_ && (up_ == Up::Ready || up_ == Up::Failed)) {
        client_paused_ = false;
        progress = true;
      }
      if (mode_ == Mode::Handshake && !client_paused_) {
        std::string error;
        if (!handshake(client_, &client_hs_want_, &error)) {
          if (!error.empty()) {
            close("client " + error);
            return;
          }
          if (!progress) {
            break;
          }
        } else {
          mode_ = Mode::Http;
          progress = true;
          const unsigned char* proto = nullptr;
          unsigned int proto_len = 0;
          SSL_get0_alpn_selected(client_.ssl.get(), &proto, &proto_len);
          if (proto_len == 2 && proto[0] == 'h' && proto[1] == '2') {
            // Both sides agreed on h2: relay the TLS payloads untouched (one event at close).
            mode_ = Mode::Raw;
            h2_ = true;
            tunnel_start_ = Clock::now();
          } else if (denied_reason_.empty()) {
            connectUpstream();
          }
        }
      }
      if (mode_ == Mode::Handshake) {
        progressed_ |= progress;
        if (!progress) {
          break;
        }
        continue;
      }
      // Flush.
      Io f = client_.flush();
      if (f == Io::Error) {
        close("client write error");
        return;
      }
      progress |= f == Io::Ok;
      if (up_ == Up::Ready) {
        f = upstream_.flush();
        if (f == Io::Error) {
          upstream_.eof = true;
          upstream_.discardOut();
          onUpstreamEof();
          progress = true;
        }
        progress |= f == Io::Ok;
      }
      if (closed_) {
        return;
      }
      if (closing_ && client_.pending() == 0) {
        close("done");
        return;
      }
      // Read.
      char buf[kReadChunk];
      if (canReadClient()) {
        size_t n = 0;
        Io r = client_.read(buf, sizeof(buf), &n);
        if (r == Io::Ok) {
          progress = true;
          touch();
          onClientData(std::string_view(buf, n));
        } else if (r == Io::Eof || r == Io::Error) {
          client_.eof = true;
          progress = true;
          onClientEof();
        }
      }
      if (closed_) {
        return;
      }
      if (canReadUpstream()) {
        size_t n = 0;
        Io r = upstream_.read(buf, sizeof(buf), &n);
        if (r == Io::Ok) {
          progress = true;
          touch();
          onUpstreamData(std::string_view(buf, n));
        } else if (r == Io::Eof || r == Io::Error) {
          upstream_.eof = true;
          progress = true;
          onUpstreamEof();
        }
      }
      if (closed_) {
        return;
      }
      if (mode_ == Mode::Raw) {
        // Half-close: once one side ended and its data is flushed, end the other's write side.
        if (client_.eof && upstream_.pending() == 0 && !upstream_.shut_wr && up_ == Up::Ready) {
          upstream_.shut_wr = true;
          if (upstream_.ssl) {
            upstream_.eof = true;
          } else {
            ::shutdown(upstream_.fd.get(), SHUT_WR);
          }
        }
        if (upstream_.eof && client_.pending() == 0 && !client_.shut_wr) {
          client_.shut_wr = true;
          if (client_.ssl) {
            client_.eof = true;
          } else {
            ::shutdown(client_.fd.get(), SHUT_WR);
          }
        }
        if (client_.eof && upstream_.eof && client_.pending() == 0 && upstream_.pending() == 0) {
          close("done");
          return;
        }
      }
      progressed_ |= progress;
      if (!progress) {
        break;
      }
    }
    if (!closed_) {
      updateInterest();
    }
  }

  void updateInterest() {
    uint32_t c = 0;
    if (mode_ == Mode::Handshake) {
      c = client_paused_ ? 0 : (client_hs_want_ == 0 ? ev::kRead : client_hs_want_);
    } else {
      if (canReadClient() || client_.write_wants_read) {
        c |= ev::kRead;
      }
      if (client_.pending() > 0 || client_.read_wants_write) {
        c |= ev::kWrite;
      }
    }
    (void)client_.watch.setEvents(c);
    if (upstream_.watch) {
      uint32_t u = 0;
      if (up_ == Up::Connecting) {
        u = ev::kWrite;
      } else if (up_ == Up::Handshake) {
        u = up_hs_want_ == 0 ? ev::kRead : up_hs_want_;
      } else if (up_ == Up::Ready) {
        if (canReadUpstream() || upstream_.write_wants_read) {
          u |= ev::kRead;
        }
        if (upstream_.pending() > 0 || upstream_.read_wants_write) {
          u |= ev::kWrite;
        }
      }
      (void)upstream_.watch.setEvents(u);
    }
    // Decrypted bytes already inside OpenSSL do not make the fd readable: pump again later.
    bool ssl_buffered =
        (client_.ssl && SSL_pending(client_.ssl.get()) > 0 && canReadClient()) ||
        (upstream_.ssl && SSL_pending(upstream_.ssl.get()) > 0 && canReadUpstream());
    if (ssl_buffered && !repump_posted_) {
      repump_posted_ = true;
      std::weak_ptr<bool> alive = proxy_.alive_;
      Proxy* proxy = &proxy_;
      Connection* self = this;
      proxy_.loop_.post([alive, proxy, self] {
        if (alive.expired() || proxy->connections_.count(self) == 0) {
          return;
        }
        self->repump_posted_ = false;
        self->pump();
      });
    }
  }

  // --- HTTP request side ----------------------------------------------------------------------

  void onClientData(std::string_view data) {
    if (mode_ == Mode::Raw) {
      tunnel_up_bytes_ += data.size();
      upstream_.append(data);
      return;
    }
    req_buf_.append(data);
    processRequests();
  }

  void processRequests() {
    while (!req_buf_.empty() && !reject_pending_ && !closing_ && !closed_ && !held_req_) {
      if (in_req_body_) {
        size_t n = req_body_.consume(req_buf_);
        if (req_body_.failed()) {
          close("malformed chunked request body");
          return;
        }
        if (!pending_.empty()) {
          pending_.back().request_bytes += n;
        }
        upstream_.append(std::string_view(req_buf_).substr(0, n));
        req_buf_.erase(0, n);
        if (req_body_.done()) {
          in_req_body_ = false;
        }
        continue;
      }
      http::Head head;
      http::ParseResult r = http::parseRequestHead(req_buf_, &head, proxy_.options_.limits);
      if (r.state == http::ParseResult::State::Incomplete) {
        return;
      }
      PendingRequest req;
      req.start = Clock::now();
      if (r.state == http::ParseResult::State::Error) {
        req.method = "";
        reject(req, r.error_status, reasonPhrase(r.error_status), r.error, false);
        return;
      }
      req.method = head.method;
      req.path = std::string(head.path());
      auto host_header = head.find("host");
      std::string host = host_header ? normalizeHost(*host_header) : "";
      // One request, one host. Two Host headers, or an absolute-form target whose authority
      // differs from Host, would let an upstream pick a host other than the one checked here
      // (RFC 9112 3.2: the target's authority wins over Host).
      std::string bad_host;
      if (head.count("host") > 1) {
        bad_host = "more than one Host header";
      } else if (auto authority = head.targetAuthority()) {
        std::string named = normalizeHost(*authority);
        if (authority->find('@') != std::string_view::npos || named.empty() ||
            (host_header && named != host)) {
          bad_host = fmt::format("request target names host {}, Host header {}", named,
                                 host_header ? host : std::string("(none)"));
        } else {
          host = named;
        }
      }
      if (!decided_) {
        host_ = host.empty() ? orig_.ip() : host;
        decide();
      }
      req.url = fmt::format("{}://{}{}", tls_ ? "https" : "http", host_, req.path);
      req_buf_.erase(0, r.consumed);
      if (!bad_host.empty()) {
        reject(req, 400, "Bad Request", bad_host, true);
        return;
      }
      if (!denied_reason_.empty()) {
        reject(req, 403, "Forbidden", denied_reason_, true);
        return;
      }
      if (host_header && host != host_) {
        // One connection, one host: the decision (and upstream verification) was for host_.
        reject(req, 421, "Misdirected Request",
               fmt::format("Host {} does not match the connection's host {}", host, host_), true);
        return;
      }
      if (up_ == Up::Failed) {
        reject(req, 502, "Bad Gateway", up_error_, true);
        return;
      }
      if (head.method == "CONNECT") {
        reject(req, 405, "Method Not Allowed", "CONNECT is not supported", true);
        return;
      }
      auto rules = proxy_.rules();
      if (!sendRequest(std::move(req), std::move(head), std::move(rules), 0)) {
        return;
      }
    }
  }

  /// The rest of a checked request: the interception rules from rule `cursor` on (a callback
  /// rule holds the request until its answer), then secrets, framing and the send. False when
  /// the request is held or was answered locally.
  bool sendRequest(PendingRequest req, http::Head head, std::shared_ptr<const HttpRules> rules,
                   size_t cursor) {
    // Interception rules first: the secret check below then sees the request as it will be
    // sent, so no rule (and no callback) can carry a placeholder past it.
    if (rules && !rules->empty()) {
      RuleStep step = rules->before(host_, &head, &cursor);
      while (step.call) {
        if (auto hook = requestHook(std::move(*step.call))) {
          req_hook_ = std::move(hook);
          held_req_ = HeldRequest{std::move(req), std::move(head), std::move(rules), cursor};
          return false;
        }
        step = rules->before(host_, &head, &cursor);  // unreachable socket: rule skipped
      }
      if (!step.blocked_by.empty()) {
        ML_LOG(proxy, info, "request {} {}{} blocked by interception rule {}", head.method, host_,
               req.path, step.blocked_by);
        reject(req, 403, "Forbidden", "request blocked by policy", true);
        return false;
      }
    }
    req.rule_view.method = head.method;
    req.rule_view.target = head.target;
    if (rules && rules->hasAfterCallbacks()) {
      req.rule_view.headers = head.headers;
    }
    // From here the head may hold secret values: wiped however this ends.
    ML_DEFER {
      wipeHead(&head);
    };
    if (auto secrets = proxy_.secrets()) {
      SubstitutionResult s = secrets->apply(&head, host_);
      if (s.blocked) {
        ML_LOG(proxy, warn,
               "blocked request to {}: placeholder of secret {} sent to an "
               "unauthorized host",
               host_, s.secret_name);
        reject(req, 403, "Forbidden", s.reason, true);
        return false;
      }
    }
    int framing_error = 0;
    http::BodyFramer framer = http::requestFraming(head, &framing_error);
    if (framing_error != 0) {
      reject(req, framing_error, reasonPhrase(framing_error), "unsupported message framing", false);
      return false;
    }
    connectUpstream();
    std::string serialized = http::serializeRequestHead(head);
    upstream_.append(serialized);
    wipe(serialized);
    pending_.push_back(std::move(req));
    req_body_ = framer;
    in_req_body_ = !framer.done();
    return true;
  }

  /// A request waiting for its callback's answer: nothing more is read from the request stream
  /// until the answer (or its deadline) decides, and then the rules go on after that rule.
  struct HeldRequest {
    PendingRequest req;
    http::Head head;
    std::shared_ptr<const HttpRules> rules;
    size_t cursor = 0;
  };

  /// A response waiting for its callback's answer: upstream is not read meanwhile.
  struct HeldResponse {
    http::Head head;
    BodyPlan plan;
    std::shared_ptr<const HttpRules> rules;
    size_t cursor = 0;
  };

  /// Starts the SDK call; a socket that cannot be reached skips the rule at once (fail-open).
  std::unique_ptr<HookClient> callHook(const HookCall& call,
                                       std::function<void(Result<std::string>)> done) {
    auto client = HookClient::start(proxy_.loop_, call.socket, call.request.dump(), call.timeout,
                                    std::move(done));
    if (!client) {
      hookFailed(call, client.error().message());
      return nullptr;
    }
    return std::move(*client);
  }

  void hookFailed(const HookCall& call, std::string_view why) const {
    ML_LOG(proxy, warn, "callback rule {} on {}: {}; the rule is skipped (fail-open)", call.rule,
           host_, why);
  }

  /// The answer's bytes parsed; an error (or an unusable answer) skips the rule.
  std::optional<HookAnswer> hookAnswer(const HookCall& call, Result<std::string> answer) const {
    if (!answer) {
      hookFailed(call, answer.error().message());
      return std::nullopt;
    }
    auto parsed = parseHookAnswer(*answer);
    if (!parsed) {
      hookFailed(call, parsed.error().message());
      return std::nullopt;
    }
    return std::move(*parsed);
  }

  /// Calls back for the request about to be held in held_req_; on the answer the request goes
  /// on after that rule (or is refused). Null when the socket cannot be reached.
  std::unique_ptr<HookClient> requestHook(HookCall call) {
    return callHook(call, [this, call](Result<std::string> answer) {
      std::unique_ptr<HookClient> finished = std::move(req_hook_);
      auto a = hookAnswer(call, std::move(answer));
      touch();
      HeldRequest held = std::move(*held_req_);
      held_req_.reset();
      if (a && applyBeforeAnswer(*a, &held.head)) {
        ML_LOG(proxy, info, "request {} {}{} blocked by callback rule {}", held.head.method, host_,
               held.req.path, call.rule);
        reject(held.req, 403, "Forbidden", "request blocked by policy", true);
      } else if (sendRequest(std::move(held.req), std::move(held.head), std::move(held.rules),
                             held.cursor)) {
        processRequests();
      }
      if (!closed_) {
        pump();
      }
    });
  }

  static std::string_view reasonPhrase(int status) {
    switch (status) {
      case 400:
        return "Bad Request";
      case 403:
        return "Forbidden";
      case 414:
        return "URI Too Long";
      case 421:
        return "Misdirected Request";
      case 431:
        return "Request Header Fields Too Large";
      case 501:
        return "Not Implemented";
      case 502:
        return "Bad Gateway";
      case 505:
        return "HTTP Version Not Supported";
      default:
        return "Error";
    }
  }

  /// Answers `req` locally with `status` once earlier responses are delivered, then closes.
  void reject(const PendingRequest& req, int status, std::string_view phrase,
              const std::string& reason, bool policy_block) {
    NetworkEvent e = baseEvent(req.method, req.path, req.url);
    e.status_code = status;
    e.blocked = true;
    auto secrets = proxy_.secrets();
    e.block_reason = secrets ? secrets->redact(reason) : reason;
    emit(e);
    if (policy_block) {
      ML_LOG(proxy, info, "blocked {} {}: {}", req.method, host_, e.block_reason);
    }
    std::string body = status == 403 ? fmt::format("Blocked by policy: {}\n", e.block_reason)
                                     : fmt::format("{}\n", e.block_reason);
    std::string response = http::simpleResponse(status, phrase, body,
                                                "X-Matchlock-Blocked: " + e.block_reason + "\r\n");
    reject_pending_ = true;
    req_buf_.clear();
    if (pending_.empty()) {
      client_.out += response;
      closing_ = true;
    } else {
      deferred_response_ = std::move(response);
    }
  }

  void respondAndClose(const PendingRequest& req, int status, std::string_view phrase,
                       const std::string& reason, bool blocked) {
    NetworkEvent e = baseEvent(req.method, req.path, req.url);
    e.status_code = status;
    e.blocked = blocked;
    e.block_reason = reason;
    e.duration_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - req.start).count();
    emit(e);
    client_.out += http::simpleResponse(status, phrase, reason + "\n",
                                        "X-Matchlock-Error: " + reason + "\r\n");
    reject_pending_ = true;
    closing_ = true;
  }

  void onClientEof() {
    if (mode_ == Mode::Raw) {
      return;
    }
    if (mode_ != Mode::Http || (pending_.empty() && !held_req_) || in_req_body_) {
      closing_ = true;
    }
  }

  // --- HTTP response side ---------------------------------------------------------------------

  void onUpstreamData(std::string_view data) {
    if (mode_ == Mode::Raw) {
      tunnel_down_bytes_ += data.size();
      client_.out.append(data);
      return;
    }
    resp_buf_.append(data);
    processResponses();
  }

  void processResponses() {
    while (!resp_buf_.empty() && !closed_ && !held_resp_) {
      if (in_resp_body_) {
        size_t n = resp_body_.consume(resp_buf_);
        if (resp_body_.failed()) {
          close("malformed chunked response body");
          return;
        }
        deliverBody(std::string_view(resp_buf_).substr(0, n));
        resp_bytes_ += n;
        resp_buf_.erase(0, n);
        if (closed_ || reject_pending_) {
          return;
        }
        if (resp_body_.done()) {
          finishResponse();
        }
        continue;
      }
      if (pending_.empty()) {
        close("unsolicited data from upstream");
        return;
      }
      http::Head head;
      http::Limits limits;
      limits.max_head_bytes = size_t{256} * 1024;
      http::ParseResult r = http::parseResponseHead(resp_buf_, &head, limits);
      if (r.state == http::ParseResult::State::Incomplete) {
        return;
      }
      if (r.state == http::ParseResult::State::Error) {
        PendingRequest req = pending_.front();
        pending_.clear();
        respondAndClose(req, 502, "Bad Gateway", "malformed response from upstream", false);
        return;
      }
      auto rules = proxy_.rules();
      if (head.status < 200 || !rules || rules->empty()) {
        client_.out.append(resp_buf_, 0, r.consumed);
      }
      resp_buf_.erase(0, r.consumed);
      if (head.status == 101) {
        resp_status_ = 101;
        finishResponse();
        // Protocol switch (e.g. WebSocket): tunnel the rest without parsing.
        mode_ = Mode::Raw;
        client_.out += resp_buf_;
        resp_buf_.clear();
        upstream_.append(req_buf_);
        req_buf_.clear();
        return;
      }
      if (head.status < 200) {
        continue;
      }
      int err = 0;
      resp_body_ = http::responseFraming(head, pending_.front().method, &err);
      if (err != 0) {
        PendingRequest req = pending_.front();
        pending_.clear();
        respondAndClose(req, 502, "Bad Gateway", "ambiguous response framing from upstream", false);
        return;
      }
      resp_status_ = head.status;
      resp_bytes_ = 0;
      in_resp_body_ = !resp_body_.done();
      if (rules && !rules->empty()) {
        if (!runResponseRules(std::move(head), BodyPlan{}, std::move(rules), 0)) {
          return;
        }
      } else if (!in_resp_body_) {
        finishResponse();
      }
    }
  }

  /// Calls back for the response about to be held in held_resp_; on the answer the after phase
  /// goes on after that rule. Null when the socket cannot be reached.
  std::unique_ptr<HookClient> responseHook(HookCall call) {
    return callHook(call, [this, call](Result<std::string> answer) {
      std::unique_ptr<HookClient> finished = std::move(resp_hook_);
      auto a = hookAnswer(call, std::move(answer));
      touch();
      HeldResponse held = std::move(*held_resp_);
      held_resp_.reset();
      if (a) {
        applyAfterAnswer(*a, &held.head, &held.plan);
      }
      if (runResponseRules(std::move(held.head), std::move(held.plan), std::move(held.rules),
                           held.cursor)) {
        processResponses();
      }
      if (eof_deferred_ && !held_resp_ && !closed_) {
        eof_deferred_ = false;
        onUpstreamEof();
      }
      if (!closed_) {
        pump();
      }
    });
  }

  /// The after-phase rules from rule `cursor` on; a callback rule holds the response (upstream
  /// is not read) until its answer. False when held or answered locally.
  bool runResponseRules(http::Head head, BodyPlan plan, std::shared_ptr<const HttpRules> rules,
                        size_t cursor) {
    if (pending_.empty()) {
      close("response without a request");
      return false;
    }
    const PendingRequest& req = pending_.front();
    RuleStep step = rules->after(host_, req.rule_view, &head, &plan, &cursor);
    while (step.call) {
      if (auto hook = responseHook(std::move(*step.call))) {
        resp_hook_ = std::move(hook);
        held_resp_ = HeldResponse{std::move(head), std::move(plan), std::move(rules), cursor};
        return false;
      }
      step = rules->after(host_, req.rule_view, &head, &plan, &cursor);  // rule skipped
    }
    if (plan.blocked) {
      ML_LOG(proxy, info, "response to {} {}{} blocked by interception rule {}", req.method, host_,
             req.path, plan.blocked_by.empty() ? "(a callback)" : plan.blocked_by);
      PendingRequest blocked = pending_.front();
      pending_.clear();
      respondAndClose(blocked, 403, "Forbidden", "response blocked by policy", true);
      return false;
    }
    const bool body_allowed = req.method != "HEAD" && resp_status_ != 204 && resp_status_ != 304;
    startRewrite(std::move(head), std::move(plan), body_allowed);
    if (!in_resp_body_) {
      finishResponse();
    }
    return !closed_;
  }

  /// The response head after the after-phase rules: sent at once, or (a body to rewrite that is
  /// not an event stream) held until the body is complete and its new length known.
  void startRewrite(http::Head head, BodyPlan plan, bool body_allowed) {
    rw_ = Rewrite{};
    if (plan.set_body && body_allowed) {
      // A callback gave the whole body: upstream's is read and dropped, this one is sent with
      // its own length once upstream's ends.
      head.remove("content-length");
      head.remove("transfer-encoding");
      head.remove("content-encoding");
      rw_.active = true;
      rw_.discard = true;
      rw_.replacements = std::move(plan.replacements);
      rw_.body = std::move(*plan.set_body);
      rw_.head = std::move(head);
      return;
    }
    std::vector<std::pair<std::string, std::string>> repl = std::move(plan.replacements);
    auto encoding = head.find("content-encoding");
    const bool encoded = encoding && toLowerAscii(*encoding) != "identity";
    if (repl.empty() || !in_resp_body_ || encoded) {
      if (!repl.empty() && encoded) {
        ML_LOG(proxy, info, "{}: body replacements skipped: the body is {}-encoded", host_,
               *encoding);
      }
      client_.out += http::serializeResponseHead(head);
      return;
    }
    rw_.active = true;
    rw_.chunked = resp_body_.mode() == http::BodyFramer::Mode::Chunked;
    auto type = head.find("content-type");
    rw_.sse = type && toLowerAscii(*type).starts_with("text/event-stream");
    head.remove("content-length");
    head.remove("transfer-encoding");
    if (rw_.sse) {
      // Streamed line by line, re-chunked so that the connection can stay open.
      rw_.sse_rw.emplace(std::move(repl));
      head.set("Transfer-Encoding", "chunked");
      client_.out += http::serializeResponseHead(head);
    } else {
      rw_.replacements = std::move(repl);
      rw_.head = std::move(head);
    }
  }

  static std::string toLowerAscii(std::string_view v) {
    std::string out(v);
    for (char& c : out) {
      c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    return out;
  }

  static void appendChunk(std::string& out, std::string_view data) {
    if (!data.empty()) {
      out += fmt::format("{:x}\r\n", data.size());
      out += data;
      out += "\r\n";
    }
  }

  void deliverBody(std::string_view raw) {
    if (!rw_.active) {
      client_.out.append(raw);
      return;
    }
    if (rw_.discard) {
      return;
    }
    std::string plain;
    if (rw_.chunked) {
      size_t used = 0;
      plain = rw_.decoder.feed(raw, &used);
      if (rw_.decoder.failed()) {
        close("malformed chunked response body");
        return;
      }
    } else {
      plain.assign(raw);
    }
    if (rw_.sse) {
      appendChunk(client_.out, rw_.sse_rw->feed(plain));
      return;
    }
    rw_.body += plain;
    if (rw_.body.size() > kMaxRewriteBody) {
      PendingRequest req = pending_.front();
      pending_.clear();
      rw_ = Rewrite{};
      respondAndClose(req, 502, "Bad Gateway", "response too large for its body replacements",
                      false);
    }
  }

  void finishRewrite() {
    if (!rw_.active) {
      return;
    }
    if (rw_.sse) {
      appendChunk(client_.out, rw_.sse_rw->finish());
      client_.out += "0\r\n\r\n";
    } else {
      std::string body = replaceAll(std::move(rw_.body), rw_.replacements);
      rw_.head.set("Content-Length", std::to_string(body.size()));
      client_.out += http::serializeResponseHead(rw_.head);
      client_.out += body;
    }
    rw_ = Rewrite{};
  }

  void finishResponse() {
    finishRewrite();
    in_resp_body_ = false;
    if (pending_.empty()) {
      return;
    }
    PendingRequest req = std::move(pending_.front());
    pending_.pop_front();
    NetworkEvent e = baseEvent(req.method, req.path, req.url);
    e.status_code = resp_status_;
    e.request_bytes = req.request_bytes;
    e.response_bytes = resp_bytes_;
    e.duration_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - req.start).count();
    emit(e);
    if (pending_.empty() && deferred_response_) {
      client_.out += *deferred_response_;
      deferred_response_.reset();
      closing_ = true;
    }
    if (pending_.empty() && client_.eof) {
      closing_ = true;
    }
  }

  void onUpstreamEof() {
    if (mode_ == Mode::Raw) {
      return;
    }
    if (held_resp_) {
      eof_deferred_ = true;  // handled once the callback has answered
      return;
    }
    if (in_resp_body_ && resp_body_.mode() == http::BodyFramer::Mode::UntilClose) {
      finishResponse();
    } else if (!pending_.empty() && !in_resp_body_ && resp_buf_.empty()) {
      PendingRequest req = pending_.front();
      pending_.clear();
      respondAndClose(req, 502, "Bad Gateway", "upstream closed the connection", false);
      return;
    }
    closing_ = true;
  }

  // --- events and teardown --------------------------------------------------------------------

  NetworkEvent baseEvent(const std::string& method, const std::string& path,
                         const std::string& url) const {
    NetworkEvent e;
    e.timestamp = unixSeconds();
    e.method = method;
    e.path = path;
    e.url = url;
    e.host = host_;
    return e;
  }

  void emit(const NetworkEvent& e) {
    if (proxy_.sink_) {
      proxy_.sink_(e);
    }
  }

  void close(std::string_view why) {
    if (closed_) {
      return;
    }
    closed_ = true;
    ML_LOG(proxy, debug, "closing connection to {} ({}): {}", host_, orig_.toString(), why);
    // Requests still in flight (client gave up, upstream died, idle timeout) get their event too.
    bool front = true;
    for (const PendingRequest& req : pending_) {
      NetworkEvent e = baseEvent(req.method, req.path, req.url);
      e.status_code = front && in_resp_body_ ? resp_status_ : 0;
      e.request_bytes = req.request_bytes;
      e.response_bytes = front && in_resp_body_ ? resp_bytes_ : 0;
      e.duration_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - req.start).count();
      e.block_reason = fmt::format("connection closed before the response completed ({})", why);
      emit(e);
      front = false;
    }
    pending_.clear();
    if (h2_) {
      // HTTP/2 is relayed without parsing: one event per connection.
      NetworkEvent e = baseEvent("", "", fmt::format("https://{}/", host_));
      e.status_code = 0;
      e.request_bytes = tunnel_up_bytes_;
      e.response_bytes = tunnel_down_bytes_;
      e.duration_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - tunnel_start_)
              .count();
      emit(e);
    }
    req_hook_.reset();
    resp_hook_.reset();
    client_.watch.reset();
    upstream_.watch.reset();
    if (client_.ssl && SSL_is_init_finished(client_.ssl.get()) == 1) {
      SSL_shutdown(client_.ssl.get());
    }
    client_.ssl.reset();
    upstream_.ssl.reset();
    client_.fd.reset();
    upstream_.fd.reset();
    proxy_.retire(this);
  }

  // Ordered by size (no padding holes).
  Proxy& proxy_;
  sys::SockAddr orig_;
  std::shared_ptr<const Policy> policy_;
  std::shared_ptr<const LeafCert> leaf_;
  Side client_;
  Side upstream_;
  std::string host_;
  std::string denied_reason_;
  std::string up_error_;
  Clock::time_point last_activity_;
  Clock::time_point sniff_deadline_;
  Clock::time_point up_deadline_;
  Clock::time_point tunnel_start_;
  uint64_t tunnel_up_bytes_ = 0;
  uint64_t tunnel_down_bytes_ = 0;
  // Requests.
  std::string req_buf_;
  http::BodyFramer req_body_;
  std::deque<PendingRequest> pending_;
  std::optional<std::string> deferred_response_;
  // Responses.
  std::string resp_buf_;
  http::BodyFramer resp_body_;
  /// A response body being rewritten by after-phase rules.
  struct Rewrite {
    bool active = false;
    bool chunked = false;  ///< upstream sent it chunked: decoded first
    bool sse = false;
    bool discard = false;  ///< a callback set the body: upstream's is dropped
    ChunkedDecoder decoder;
    std::optional<SseRewriter> sse_rw;
    std::vector<std::pair<std::string, std::string>> replacements;
    http::Head head;
    std::string body;
  };
  static constexpr size_t kMaxRewriteBody = size_t{16} << 20;
  Rewrite rw_;
  // SDK callbacks in flight (at most one per direction).
  std::optional<HeldRequest> held_req_;
  std::unique_ptr<HookClient> req_hook_;
  std::optional<HeldResponse> held_resp_;
  std::unique_ptr<HookClient> resp_hook_;
  uint64_t resp_bytes_ = 0;
  int resp_status_ = 0;
  uint32_t client_hs_want_ = 0;
  uint32_t up_hs_want_ = 0;
  Mode mode_ = Mode::Sniff;
  Up up_ = Up::None;
  bool tls_ = false;
  bool decided_ = false;
  bool in_req_body_ = false;
  bool reject_pending_ = false;
  bool in_resp_body_ = false;
  bool closing_ = false;
  bool closed_ = false;
  bool eof_deferred_ = false;
  bool progressed_ = false;
  bool repump_posted_ = false;
  bool hello_seen_ = false;
  bool alpn_probe_ = false;
  bool client_paused_ = false;
  bool upstream_h2_ = false;
  bool h2_ = false;
};

Result<std::unique_ptr<Proxy>> Proxy::create(ev::Loop& loop, ProxyOptions options,
                                             std::shared_ptr<PolicyStore> policy,
                                             std::shared_ptr<const SecretSet> secrets,
                                             std::shared_ptr<CertAuthority> ca, DnsPins* pins,
                                             EventSink sink) {
  std::unique_ptr<Proxy> p(new Proxy(loop, std::move(options)));
  p->policy_ = std::move(policy);
  p->secrets_.store(std::move(secrets));
  p->ca_ = std::move(ca);
  p->pins_ = pins;
  p->sink_ = std::move(sink);
  ML_ASSIGN_OR_RETURN(p->server_ctx_, makeServerContext());
  ML_ASSIGN_OR_RETURN(p->client_ctx_, makeClientContext(p->options_.upstream_ca_file));
  SSL_CTX_set_client_hello_cb(
      p->server_ctx_.get(),
      [](SSL* ssl, int* alert, void*) -> int {
        auto* conn = static_cast<Connection*>(SSL_get_app_data(ssl));
        int rc = conn->onClientHello(ssl);
        if (rc != SSL_CLIENT_HELLO_SUCCESS) {
          *alert = SSL_AD_INTERNAL_ERROR;
        }
        return rc;
      },
      nullptr);
  SSL_CTX_set_alpn_select_cb(
      p->server_ctx_.get(),
      [](SSL* ssl, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
         unsigned int inlen, void*) -> int {
        auto* conn = static_cast<Connection*>(SSL_get_app_data(ssl));
        return conn->selectAlpn(out, outlen, in, inlen);
      },
      nullptr);
  ML_ASSIGN_OR_RETURN(p->listener_, sys::listenTcp(p->options_.listen));
  ML_ASSIGN_OR_RETURN(p->address_, sys::localAddress(p->listener_.get()));
  Proxy* raw = p.get();
  ML_ASSIGN_OR_RETURN(p->listen_watch_, loop.watch(p->listener_.get(), ev::kRead,
                                                   [raw](uint32_t) { raw->onAccept(); }));
  ML_ASSIGN_OR_RETURN(p->sweep_timer_, loop.timer([raw] { raw->sweep(); }));
  ML_RETURN_IF_ERROR(
      p->sweep_timer_.arm(std::chrono::milliseconds(250), std::chrono::milliseconds(250)));
  ML_LOG(proxy, info, "egress proxy listening on {}", p->address_.toString());
  return p;
}

Proxy::Proxy(ev::Loop& loop, ProxyOptions options) : loop_(loop), options_(std::move(options)) {}

Proxy::~Proxy() {
  *alive_ = false;
  alive_.reset();
  listen_watch_.reset();
  connections_.clear();
  graveyard_.clear();
}

void Proxy::onAccept() {
  for (int i = 0; i < 64; ++i) {
    sys::SockAddr peer;
    auto fd = sys::acceptNonBlocking(listener_.get(), &peer);
    if (!fd) {
      ML_LOG(proxy, warn, "accept: {}", fd.error().toString());
      return;
    }
    if (!*fd) {
      return;
    }
    auto orig = sys::originalDestination(fd->get());
    if (!orig) {
      ML_LOG(proxy, debug, "connection from {} was not redirected; closing", peer.toString());
      continue;
    }
    auto local = sys::localAddress(fd->get());
    if (local && local->toString() == orig->toString()) {
      continue;  // a direct connection to the proxy itself
    }
    auto conn = std::make_unique<Connection>(*this, std::move(*fd), *orig);
    Connection* raw = conn.get();
    if (auto st = conn->start(); !st) {
      ML_LOG(proxy, warn, "connection setup: {}", st.error().toString());
      continue;
    }
    connections_.emplace(raw, std::move(conn));
  }
}

void Proxy::retire(Connection* c) {
  auto it = connections_.find(c);
  if (it == connections_.end()) {
    return;
  }
  graveyard_.push_back(std::move(it->second));
  connections_.erase(it);
  if (!cleanup_posted_) {
    cleanup_posted_ = true;
    std::weak_ptr<bool> alive = alive_;
    loop_.post([this, alive] {
      if (alive.expired()) {
        return;
      }
      cleanup_posted_ = false;
      graveyard_.clear();
    });
  }
}

void Proxy::sweep() {
  auto now = Clock::now();
  std::vector<Connection*> all;
  all.reserve(connections_.size());
  for (auto& [ptr, conn] : connections_) {
    all.push_back(ptr);
  }
  for (Connection* c : all) {
    if (connections_.count(c) != 0) {
      c->tick(now);
    }
  }
}

}  // namespace matchlock::net
