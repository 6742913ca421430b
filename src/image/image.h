// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>
#include <string_view>

#include "common/result.h"
#include "image/manifest.h"
#include "image/registry.h"
#include "image/store.h"

namespace matchlock::image {

/// Everything the VM layer needs to boot an image.
struct PreparedImage {
  ImageRecord record;
  ImageConfig config;  // entrypoint, cmd, env, user, working_dir, exposed ports
  std::string rootfs;  // read-only ext4 disk (cached per manifest digest)
};

/// Resolution order (as upstream, one name space): the local store by name (as given, with
/// ":latest", as a registry reference); otherwise, or always with `force_pull`, a pull of `name`
/// parsed as a registry reference (MATCHLOCK_INSECURE_REGISTRIES / MATCHLOCK_CA_BUNDLE apply, see
/// applyEnvironment). Then the config is read (digest re-verified) and the rootfs disk is built if
/// missing.
[[nodiscard]] Result<PreparedImage> prepareImage(Store& store, std::string_view name,
                                                 const PullOptions& options,
                                                 bool force_pull = false);

/// The runtime config of a stored image.
[[nodiscard]] Result<ImageConfig> loadImageConfig(const Store& store, const ImageRecord& record);

}  // namespace matchlock::image
