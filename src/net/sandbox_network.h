// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/event_log.h"
#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"
#include "net/intercept.h"

namespace matchlock::net {

class CertAuthority;
class DnsPins;
class DnsResolver;
class PolicyStore;
class Proxy;

/// Kernel object names of a sandbox's network, derived from its id (`vm-<8 hex>`), so that
/// whoever finds a record after a crash knows what to remove: netns `ml-<hex>`, TAP `ml<hex>`,
/// nftables table `ml_<hex>` (inside that namespace).
struct NetworkNames {
  std::string netns;
  std::string tap;
  std::string table;
};
NetworkNames networkNames(const std::string& sandbox_id);

/// A secret as the network layer needs it: its name, the hosts that may receive it, and (once
/// loaded) its value, which never leaves this process.
struct SecretBinding {
  std::string name;
  std::vector<std::string> hosts;
};

/// Everything one sandbox's network needs (written by the CLI into the supervisor's vm.json;
/// holds no secret value).
struct NetworkConfig {
  bool enabled = false;  ///< false = no_network: no NIC, no namespace, nothing below is used
  NetworkNames names;
  std::string gateway;   ///< host side of the TAP, e.g. 10.213.0.1
  std::string guest_ip;  ///< e.g. 10.213.0.2
  int prefix = 24;
  int mtu = 1500;
  std::vector<std::string> allow_hosts;  ///< empty = every public host (unless secrets)
  bool block_private_ips = true;
  std::vector<std::string> dns_servers;  ///< the sandbox resolver's upstreams
  std::string upstream_ca_file;          ///< extra CA bundle for upstream TLS ("" = system)
  std::vector<SecretBinding> secrets;
  std::vector<HttpRule> rules;  ///< interception rules (docs/egress.md)
  std::string callback_socket;  ///< where the rules' SDK callbacks go ("" = none)
  std::string events_path;      ///< network events are appended here (JSON lines)
};
nlohmann::json toJson(const NetworkConfig& config);
Result<NetworkConfig> networkConfigFromJson(const nlohmann::json& j);

/// What `up` changes in a running sandbox's network (docs/egress.md "Live changes"): the whole
/// allow-list (replacing `allow-list add/delete` edits), private-range blocking and the secrets'
/// hosts and values. The set of secret names cannot change (the guest holds their placeholders).
struct EgressUpdate {
  std::vector<std::string> allow_hosts;
  bool block_private_ips = true;
  std::vector<SecretBinding> secrets;
  std::map<std::string, std::string> values;  ///< name -> value; never logged or echoed
  std::vector<HttpRule> rules;                ///< the whole new set of interception rules
  std::string callback_socket;                ///< and the socket their callbacks go to
};

/// One sandbox's network, owned by its supervisor (docs/egress.md "Sandbox plumbing"): a named
/// network namespace holding the TAP that the VMM is handed and the nftables table that steers
/// all guest TCP to the transparent proxy and DNS to the sandbox resolver; the proxy and the
/// resolver listen inside that namespace but dial out from the supervisor's own, on a loop
/// thread of their own. There is no other path out of the namespace.
class SandboxNetwork {
 public:
  /// Creates everything, in order: namespace, TAP (+ address, MTU, up), listeners, nftables.
  /// On failure everything made so far is removed again. `secret_values` maps each secret of
  /// `config` to its value (all must be present).
  [[nodiscard]] static Result<std::unique_ptr<SandboxNetwork>> create(
      const NetworkConfig& config, const std::map<std::string, std::string>& secret_values);
  SandboxNetwork(const SandboxNetwork&) = delete;
  SandboxNetwork& operator=(const SandboxNetwork&) = delete;
  SandboxNetwork(SandboxNetwork&&) = delete;
  SandboxNetwork& operator=(SandboxNetwork&&) = delete;
  /// Stops the proxy thread and removes the namespace (with the TAP and the table in it).
  ~SandboxNetwork();

  /// The TAP queue fd, for the VMM (`-netdev tap,fd=N`).
  int tapFd() const { return tap_.get(); }
  /// The sandbox CA certificate (PEM) the guest trusts.
  std::string caPem() const;
  /// Secret name -> placeholder, for the guest's environment.
  const std::map<std::string, std::string>& placeholders() const { return placeholders_; }
  /// The environment every guest process gets: the CA bundle variables and the placeholders.
  std::map<std::string, std::string> guestEnv() const;

  /// Applies `update`, effective from the next connection (and, for secrets, the next request).
  /// All or nothing: a bad pattern or a changed set of secret names changes nothing.
  [[nodiscard]] Status update(const EgressUpdate& update);

  /// The control-socket verbs this layer serves: `{"op":"allow_list","action":"add"|"delete"|
  /// "list","hosts":[...]}` and `{"op":"network_update","allow_hosts":[...],
  /// "block_private_ips":b,"secrets":[{"name","hosts","value"}]}`. nullopt when `request` is not
  /// one of them.
  std::optional<nlohmann::json> handleControl(const nlohmann::json& request);

 private:
  explicit SandboxNetwork(NetworkConfig config);
  Status start(const std::map<std::string, std::string>& secret_values);
  void shutdown();

  NetworkConfig config_;
  bool netns_created_ = false;
  Fd tap_;
  std::shared_ptr<EventLog> events_;  ///< shared with the other layers of the sandbox
  std::unique_ptr<ev::Loop> loop_;    ///< the proxy's own loop thread
  std::thread thread_;
  std::shared_ptr<PolicyStore> policy_;
  std::shared_ptr<CertAuthority> ca_;
  std::unique_ptr<DnsPins> pins_;
  std::unique_ptr<DnsResolver> resolver_;
  std::unique_ptr<Proxy> proxy_;
  std::map<std::string, std::string> placeholders_;
};

/// Where the guest finds the sandbox CA, and what the bundle variables point at.
inline constexpr const char* kGuestCaPath = "/etc/ssl/certs/matchlock-ca.crt";
inline constexpr const char* kGuestCaBundle = "/etc/ssl/certs/ca-certificates.crt";

}  // namespace matchlock::net
