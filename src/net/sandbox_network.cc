// SPDX-License-Identifier: Apache-2.0
#include "net/sandbox_network.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "common/fault.h"
#include "common/log.h"
#include "net/dns.h"
#include "net/nft.h"
#include "net/policy.h"
#include "net/proxy.h"
#include "net/secrets.h"
#include "net/tls.h"
#include "sys/netns.h"
#include "sys/socket_util.h"

namespace matchlock::net {
namespace {

std::string idHex(const std::string& sandbox_id) {
  return sandbox_id.starts_with("vm-") ? sandbox_id.substr(3) : sandbox_id;
}

/// The policy and the secrets of a sandbox: the allow-list, widened by the secrets' hosts
/// (secrets seal the sandbox, upstream's rule). A secret keeps the placeholder it has in
/// `placeholders` (the guest holds it); one without gets a fresh one, added there.
struct Egress {
  Policy policy;
  std::vector<Secret> secrets;
};
Result<Egress> compileEgress(const NetworkConfig& config,
                             const std::map<std::string, std::string>& secret_values,
                             std::map<std::string, std::string>& placeholders) {
  PolicyConfig pc;
  pc.allow_hosts = config.allow_hosts;
  pc.block_private_ips = config.block_private_ips;
  std::vector<Secret> secrets;
  for (const SecretBinding& b : config.secrets) {
    auto it = secret_values.find(b.name);
    if (it == secret_values.end()) {
      return makeError(Errc::Internal, fmt::format("secret {}: no value was handed over", b.name));
    }
    Secret s;
    s.name = b.name;
    s.value = it->second;
    s.hosts = b.hosts;
    auto& placeholder = placeholders[s.name];
    if (placeholder.empty()) {
      placeholder = generatePlaceholder();
    }
    s.placeholder = placeholder;
    for (const std::string& h : b.hosts) {
      if (std::find(pc.allow_hosts.begin(), pc.allow_hosts.end(), h) == pc.allow_hosts.end()) {
        pc.allow_hosts.push_back(h);
      }
    }
    secrets.push_back(std::move(s));
  }
  ML_ASSIGN_OR_RETURN(Policy policy, Policy::compile(pc));
  return Egress{std::move(policy), std::move(secrets)};
}

}  // namespace

NetworkNames networkNames(const std::string& sandbox_id) {
  const std::string hex = idHex(sandbox_id).substr(0, 8);
  return NetworkNames{"ml-" + hex, "ml" + hex, "ml_" + hex};
}

nlohmann::json toJson(const NetworkConfig& c) {
  nlohmann::json secrets = nlohmann::json::array();
  for (const auto& s : c.secrets) {
    secrets.push_back({{"name", s.name}, {"hosts", s.hosts}});
  }
  return {{"enabled", c.enabled},         {"netns", c.names.netns},
          {"tap", c.names.tap},           {"table", c.names.table},
          {"gateway", c.gateway},         {"guest_ip", c.guest_ip},
          {"prefix", c.prefix},           {"mtu", c.mtu},
          {"allow_hosts", c.allow_hosts}, {"block_private_ips", c.block_private_ips},
          {"dns_servers", c.dns_servers}, {"upstream_ca_file", c.upstream_ca_file},
          {"secrets", secrets},           {"events_path", c.events_path},
          {"rules", toJson(c.rules)},     {"callback_socket", c.callback_socket}};
}

Result<NetworkConfig> networkConfigFromJson(const nlohmann::json& j) {
  try {
    NetworkConfig c;
    c.enabled = j.value("enabled", false);
    c.names.netns = j.value("netns", "");
    c.names.tap = j.value("tap", "");
    c.names.table = j.value("table", "");
    c.gateway = j.value("gateway", "");
    c.guest_ip = j.value("guest_ip", "");
    c.prefix = j.value("prefix", 24);
    c.mtu = j.value("mtu", 1500);
    c.allow_hosts = j.value("allow_hosts", std::vector<std::string>{});
    c.block_private_ips = j.value("block_private_ips", true);
    c.dns_servers = j.value("dns_servers", std::vector<std::string>{});
    c.upstream_ca_file = j.value("upstream_ca_file", "");
    for (const auto& s : j.value("secrets", nlohmann::json::array())) {
      c.secrets.push_back(SecretBinding{s.at("name").get<std::string>(),
                                        s.value("hosts", std::vector<std::string>{})});
    }
    c.events_path = j.value("events_path", "");
    if (auto r = j.find("rules"); r != j.end()) {
      ML_ASSIGN_OR_RETURN(c.rules, httpRulesFromJson(*r));
    }
    c.callback_socket = j.value("callback_socket", "");
    return c;
  } catch (const nlohmann::json::exception& e) {
    return makeError(Errc::InvalidSpec, fmt::format("network config: {}", e.what()));
  }
}

Result<std::unique_ptr<SandboxNetwork>> SandboxNetwork::create(
    const NetworkConfig& config, const std::map<std::string, std::string>& secret_values) {
  std::unique_ptr<SandboxNetwork> n(new SandboxNetwork(config));
  if (Status st = n->start(secret_values); !st) {
    n->shutdown();
    return makeError(st.error().withContext(
        fmt::format("setting up the network of the sandbox (namespace {})", config.names.netns)));
  }
  return n;
}

Status SandboxNetwork::start(const std::map<std::string, std::string>& secret_values) {
  const auto t0 = std::chrono::steady_clock::now();
  auto last = t0;
  std::string laps;
  auto lap = [&](const char* what) {
    auto now = std::chrono::steady_clock::now();
    laps += fmt::format(" {}={}", what,
                        std::chrono::duration_cast<std::chrono::microseconds>(now - last).count());
    last = now;
  };
  // Policy and secrets, compiled before anything exists so that a bad pattern creates nothing.
  ML_ASSIGN_OR_RETURN(Egress egress, compileEgress(config_, secret_values, placeholders_));
  policy_ = std::make_shared<PolicyStore>(std::move(egress.policy));
  auto secret_set = std::make_shared<const SecretSet>(std::move(egress.secrets));
  ML_ASSIGN_OR_RETURN(ca_, CertAuthority::generate());
  std::vector<sys::SockAddr> upstreams;
  for (const std::string& server : config_.dns_servers) {
    ML_ASSIGN_OR_RETURN(sys::SockAddr a, sys::SockAddr::parse(server));
    if (a.port() == 0) {
      a.setPort(53);
    }
    upstreams.push_back(a);
  }
  if (!config_.events_path.empty()) {
    ML_ASSIGN_OR_RETURN(events_, EventLog::shared(config_.events_path));
  }
  ML_ASSIGN_OR_RETURN(loop_, ev::Loop::create());
  lap("prep");

  // The namespace and everything inside it. Its name was recorded as an owned resource (with the
  // TAP and the table) by whoever launched us, so a crash from here on is cleaned up by name.
  ML_RETURN_IF_ERROR(sys::createNetns(config_.names.netns));
  netns_created_ = true;
  faultPoint("network:netns");
  lap("netns");
  ML_ASSIGN_OR_RETURN(Fd ns, sys::openNetns(config_.names.netns));
  EventLog* events = events_.get();
  EventSink sink = [events](const NetworkEvent& e) {
    if (events != nullptr) {
      events->append(toJsonLine(e));
    }
  };
  pins_ = std::make_unique<DnsPins>();
  auto inside = [&]() -> Status {
    lap("setns");
    ML_RETURN_IF_ERROR(sys::loopbackUp());
    ML_ASSIGN_OR_RETURN(tap_, sys::createTap(config_.names.tap, sys::TapLifetime::WithNamespace));
    ML_RETURN_IF_ERROR(
        sys::configureLink(config_.names.tap, config_.gateway, config_.prefix, config_.mtu));
    faultPoint("network:tap");
    lap("tap");
    // Sockets keep the namespace they are created in: these listen on the sandbox side, while
    // every upstream socket the proxy and the resolver open later (on their loop thread, which
    // never joins the namespace) dials out from the supervisor's own.
    ML_ASSIGN_OR_RETURN(
        resolver_, DnsResolver::create(*loop_, sys::SockAddr::fromIp(config_.gateway, 0), upstreams,
                                       policy_, pins_.get()));
    ProxyOptions po;
    po.listen = sys::SockAddr::fromIp(config_.gateway, 0);
    po.upstream_ca_file = config_.upstream_ca_file;
    ML_ASSIGN_OR_RETURN(
        proxy_, Proxy::create(*loop_, po, policy_, secret_set, ca_, pins_.get(), std::move(sink)));
    proxy_->setRules(HttpRules::compile(config_.rules, config_.callback_socket));
    SandboxRules rules;
    rules.table = config_.names.table;
    rules.tap = config_.names.tap;
    rules.proxy_port = proxy_->address().port();
    rules.dns_port = resolver_->address().port();
    lap("listeners");
    Status st = installRules(rules);
    faultPoint("network:nft");
    lap("nft");
    return st;
  };
  ML_RETURN_IF_ERROR(sys::runInNetns(ns, inside));
  thread_ = std::thread([this] {
    if (Status st = loop_->run(); !st) {
      ML_LOG(net, err, "proxy loop: {}", st.error().toString());
    }
  });
  ML_LOG(
      net, info, "network {}: {} via {} (proxy {}, resolver {}) ready in {} us ({} us)",
      config_.names.netns, config_.guest_ip, config_.gateway, proxy_->address().toString(),
      resolver_->address().toString(),
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
          .count(),
      laps);
  return ok();
}

void SandboxNetwork::shutdown() {
  const auto t0 = std::chrono::steady_clock::now();
  if (thread_.joinable()) {
    loop_->stop();
    thread_.join();
  }
  proxy_.reset();
  resolver_.reset();
  const auto t1 = std::chrono::steady_clock::now();
  if (netns_created_) {
    // The TAP is persistent, so neither our fd nor the VMM's removes it (closing the last fd of
    // a non-persistent TAP unregisters it synchronously: an RCU grace period, 10-20 ms on our
    // clock). It goes with the namespace, which the kernel dismantles on its own workqueue once
    // the bind mount and the listeners are gone.
    if (Status st = sys::deleteNetns(config_.names.netns); !st) {
      ML_LOG(net, warn, "removing namespace {}: {}", config_.names.netns, st.error().toString());
    }
    netns_created_ = false;
  }
  const auto t2 = std::chrono::steady_clock::now();
  const bool had_tap = static_cast<bool>(tap_);
  tap_.reset();
  if (had_tap) {
    auto us = [](auto d) {
      return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
    };
    const auto t3 = std::chrono::steady_clock::now();
    ML_LOG(net, info, "network {}: removed in {} us (proxy={} netns={} tap={} us)",
           config_.names.netns, us(t3 - t0), us(t1 - t0), us(t2 - t1), us(t3 - t2));
  }
}

SandboxNetwork::SandboxNetwork(NetworkConfig config) : config_(std::move(config)) {}

SandboxNetwork::~SandboxNetwork() {
  shutdown();
}

std::string SandboxNetwork::caPem() const {
  return ca_ ? ca_->certPem() : std::string();
}

std::map<std::string, std::string> SandboxNetwork::guestEnv() const {
  // The system bundle (with our CA appended by the guest) rather than our CA alone: TLS that is
  // not intercepted (raw TCP to an allowed host) must still verify against the public roots.
  std::map<std::string, std::string> env = {{"SSL_CERT_FILE", kGuestCaBundle},
                                            {"REQUESTS_CA_BUNDLE", kGuestCaBundle},
                                            {"CURL_CA_BUNDLE", kGuestCaBundle},
                                            {"NODE_EXTRA_CA_CERTS", kGuestCaPath}};
  for (const auto& [name, placeholder] : placeholders_) {
    env[name] = placeholder;
  }
  return env;
}

Status SandboxNetwork::update(const EgressUpdate& update) {
  std::vector<std::string> added;
  std::vector<std::string> removed;
  for (const SecretBinding& b : update.secrets) {
    if (!placeholders_.contains(b.name)) {
      added.push_back(b.name);
    }
  }
  for (const auto& entry : placeholders_) {
    const std::string& name = entry.first;  // (clang 14 cannot capture structured bindings)
    if (std::none_of(update.secrets.begin(), update.secrets.end(),
                     [&](const SecretBinding& b) { return b.name == name; })) {
      removed.push_back(name);
    }
  }
  if (!added.empty() || !removed.empty()) {
    return makeError(
        Errc::Conflict,
        fmt::format("the set of secrets changed (added: {}; removed: {}): the guest holds "
                    "placeholders only for the secrets it booted with, so this needs a recreate",
                    added.empty() ? "-" : fmt::format("{}", fmt::join(added, ", ")),
                    removed.empty() ? "-" : fmt::format("{}", fmt::join(removed, ", "))));
  }
  NetworkConfig next = config_;
  next.allow_hosts = update.allow_hosts;
  next.block_private_ips = update.block_private_ips;
  next.rules = update.rules;
  next.callback_socket = update.callback_socket;
  next.secrets = update.secrets;
  std::map<std::string, std::string> placeholders = placeholders_;
  ML_ASSIGN_OR_RETURN(Egress egress, compileEgress(next, update.values, placeholders));
  // Secrets first: a request between the two stores sees the new values under the old policy,
  // never an old value sent to a host the new policy no longer allows for it (the secret set
  // carries its own hosts).
  proxy_->setSecrets(std::make_shared<const SecretSet>(std::move(egress.secrets)));
  policy_->replace(std::move(egress.policy));
  proxy_->setRules(HttpRules::compile(next.rules, next.callback_socket));
  config_ = std::move(next);
  ML_LOG(net, info,
         "network {}: egress updated ({} allow-list entries, private ranges {}, {} "
         "secrets)",
         config_.names.netns, config_.allow_hosts.size(),
         config_.block_private_ips ? "blocked" : "allowed", config_.secrets.size());
  return ok();
}

namespace {

std::vector<std::string> stringList(const nlohmann::json& request, const char* key) {
  std::vector<std::string> out;
  if (auto h = request.find(key); h != request.end() && h->is_array()) {
    for (const auto& v : *h) {
      if (v.is_string()) {
        out.push_back(v.get<std::string>());
      }
    }
  }
  return out;
}

nlohmann::json failure(const std::string& message) {
  return nlohmann::json{{"ok", false}, {"error", message}};
}

}  // namespace

std::optional<nlohmann::json> SandboxNetwork::handleControl(const nlohmann::json& request) {
  const std::string op = request.value("op", "");
  if (op == "network_update") {
    EgressUpdate u;
    u.allow_hosts = stringList(request, "allow_hosts");
    auto bp = request.find("block_private_ips");
    u.block_private_ips = bp == request.end() || !bp->is_boolean() || bp->get<bool>();
    if (auto list = request.find("secrets"); list != request.end() && list->is_array()) {
      for (const auto& s : *list) {
        auto name = s.find("name");
        auto value = s.find("value");
        if (!s.is_object() || name == s.end() || !name->is_string() || value == s.end() ||
            !value->is_string()) {
          return failure("network_update: each secret needs a string name and value");
        }
        u.secrets.push_back(SecretBinding{name->get<std::string>(), stringList(s, "hosts")});
        u.values[name->get<std::string>()] = value->get<std::string>();
      }
    }
    if (auto r = request.find("rules"); r != request.end()) {
      auto rules = httpRulesFromJson(*r);
      if (!rules) {
        return failure(rules.error().message());
      }
      u.rules = std::move(*rules);
    }
    u.callback_socket = request.value("callback_socket", "");
    if (Status st = update(u); !st) {
      return failure(st.error().message());
    }
    return nlohmann::json{{"ok", true}, {"allow_hosts", policy_->snapshot()->config().allow_hosts}};
  }
  if (op != "allow_list") {
    return std::nullopt;
  }
  const std::string action = request.value("action", "list");
  std::vector<std::string> hosts = stringList(request, "hosts");
  nlohmann::json reply = {{"ok", true}};
  if (action == "add" || action == "delete") {
    auto changed = action == "add" ? policy_->addHosts(hosts) : policy_->deleteHosts(hosts);
    if (!changed) {
      return failure(changed.error().message());
    }
    reply[action == "add" ? "added" : "removed"] = *changed;
  } else if (action != "list") {
    return failure(fmt::format("unknown action '{}'", action));
  }
  reply["allow_hosts"] = policy_->snapshot()->config().allow_hosts;
  return reply;
}

}  // namespace matchlock::net
