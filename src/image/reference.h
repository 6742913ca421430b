// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <string_view>

#include "common/result.h"

namespace matchlock::image {

/// `host[:port]/repo/path[:tag][@sha256:...]`.
///
/// There is no implicit Docker Hub: a reference without a registry host resolves against the
/// configured default registry (`MATCHLOCK_DEFAULT_REGISTRY`); with none configured, parsing fails
/// with a message saying so. The first path component is a host when it contains '.' or ':' or is
/// `localhost`.
struct Reference {
  std::string registry;    // "127.0.0.1:5000"
  std::string repository;  // "library/busybox"
  std::string tag;         // "latest" when neither tag nor digest was given
  std::string digest;      // "sha256:..." or ""

  /// `registry/repository:tag` or `registry/repository@digest`.
  std::string str() const;
  /// What to ask the registry for: the digest when pinned, else the tag.
  std::string manifestRef() const { return digest.empty() ? tag : digest; }
};

/// Parses `text`; `default_registry` is used when the reference names no host ("" = none).
[[nodiscard]] Result<Reference> parseReference(std::string_view text,
                                               std::string_view default_registry);

/// The default registry from the environment (`MATCHLOCK_DEFAULT_REGISTRY`), or "".
std::string defaultRegistry();

/// A local image name for `image import` and the store: `name[:tag]`, with ":latest" added when no
/// tag is given. Lower-case repository characters [a-z0-9._/-], tag [A-Za-z0-9_.-]{1,128}.
[[nodiscard]] Result<std::string> normalizeLocalName(std::string_view text);

}  // namespace matchlock::image
