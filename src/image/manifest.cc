// SPDX-License-Identifier: Apache-2.0
// nlohmann throws on type errors; every parse here catches inside this file.
#include "image/manifest.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "common/strings.h"
#include "image/digest.h"

namespace matchlock::image {
namespace {

using Json = nlohmann::json;

Result<Json> parseJson(std::string_view body, std::string_view what) {
  Json j = Json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return makeError(Errc::InvalidSpec, fmt::format("{} is not a JSON object", what));
  }
  return j;
}

std::string strField(const Json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) {
    return "";
  }
  return it->get<std::string>();
}

std::vector<std::string> strList(const Json& j, const char* key) {
  std::vector<std::string> out;
  auto it = j.find(key);
  if (it == j.end() || !it->is_array()) {
    return out;
  }
  for (const Json& v : *it) {
    if (v.is_string()) {
      out.push_back(v.get<std::string>());
    }
  }
  return out;
}

Result<Descriptor> parseDescriptor(const Json& j, std::string_view what) {
  if (!j.is_object()) {
    return makeError(Errc::InvalidSpec, fmt::format("{}: descriptor is not an object", what));
  }
  Descriptor d;
  d.media_type = strField(j, "mediaType");
  auto digest = parseDigest(strField(j, "digest"));
  if (!digest) {
    return makeError(std::move(digest).error().withContext(what));
  }
  d.digest = digest->str();
  auto size = j.find("size");
  if (size == j.end() || !size->is_number_integer() || size->get<int64_t>() < 0) {
    return makeError(Errc::InvalidSpec, fmt::format("{}: descriptor has no valid size", what));
  }
  d.size = size->get<int64_t>();
  auto platform = j.find("platform");
  if (platform != j.end() && platform->is_object()) {
    d.has_platform = true;
    d.platform.os = strField(*platform, "os");
    d.platform.architecture = strField(*platform, "architecture");
    d.platform.variant = strField(*platform, "variant");
  }
  return d;
}

}  // namespace

std::string Platform::str() const {
  return variant.empty() ? os + "/" + architecture : os + "/" + architecture + "/" + variant;
}

Result<Platform> parsePlatform(std::string_view text) {
  std::vector<std::string> parts = split(text, '/');
  if (parts.size() < 2 || parts.size() > 3 || parts[0].empty() || parts[1].empty()) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("invalid platform '{}': want os/arch[/variant]", text));
  }
  Platform p;
  p.os = parts[0];
  p.architecture = parts[1];
  if (parts.size() == 3) {
    p.variant = parts[2];
  }
  return p;
}

bool isIndexMediaType(std::string_view media_type) {
  return media_type == kMediaOciIndex || media_type == kMediaDockerList;
}

bool isManifestMediaType(std::string_view media_type) {
  return media_type == kMediaOciManifest || media_type == kMediaDockerManifest;
}

Result<std::string> detectMediaType(std::string_view content_type, std::string_view body) {
  std::string ct(trim(content_type.substr(0, content_type.find(';'))));
  if (isIndexMediaType(ct) || isManifestMediaType(ct)) {
    return ct;
  }
  ML_ASSIGN_OR_RETURN(Json j, parseJson(body, "manifest"));
  std::string mt = strField(j, "mediaType");
  if (isIndexMediaType(mt) || isManifestMediaType(mt)) {
    return mt;
  }
  if (!mt.empty()) {
    return makeError(Errc::InvalidSpec, fmt::format("unsupported manifest media type '{}'", mt));
  }
  auto schema = j.find("schemaVersion");
  if (schema != j.end() && schema->is_number_integer() && schema->get<int>() == 1) {
    return makeError(Errc::InvalidSpec,
                     "Docker v2 schema 1 manifests are not supported (re-push the image)");
  }
  if (j.contains("manifests")) {
    return std::string(kMediaOciIndex);
  }
  if (j.contains("layers")) {
    return std::string(kMediaOciManifest);
  }
  return makeError(Errc::InvalidSpec, "cannot tell the manifest's media type");
}

Result<Manifest> parseManifest(std::string_view body) {
  ML_ASSIGN_OR_RETURN(Json j, parseJson(body, "manifest"));
  Manifest m;
  m.media_type = strField(j, "mediaType");
  auto config = j.find("config");
  if (config == j.end()) {
    return makeError(Errc::InvalidSpec, "manifest has no config descriptor");
  }
  ML_ASSIGN_OR_RETURN(m.config, parseDescriptor(*config, "manifest config"));
  auto layers = j.find("layers");
  if (layers == j.end() || !layers->is_array()) {
    return makeError(Errc::InvalidSpec, "manifest has no layers array");
  }
  for (size_t i = 0; i < layers->size(); ++i) {
    ML_ASSIGN_OR_RETURN(Descriptor d,
                        parseDescriptor((*layers)[i], fmt::format("manifest layer {}", i)));
    if (d.media_type.find("foreign") != std::string::npos ||
        d.media_type.find("nondistributable") != std::string::npos) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("layer {} has unsupported media type '{}'", i, d.media_type));
    }
    m.layers.push_back(std::move(d));
  }
  return m;
}

Result<Index> parseIndex(std::string_view body) {
  ML_ASSIGN_OR_RETURN(Json j, parseJson(body, "image index"));
  Index idx;
  idx.media_type = strField(j, "mediaType");
  auto manifests = j.find("manifests");
  if (manifests == j.end() || !manifests->is_array()) {
    return makeError(Errc::InvalidSpec, "image index has no manifests array");
  }
  for (size_t i = 0; i < manifests->size(); ++i) {
    ML_ASSIGN_OR_RETURN(Descriptor d,
                        parseDescriptor((*manifests)[i], fmt::format("index entry {}", i)));
    idx.manifests.push_back(std::move(d));
  }
  return idx;
}

Result<Descriptor> selectPlatform(const Index& index, const Platform& want) {
  std::vector<std::string> offered;
  const Descriptor* fallback = nullptr;
  for (const Descriptor& d : index.manifests) {
    if (!d.has_platform) {
      continue;
    }
    offered.push_back(d.platform.str());
    if (d.platform.os != want.os || d.platform.architecture != want.architecture) {
      continue;
    }
    if (want.variant.empty() || d.platform.variant.empty() || d.platform.variant == want.variant) {
      if (d.platform.variant == want.variant) {
        return d;
      }
      if (fallback == nullptr) {
        fallback = &d;
      }
    }
  }
  if (fallback != nullptr) {
    return *fallback;
  }
  // An index without any platform annotations (e.g. a single-image OCI layout): take the only
  // entry.
  if (offered.empty() && index.manifests.size() == 1) {
    return index.manifests.front();
  }
  return makeError(Errc::NotFound,
                   fmt::format("no image for platform {} in the index (offered: {})", want.str(),
                               offered.empty() ? std::string("none") : join(offered, ", ")));
}

Result<ImageConfig> parseImageConfig(std::string_view body) {
  ML_ASSIGN_OR_RETURN(Json j, parseJson(body, "image config"));
  ImageConfig c;
  c.os = strField(j, "os");
  c.architecture = strField(j, "architecture");
  auto cfg = j.find("config");
  if (cfg != j.end() && cfg->is_object()) {
    c.user = strField(*cfg, "User");
    c.working_dir = strField(*cfg, "WorkingDir");
    c.entrypoint = strList(*cfg, "Entrypoint");
    c.cmd = strList(*cfg, "Cmd");
    c.env = strList(*cfg, "Env");
    auto ports = cfg->find("ExposedPorts");
    if (ports != cfg->end() && ports->is_object()) {
      for (const auto& [port, unused] : ports->items()) {
        c.exposed_ports.push_back(port);
      }
    }
    auto labels = cfg->find("Labels");
    if (labels != cfg->end() && labels->is_object()) {
      for (const auto& [key, value] : labels->items()) {
        if (value.is_string()) {
          c.labels[key] = value.get<std::string>();
        }
      }
    }
  }
  auto rootfs = j.find("rootfs");
  if (rootfs != j.end() && rootfs->is_object()) {
    c.diff_ids = strList(*rootfs, "diff_ids");
    for (const std::string& id : c.diff_ids) {
      auto d = parseDigest(id);
      if (!d) {
        return makeError(std::move(d).error().withContext("image config rootfs.diff_ids"));
      }
    }
  }
  return c;
}

std::string imageConfigToJson(const ImageConfig& config) {
  nlohmann::ordered_json j;
  j["user"] = config.user;
  j["working_dir"] = config.working_dir;
  j["entrypoint"] = config.entrypoint;
  j["cmd"] = config.cmd;
  nlohmann::ordered_json env = nlohmann::ordered_json::object();
  for (const std::string& kv : config.env) {
    size_t eq = kv.find('=');
    env[kv.substr(0, eq)] = eq == std::string::npos ? "" : kv.substr(eq + 1);
  }
  j["env"] = env;
  j["exposed_ports"] = config.exposed_ports;
  j["labels"] = config.labels;
  j["os"] = config.os;
  j["architecture"] = config.architecture;
  return j.dump(2);
}

}  // namespace matchlock::image
