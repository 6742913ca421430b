// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "image/manifest.h"
#include "image/reference.h"
#include "image/store.h"

namespace matchlock::image {

/// Credentials for one registry host.
struct Credentials {
  std::string username;
  std::string password;
};

/// Reads `auths` from a Docker config file (`$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json` when `path` is empty). Keys may be `host`, `https://host` or
/// `https://host/v1/`; values carry `auth` (base64 "user:pass") or `username`/`password`.
/// A missing file means no credentials; credential helpers are not supported (a warning is logged).
[[nodiscard]] Result<std::optional<Credentials>> credentialsFor(std::string_view host,
                                                                const std::string& path = "");

/// The parsed `WWW-Authenticate` challenge.
struct AuthChallenge {
  std::string scheme;  // "bearer" or "basic" (lower case)
  std::string realm;
  std::string service;
  std::string scope;
};
[[nodiscard]] Result<AuthChallenge> parseAuthChallenge(std::string_view header);

enum class ProgressMode { Auto, Quiet, Plain, Tty };

struct PullOptions {
  Platform platform;
  /// Plain HTTP for this pull (also when the host is in `insecure_registries`).
  bool insecure = false;
  /// Hosts (host[:port]) spoken to over plain HTTP; default from MATCHLOCK_INSECURE_REGISTRIES
  /// (comma separated).
  std::vector<std::string> insecure_registries;
  /// CA bundle for HTTPS registries (default: MATCHLOCK_CA_BUNDLE, else the system store).
  std::string ca_file;
  /// Docker config path ("" = default lookup).
  std::string docker_config;
  int parallel = 4;
  int max_attempts = 4;  ///< per request, on 429/5xx/connection errors
  ProgressMode progress = ProgressMode::Auto;
};

/// Fills `insecure_registries` and `ca_file` from the environment when they are unset.
void applyEnvironment(PullOptions& options);

/// Pulls `ref` into `store` and records it under `ref.str()`. Every blob is digest-verified before
/// it becomes visible in the store; blobs already present are not downloaded again. On any error
/// no image record is written (verified blobs that were fetched stay until `image gc`).
[[nodiscard]] Result<ImageRecord> pullImage(Store& store, const Reference& ref,
                                            const PullOptions& options);

}  // namespace matchlock::image
