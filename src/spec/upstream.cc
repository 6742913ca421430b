// SPDX-License-Identifier: Apache-2.0
// Upstream matchlock's JSON-RPC `create` params (its Go `Config`) mapped onto our spec tree, so
// that both go through one decoder. Field meanings follow upstream; see docs/spec.md.
#include <fmt/format.h>

#include <filesystem>

#include "spec/decode.h"

namespace matchlock::spec {
namespace {

using Json = nlohmann::json;

Error unsupported(std::string_view field) {
  return Error(Errc::InvalidSpec, fmt::format("create: {} is not supported yet", field));
}

void copyIf(const Json& from, std::string_view from_key, Json& to, std::string_view to_key) {
  if (auto it = from.find(from_key); it != from.end() && !it->is_null()) {
    to[std::string(to_key)] = *it;
  }
}

Result<Json> toSpecTree(const Json& c) {
  if (!c.is_object()) {
    return makeError(Errc::InvalidSpec, "create: params must be an object");
  }
  if (c.contains("id")) {
    return makeError(Errc::InvalidSpec, "create: id is assigned by matchlock and cannot be set");
  }
  Json s = Json::object();
  copyIf(c, "image", s, "image");
  copyIf(c, "privileged", s, "privileged");
  Json env = Json::object();
  if (auto ic = c.find("image_config"); ic != c.end() && ic->is_object()) {
    copyIf(*ic, "user", s, "user");
    copyIf(*ic, "working_dir", s, "workdir");
    copyIf(*ic, "entrypoint", s, "entrypoint");
    copyIf(*ic, "cmd", s, "command");
    if (auto e = ic->find("env"); e != ic->end() && e->is_object()) {
      env.update(*e);
    }
  }
  if (auto e = c.find("env"); e != c.end() && e->is_object()) {
    env.update(*e);  // config env wins over image env
  }
  if (!env.empty()) {
    s["env"] = env;
  }
  if (auto r = c.find("resources"); r != c.end() && r->is_object()) {
    copyIf(*r, "cpus", s, "cpus");
    copyIf(*r, "memory_mb", s, "memory");
    copyIf(*r, "disk_size_mb", s, "disk");
  }
  if (auto n = c.find("network"); n != c.end() && n->is_object()) {
    Json net = Json::object();
    // Same keys as the spec's (reference §4.7, §4.8), callbacks and their socket included.
    copyIf(*n, "interception", net, "interception");
    copyIf(*n, "allowed_hosts", net, "allow_hosts");
    copyIf(*n, "block_private_ips", net, "block_private_ips");
    copyIf(*n, "no_network", net, "no_network");
    copyIf(*n, "intercept", net, "intercept");
    copyIf(*n, "dns_servers", net, "dns_servers");
    copyIf(*n, "mtu", net, "mtu");
    copyIf(*n, "hostname", s, "hostname");
    if (auto ah = n->find("add_hosts"); ah != n->end() && ah->is_array()) {
      Json hosts = Json::object();
      for (const Json& h : *ah) {
        if (!h.is_object() || !h.contains("host") || !h.contains("ip") || !h["host"].is_string()) {
          return makeError(Errc::InvalidSpec,
                           "create: network.add_hosts entries need string 'host' and 'ip'");
        }
        hosts[h["host"].get<std::string>()] = h["ip"];
      }
      net["add_hosts"] = hosts;
    }
    if (auto sec = n->find("secrets"); sec != n->end() && sec->is_object()) {
      Json list = Json::array();
      for (auto it = sec->begin(); it != sec->end(); ++it) {
        Json item = Json::object();
        item["name"] = it.key();
        if (it->is_object()) {
          copyIf(*it, "value", item, "value");
          copyIf(*it, "placeholder", item, "placeholder");
          copyIf(*it, "hosts", item, "hosts");
        }
        list.push_back(item);
      }
      s["secrets"] = list;
    }
    if (!net.empty()) {
      s["network"] = net;
    }
  }
  if (auto v = c.find("vfs"); v != c.end() && v->is_object()) {
    if (v->contains("interception") && !(*v)["interception"].is_null()) {
      return makeError(unsupported("vfs.interception"));
    }
    Json mounts = Json::array();
    if (auto m = v->find("mounts"); m != v->end() && m->is_object()) {
      for (auto it = m->begin(); it != m->end(); ++it) {
        const Json& mc = *it;
        Json item = Json::object();
        item["target"] = it.key();
        std::string type = mc.value("type", "memory");
        bool readonly = mc.value("readonly", false);
        if (type == "memory") {
          item["mode"] = "memory";
        } else if (type == "host_fs") {
          item["mode"] = readonly ? "ro" : "rw";
        } else if (type == "overlay") {
          if (mc.contains("upper") || mc.contains("lower")) {
            return makeError(Errc::InvalidSpec,
                             "create: upper/lower overlay config is not supported; use host_path");
          }
          item["mode"] = "overlay";
        } else {
          return makeError(Errc::InvalidSpec,
                           fmt::format("create: vfs.mounts[{}].type '{}' is not one of memory, "
                                       "host_fs, overlay",
                                       it.key(), type));
        }
        copyIf(mc, "host_path", item, "source");
        mounts.push_back(item);
      }
    }
    if (!mounts.empty()) {
      s["mounts"] = mounts;
    }
  }
  // Raw ext4 disks: `[{"host_path", "guest_mount", "readonly"?}]` become `mode = "disk"` mounts.
  if (auto d = c.find("extra_disks"); d != c.end() && !d->is_null()) {
    if (!d->is_array()) {
      return makeError(Errc::InvalidSpec, "create: extra_disks must be an array");
    }
    for (const Json& disk : *d) {
      if (!disk.is_object()) {
        return makeError(Errc::InvalidSpec, "create: extra_disks entries must be objects");
      }
      Json item = Json::object();
      copyIf(disk, "host_path", item, "source");
      copyIf(disk, "guest_mount", item, "target");
      copyIf(disk, "readonly", item, "readonly");
      item["mode"] = "disk";
      s["mounts"].push_back(item);
    }
  }
  return s;
}

}  // namespace

namespace {

/// Decodes one sandbox tree that has no source text (RPC params, stored specs).
Result<SandboxSpec> decodeTree(Json sandbox, const std::string& name, const char* what,
                               Origin origin) {
  Document doc;
  doc.file = what;
  std::error_code ec;
  doc.dir = std::filesystem::current_path(ec).string();
  doc.tree = Json{{"sandboxes", Json{{name, std::move(sandbox)}}}};
  std::vector<Diagnostic> diags;
  DecodedFile decoded = decodeDocument(doc, diags, origin);
  if (!diags.empty()) {
    for (Diagnostic& d : diags) {
      d.pos = {};  // no source text: positions would be meaningless
    }
    return makeError(specError(diags));
  }
  auto it = decoded.sandboxes.find(name);
  if (it == decoded.sandboxes.end()) {
    return makeError(Errc::InvalidSpec, fmt::format("{}: invalid sandbox name '{}'", what, name));
  }
  return std::move(it->second);
}

}  // namespace

Result<SandboxSpec> decodeUpstreamConfig(const nlohmann::json& config, const std::string& name) {
  ML_ASSIGN_OR_RETURN(Json sandbox, toSpecTree(config));
  return decodeTree(std::move(sandbox), name, "<rpc create>", Origin::Rpc);
}

Result<SandboxSpec> decodeNormalized(const nlohmann::json& spec_json, const std::string& name) {
  ML_ASSIGN_OR_RETURN(SandboxSpec spec,
                      decodeTree(Json(spec_json), name, "<stored spec>", Origin::File));
  spec.source_file.clear();
  return spec;
}

}  // namespace matchlock::spec
