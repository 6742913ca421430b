// SPDX-License-Identifier: Apache-2.0
#include "spec/normalize.h"

#include <cmath>
#include <regex>
#include <set>

#include <yaml-cpp/yaml.h>

#include "common/sha256.h"
#include "spec/decode.h"

namespace matchlock::spec {
namespace {

using OJson = nlohmann::ordered_json;

OJson stringMap(const std::map<std::string, std::string>& m) {
  OJson out = OJson::object();
  for (const auto& [k, v] : m) {
    out[k] = v;
  }
  return out;
}

OJson cpusJson(double cpus) {
  if (std::floor(cpus) == cpus) {
    return static_cast<int64_t>(cpus);
  }
  return cpus;
}

OJson imageGroup(const SandboxSpec& s) {
  return OJson{{"image", s.image}};
}

OJson resourcesGroup(const SandboxSpec& s) {
  return OJson{{"cpus", cpusJson(s.cpus)}, {"memory", s.memory_mib}, {"disk", s.disk_mib}};
}

OJson processGroup(const SandboxSpec& s) {
  OJson out = OJson::object();
  if (s.workdir) {
    out["workdir"] = *s.workdir;
  }
  if (s.user) {
    out["user"] = *s.user;
  }
  if (s.command) {
    out["command"] = *s.command;
  }
  if (s.entrypoint) {
    out["entrypoint"] = *s.entrypoint;
  }
  out["hostname"] = s.hostname;
  out["privileged"] = s.privileged;
  return out;
}

/// A rule in the spec's own keys, only the fields it sets (so that it decodes back as it was).
OJson httpRuleJson(const HttpRule& r) {
  OJson out = OJson::object();
  auto map = [](const std::vector<std::pair<std::string, std::string>>& pairs) {
    OJson m = OJson::object();
    for (const auto& [k, v] : pairs) {
      m[k] = v;
    }
    return m;
  };
  if (!r.name.empty()) {
    out["name"] = r.name;
  }
  out["phase"] = r.phase == HttpRule::Phase::After ? "after" : "before";
  out["action"] = r.action == HttpRule::Action::Block    ? "block"
                  : r.action == HttpRule::Action::Mutate ? "mutate"
                                                         : "allow";
  if (!r.hosts.empty()) {
    out["hosts"] = r.hosts;
  }
  if (!r.methods.empty()) {
    out["methods"] = r.methods;
  }
  if (!r.path.empty()) {
    out["path"] = r.path;
  }
  if (!r.set_headers.empty()) {
    out["set_headers"] = map(r.set_headers);
  }
  if (!r.delete_headers.empty()) {
    out["delete_headers"] = r.delete_headers;
  }
  if (!r.set_query.empty()) {
    out["set_query"] = map(r.set_query);
  }
  if (!r.delete_query.empty()) {
    out["delete_query"] = r.delete_query;
  }
  if (!r.rewrite_path.empty()) {
    out["rewrite_path"] = r.rewrite_path;
  }
  if (!r.set_response_headers.empty()) {
    out["set_response_headers"] = map(r.set_response_headers);
  }
  if (!r.delete_response_headers.empty()) {
    out["delete_response_headers"] = r.delete_response_headers;
  }
  if (!r.body_replacements.empty()) {
    OJson list = OJson::array();
    for (const auto& [f, rep] : r.body_replacements) {
      list.push_back(OJson{{"find", f}, {"replace", rep}});
    }
    out["body_replacements"] = list;
  }
  if (!r.callback_id.empty()) {
    out["callback_id"] = r.callback_id;
  }
  if (r.timeout_ms != 0) {
    out["timeout_ms"] = r.timeout_ms;
  }
  return out;
}

OJson networkJson(const NetworkSpec& n) {
  OJson out = OJson::object();
  out["no_network"] = n.no_network;
  out["allow_hosts"] = n.allow_hosts;
  out["block_private_ips"] = n.block_private_ips;
  out["dns_servers"] = n.dns_servers;
  out["add_hosts"] = stringMap(n.add_hosts);
  out["mtu"] = n.mtu;
  out["intercept"] = n.intercept;
  if (!n.upstream_ca.empty()) {
    out["upstream_ca"] = n.upstream_ca;
  }
  if (!n.rules.empty() || !n.callback_socket.empty()) {  // only when set: hashes stay stable
    OJson rules = OJson::array();
    for (const auto& r : n.rules) {
      rules.push_back(httpRuleJson(r));
    }
    OJson interception = OJson{{"rules", std::move(rules)}};
    if (!n.callback_socket.empty()) {
      interception["callback_socket"] = n.callback_socket;
    }
    out["interception"] = std::move(interception);
  }
  return out;
}

OJson secretJson(const SecretRef& r) {
  OJson out = OJson::object();
  out["name"] = r.name;
  switch (r.kind) {
    case SecretRef::Kind::Env:
      out["from_env"] = r.env_var;
      break;
    case SecretRef::Kind::File:
      out["from_file"] = r.file;
      break;
    case SecretRef::Kind::Command:
      out["from_command"] = r.command;
      break;
    case SecretRef::Kind::Inline:
      out["inline"] = true;  // the value itself is never serialized
      break;
  }
  out["hosts"] = r.hosts;
  return out;
}

OJson mountJson(const Mount& m) {
  OJson out = OJson::object();
  if (m.mode != MountMode::Memory) {
    out["source"] = m.source;
  }
  out["target"] = m.target;
  out["mode"] = toString(m.mode);
  if (isBlockMount(m.mode)) {
    out["readonly"] = m.readonly;
  }
  // Only when set, so that the hashes of specs without interception stay what they were.
  if (!m.rules.empty() || m.emit_events) {
    OJson rules = OJson::array();
    for (const MountRule& r : m.rules) {
      OJson rule = OJson::object();
      rule["name"] = r.name;
      rule["ops"] = r.ops;
      rule["path"] = r.path;
      rule["action"] = r.block ? "block" : "allow";
      rule["errno"] = r.error;
      rules.push_back(std::move(rule));
    }
    OJson interception = OJson::object();
    interception["emit_events"] = m.emit_events;
    interception["rules"] = std::move(rules);
    out["interception"] = std::move(interception);
  }
  return out;
}

OJson portJson(const PortForward& p) {
  return OJson{
      {"host", p.host}, {"guest", p.guest}, {"address", p.address}, {"protocol", p.protocol}};
}

OJson healthJson(const Healthcheck& h) {
  return OJson{{"test", h.test},
               {"interval", formatDurationMs(h.interval_ms)},
               {"timeout", formatDurationMs(h.timeout_ms)},
               {"retries", h.retries},
               {"start_period", formatDurationMs(h.start_period_ms)}};
}

OJson listJson(const auto& items, const auto& fn) {
  OJson out = OJson::array();
  for (const auto& item : items) {
    out.push_back(fn(item));
  }
  return out;
}

// --- YAML rendering ---------------------------------------------------------------------------

bool needsQuotes(const std::string& s) {
  // Strings that a YAML 1.1 or 1.2 reader would take for a number, bool, null or sexagesimal
  // value. yaml-cpp quotes syntactically special strings by itself, but not these.
  static const std::regex numberish(R"(^[-+]?\.?[0-9].*$|^[-+]?\.(inf|Inf|INF|nan|NaN|NAN)$)");
  static const std::regex special(
      R"(^(true|false|yes|no|on|off|null|y|n|True|False|Yes|No|On|Off|Null|TRUE|FALSE|YES|NO|ON|OFF|NULL|Y|N|~)$)");
  return s.empty() || std::regex_match(s, numberish) || std::regex_match(s, special) ||
         s.find(':') != std::string::npos;
}

void emit(YAML::Emitter& out, const OJson& v) {
  switch (v.type()) {
    case OJson::value_t::object:
      if (v.empty()) {
        out << YAML::Flow << YAML::BeginMap << YAML::EndMap;
        break;
      }
      out << YAML::BeginMap;
      for (auto it = v.begin(); it != v.end(); ++it) {
        out << YAML::Key;
        if (needsQuotes(it.key())) {
          out << YAML::DoubleQuoted;
        }
        out << it.key() << YAML::Value;
        emit(out, it.value());
      }
      out << YAML::EndMap;
      break;
    case OJson::value_t::array:
      if (v.empty()) {
        out << YAML::Flow << YAML::BeginSeq << YAML::EndSeq;
        break;
      }
      out << YAML::BeginSeq;
      for (const auto& item : v) {
        emit(out, item);
      }
      out << YAML::EndSeq;
      break;
    case OJson::value_t::string: {
      const auto& s = v.get_ref<const std::string&>();
      if (needsQuotes(s)) {
        out << YAML::DoubleQuoted;
      }
      out << s;
      break;
    }
    case OJson::value_t::boolean:
      out << (v.get<bool>() ? "true" : "false");
      break;
    case OJson::value_t::null:
      out << YAML::Null;
      break;
    default:
      out << v.dump();  // numbers: JSON's spelling is valid YAML
      break;
  }
}

}  // namespace

OJson toJson(const SandboxSpec& s) {
  OJson out = OJson::object();
  out["image"] = s.image;
  out["cpus"] = cpusJson(s.cpus);
  out["memory"] = s.memory_mib;
  out["disk"] = s.disk_mib;
  out["env"] = stringMap(s.env);
  OJson process = processGroup(s);
  for (auto it = process.begin(); it != process.end(); ++it) {
    out[it.key()] = it.value();
  }
  out["labels"] = stringMap(s.labels);
  out["depends_on"] = s.depends_on;
  out["restart"] = toString(s.restart);
  if (s.healthcheck) {
    out["healthcheck"] = healthJson(*s.healthcheck);
  }
  out["network"] = networkJson(s.network);
  out["secrets"] = listJson(s.secrets, secretJson);
  out["mounts"] = listJson(s.mounts, mountJson);
  out["ports"] = listJson(s.ports, portJson);
  return out;
}

OJson toJson(const Project& p) {
  OJson out = OJson::object();
  out["version"] = 1;
  out["name"] = p.name;
  OJson sandboxes = OJson::object();
  for (const auto& [name, s] : p.sandboxes) {
    sandboxes[name] = toJson(s);
  }
  out["sandboxes"] = std::move(sandboxes);
  return out;
}

std::string toYaml(const OJson& v) {
  YAML::Emitter out;
  out.SetIndent(2);
  emit(out, v);
  std::string text = out.c_str();
  text.push_back('\n');
  return text;
}

namespace {

/// The guest holds a placeholder per secret name, so adding or removing one recreates, while new
/// hosts or values of the same secrets apply live.
OJson secretNames(const SandboxSpec& s) {
  std::set<std::string> names;
  for (const auto& sec : s.secrets) {
    names.insert(sec.name);
  }
  return OJson(names);
}

}  // namespace

const std::vector<FieldGroup>& fieldGroups() {
  static const std::vector<FieldGroup> kGroups = {
      {"image", ChangeClass::Recreate},        {"resources", ChangeClass::Recreate},
      {"env", ChangeClass::Recreate},          {"process", ChangeClass::Recreate},
      {"mounts", ChangeClass::Recreate},       {"network_config", ChangeClass::Recreate},
      {"egress", ChangeClass::Live},           {"secrets", ChangeClass::Live},
      {"secret_names", ChangeClass::Recreate}, {"ports", ChangeClass::Live},
      {"healthcheck", ChangeClass::Live},      {"meta", ChangeClass::Ignored},
  };
  return kGroups;
}

std::map<std::string, std::string> groupHashes(const SandboxSpec& s) {
  OJson net = networkJson(s.network);
  // intercept is live because it changes nothing: every sandbox network goes through the proxy.
  OJson egress{{"allow_hosts", net["allow_hosts"]},
               {"block_private_ips", net["block_private_ips"]},
               {"intercept", net["intercept"]}};
  if (net.contains("interception")) {
    egress["interception"] = net["interception"];
  }
  OJson net_config{{"no_network", net["no_network"]},
                   {"dns_servers", net["dns_servers"]},
                   {"add_hosts", net["add_hosts"]},
                   {"mtu", net["mtu"]}};
  if (!s.network.upstream_ca.empty()) {
    net_config["upstream_ca"] = s.network.upstream_ca;
  }
  OJson meta{{"labels", stringMap(s.labels)},
             {"depends_on", s.depends_on},
             {"restart", toString(s.restart)}};
  std::map<std::string, OJson> groups = {
      {"image", imageGroup(s)},
      {"resources", resourcesGroup(s)},
      {"env", stringMap(s.env)},
      {"process", processGroup(s)},
      {"mounts", listJson(s.mounts, mountJson)},
      {"network_config", net_config},
      {"egress", egress},
      {"secrets", listJson(s.secrets, secretJson)},
      {"secret_names", secretNames(s)},
      {"ports", listJson(s.ports, portJson)},
      {"healthcheck", s.healthcheck ? healthJson(*s.healthcheck) : OJson()},
      {"meta", meta},
  };
  std::map<std::string, std::string> out;
  for (const auto& [name, json] : groups) {
    out[name] = sha256Hex(json.dump());
  }
  return out;
}

std::string specHash(const SandboxSpec& s) {
  return sha256Hex(toJson(s).dump());
}

}  // namespace matchlock::spec
