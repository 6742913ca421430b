// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace matchlock::image {

inline constexpr std::string_view kMediaOciIndex = "application/vnd.oci.image.index.v1+json";
inline constexpr std::string_view kMediaOciManifest = "application/vnd.oci.image.manifest.v1+json";
inline constexpr std::string_view kMediaDockerList =
    "application/vnd.docker.distribution.manifest.list.v2+json";
inline constexpr std::string_view kMediaDockerManifest =
    "application/vnd.docker.distribution.manifest.v2+json";
inline constexpr std::string_view kMediaOciLayerTar = "application/vnd.oci.image.layer.v1.tar";

struct Platform {
  std::string os = "linux";
  std::string architecture = "amd64";
  std::string variant;
  std::string str() const;
};

/// "os/arch[/variant]".
[[nodiscard]] Result<Platform> parsePlatform(std::string_view text);

struct Descriptor {
  std::string media_type;
  std::string digest;  // validated "sha256:<hex>"
  int64_t size = 0;
  Platform platform;  // index entries only
  bool has_platform = false;
};

/// An image manifest (OCI or Docker v2 schema 2).
struct Manifest {
  std::string media_type;
  Descriptor config;
  std::vector<Descriptor> layers;
};

/// An image index / manifest list.
struct Index {
  std::string media_type;
  std::vector<Descriptor> manifests;
};

bool isIndexMediaType(std::string_view media_type);
bool isManifestMediaType(std::string_view media_type);

/// The media type of a manifest document: the HTTP Content-Type when it is a known type, else the
/// document's own "mediaType", else inferred ("manifests" -> OCI index, "layers" -> OCI manifest).
[[nodiscard]] Result<std::string> detectMediaType(std::string_view content_type,
                                                  std::string_view body);

[[nodiscard]] Result<Manifest> parseManifest(std::string_view body);
[[nodiscard]] Result<Index> parseIndex(std::string_view body);

/// Picks the entry for `want` (os and architecture must match; variant when both sides set it).
/// NotFound lists the platforms the index offers.
[[nodiscard]] Result<Descriptor> selectPlatform(const Index& index, const Platform& want);

/// The parts of the image config the runtime uses.
struct ImageConfig {
  std::string user;
  std::string working_dir;
  std::vector<std::string> entrypoint;
  std::vector<std::string> cmd;
  std::vector<std::string> env;            // "K=V", in image order
  std::vector<std::string> exposed_ports;  // "80/tcp"
  std::map<std::string, std::string> labels;
  std::string os;
  std::string architecture;
  std::vector<std::string> diff_ids;  // rootfs.diff_ids
};

[[nodiscard]] Result<ImageConfig> parseImageConfig(std::string_view body);

/// A JSON object with user, working_dir, entrypoint, cmd, env (object), exposed_ports, labels.
std::string imageConfigToJson(const ImageConfig& config);

}  // namespace matchlock::image
