// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string>

#include "common/result.h"
#include "image/manifest.h"
#include "image/store.h"

namespace matchlock::image {

/// Imports one image from a tar archive read from `fd` (a pipe is fine; gzip is accepted) into
/// `store` under `name` (already normalized, e.g. "busybox:latest"). Two layouts are understood:
///
/// - OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`), also what `docker save`
///   writes since Docker 25: the index entry for `platform` (or the only one) is imported. Every
///   blob's content must hash to its file name.
/// - `docker save` (`manifest.json` + `<id>.json` config + `<id>/layer.tar`): the first image is
///   imported; a manifest is synthesized (OCI media types) and stored with the blobs.
///
/// Nothing is recorded unless every blob was verified and stored.
[[nodiscard]] Result<ImageRecord> importArchive(Store& store, int fd, const std::string& name,
                                                const Platform& platform);

}  // namespace matchlock::image
