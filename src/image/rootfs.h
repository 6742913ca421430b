// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/result.h"
#include "image/store.h"

namespace matchlock::image {

/// Bumped whenever the builder's output changes; part of the rootfs cache key.
inline constexpr int kRootfsBuilderVersion = 1;

/// One layer: a (possibly gzip/zstd-compressed) tar file, and the name used in errors (its digest).
struct LayerSource {
  std::string path;
  std::string name;
};

/// One entry of the merged tree (for tests and `image rootfs --list`).
struct MergedEntry {
  std::string path;   // "/etc/passwd"
  uint32_t mode = 0;  // full st_mode (type bits included)
  uint32_t uid = 0;
  uint32_t gid = 0;
  int64_t size = 0;
  std::string link_target;  // symlinks
  size_t inode = 0;         // equal for hard links
  uint32_t rdev_major = 0;
  uint32_t rdev_minor = 0;
  std::vector<std::pair<std::string, std::string>> xattrs;
};

/// Reads the layers in order and applies them to one tree: OCI whiteouts (`.wh.name`) delete the
/// name from lower layers, `.wh..wh..opq` empties a directory of lower-layer content, hard links
/// share an inode. Rejects (InvalidSpec, naming the layer and the entry) absolute paths, `..`
/// components, hard links to missing or directory targets, and entries below a symlink or a
/// non-directory. Nothing is extracted to the host filesystem.
[[nodiscard]] Result<std::vector<MergedEntry>> mergeLayers(std::span<const LayerSource> layers);

/// Builds a read-only-use ext4 image at `out_path` from `layers` with libext2fs: owners, modes
/// (setuid/setgid/sticky), symlinks, hard links, device nodes, fifos and xattrs come from the tar
/// headers, independent of the calling user. `tmp_dir` holds the work file; `out_path` appears by
/// rename only when complete.
[[nodiscard]] Status buildExt4(std::span<const LayerSource> layers, const std::string& out_path,
                               const std::string& tmp_dir);

/// The cached rootfs disk of `image` (`<store>/rootfs/<manifest-hex>-v<N>.ext4`), building it when
/// missing. Concurrent callers for the same image build it once (flock per manifest digest).
[[nodiscard]] Result<std::string> ensureRootfs(Store& store, const ImageRecord& image);

}  // namespace matchlock::image
