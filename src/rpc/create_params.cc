// SPDX-License-Identifier: Apache-2.0
#include "rpc/create_params.h"

#include <fmt/format.h>

#include <map>
#include <string_view>
#include <utility>

#include "spec/decode.h"

namespace matchlock::rpc {

/// The decoder names spec fields ("<rpc create>: sandboxes.vm-1.memory: ..."); an SDK user wrote
/// upstream's config, so the message names its fields ("resources.memory_mb: ...").
std::string upstreamFieldNames(std::string message, const std::string& id) {
  static const std::map<std::string, std::string, std::less<>> kNames = {
      {"cpus", "resources.cpus"},
      {"memory", "resources.memory_mb"},
      {"disk", "resources.disk_size_mb"},
      {"network.allow_hosts", "network.allowed_hosts"},
      {"hostname", "network.hostname"},
      {"workdir", "image_config.working_dir"},
      {"user", "image_config.user"},
      {"command", "image_config.cmd"},
      {"entrypoint", "image_config.entrypoint"},
      {"mounts", "vfs.mounts"},
  };
  for (const std::string& from :
       {std::string("<rpc create>: "), std::string("sandboxes.") + id + ": "}) {
    for (size_t at = 0; (at = message.find(from, at)) != std::string::npos;) {
      message.erase(at, from.size());
    }
  }
  const std::string prefix = "sandboxes." + id + ".";
  for (size_t at = 0; (at = message.find(prefix, at)) != std::string::npos;) {
    message.erase(at, prefix.size());
    size_t end = message.find_first_of(":[ ", at);
    std::string_view field = std::string_view(message).substr(at, end - at);
    for (const auto& [ours, theirs] : kNames) {
      if (field == ours || (field.size() > ours.size() && field.substr(0, ours.size()) == ours &&
                            field[ours.size()] == '.')) {
        message.replace(at, ours.size(), theirs);
        break;
      }
    }
  }
  return message;
}

Result<CreateParams> decodeCreateParams(const nlohmann::json& params, const std::string& id) {
  nlohmann::json config = params;
  bool keep = false;
  bool launch_entrypoint = false;
  for (auto [key, out] : {std::pair{"keep_on_disconnect", &keep},
                          std::pair{"launch_entrypoint", &launch_entrypoint}}) {
    if (auto it = config.find(key); it != config.end()) {
      if (!it->is_boolean() && !it->is_null()) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("Invalid params: {} must be a boolean", key));
      }
      *out = it->is_boolean() && it->get<bool>();
      config.erase(it);
    }
  }
  // Upstream: a resource only overrides its default when > 0.
  if (config.is_object() && config.contains("resources") && config["resources"].is_object()) {
    nlohmann::json& resources = config["resources"];
    for (const char* k : {"cpus", "memory_mb", "disk_size_mb", "timeout_seconds"}) {
      if (resources.contains(k) && resources[k].is_number() && resources[k].get<double>() <= 0) {
        resources.erase(k);
      }
    }
  }
  CreateParams out;
  if (auto v = config.find("vfs");
      v != config.end() && v->is_object() && v->contains("workspace")) {
    const nlohmann::json& w = v->at("workspace");
    if (!w.is_null() && !w.is_string()) {
      return makeError(Errc::InvalidSpec, "Invalid params: vfs.workspace must be a string");
    }
    if (w.is_string()) {
      out.workspace = w.get<std::string>();
    }
  }
  auto decoded = spec::decodeUpstreamConfig(config, id);
  if (!decoded) {
    return makeError(
        Errc::InvalidSpec,
        fmt::format("Invalid params: {}", upstreamFieldNames(decoded.error().message(), id)));
  }
  if (decoded->image.empty()) {
    return makeError(Errc::InvalidSpec, "Invalid params: image is required");
  }
  out.spec = std::move(*decoded);
  out.id = id;
  out.keep = keep;
  out.launch_entrypoint = launch_entrypoint;
  return out;
}

}  // namespace matchlock::rpc
