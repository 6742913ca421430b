// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <unordered_map>

#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"
#include "net/events.h"
#include "net/http.h"
#include "net/policy.h"
#include "net/secrets.h"
#include "net/tls.h"
#include "sys/socket_util.h"

namespace matchlock::net {

class DnsPins;
class HttpRules;

struct ProxyOptions {
  /// The sandbox-side address to listen on (never a wildcard address).
  sys::SockAddr listen;
  /// CA bundle for upstream verification; empty = the system trust store.
  std::string upstream_ca_file;
  http::Limits limits;
  std::chrono::milliseconds idle_timeout{120000};
  std::chrono::milliseconds connect_timeout{10000};
  /// How long to wait for the client's first bytes before treating the stream as raw TCP
  /// (server-speaks-first protocols).
  std::chrono::milliseconds sniff_timeout{3000};
};

/// The transparent egress proxy of one sandbox. nftables redirects every guest TCP connection to
/// `listen`; the original destination comes from SO_ORIGINAL_DST. The first bytes decide the
/// protocol: a TLS ClientHello is terminated with a leaf for its SNI (MITM, upstream verified), an
/// HTTP request is checked by its Host header, anything else is raw TCP and passes only to an
/// allowed IP. Every request yields a NetworkEvent. Runs on one ev::Loop thread.
class Proxy {
 public:
  /// `pins` may be null (no sandbox resolver: no pin check). `policy`, `secrets` and `ca` are
  /// shared with the supervisor; `pins` must outlive the proxy.
  static Result<std::unique_ptr<Proxy>> create(ev::Loop& loop, ProxyOptions options,
                                               std::shared_ptr<PolicyStore> policy,
                                               std::shared_ptr<const SecretSet> secrets,
                                               std::shared_ptr<CertAuthority> ca, DnsPins* pins,
                                               EventSink sink);
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;
  Proxy(Proxy&&) = delete;
  Proxy& operator=(Proxy&&) = delete;
  ~Proxy();

  sys::SockAddr address() const { return address_; }
  /// The secrets now in force; each request takes one snapshot.
  std::shared_ptr<const SecretSet> secrets() const { return secrets_.load(); }
  /// Replaces the secrets (rotated values, other hosts) from any thread, effective from the next
  /// request. Callers keep the placeholders the guest already holds.
  void setSecrets(std::shared_ptr<const SecretSet> secrets) { secrets_.store(std::move(secrets)); }
  /// The interception rules (docs/egress.md), replaced the same way; null or empty: none.
  std::shared_ptr<const HttpRules> rules() const { return rules_.load(); }
  void setRules(std::shared_ptr<const HttpRules> rules) { rules_.store(std::move(rules)); }
  size_t connectionCount() const { return connections_.size(); }

  class Connection;

 private:
  Proxy(ev::Loop& loop, ProxyOptions options);
  void onAccept();
  void retire(Connection* c);
  void sweep();

  friend class Connection;
  ev::Loop& loop_;
  ProxyOptions options_;
  std::shared_ptr<PolicyStore> policy_;
  std::atomic<std::shared_ptr<const SecretSet>> secrets_;
  std::atomic<std::shared_ptr<const HttpRules>> rules_;
  std::shared_ptr<CertAuthority> ca_;
  DnsPins* pins_ = nullptr;
  EventSink sink_;
  SslCtxPtr server_ctx_;
  SslCtxPtr client_ctx_;
  Fd listener_;
  ev::Watch listen_watch_;
  sys::SockAddr address_;
  std::unordered_map<Connection*, std::unique_ptr<Connection>> connections_;
  std::vector<std::unique_ptr<Connection>> graveyard_;
  bool cleanup_posted_ = false;
  ev::Timer sweep_timer_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace matchlock::net
