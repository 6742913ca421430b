// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "spec/model.h"
#include "state/store.h"

namespace matchlock::runtime {

/// Named volumes and raw ext4 disks (docs/vm-runtime.md "Named volumes and raw disks"): sparse
/// ext4 images at `<cache>/volumes/<name>.ext4`, attached to a sandbox as virtio-blk disks and
/// mounted by the guest init before anything runs.

inline constexpr int64_t kDefaultVolumeMib = 10240;  ///< upstream's `volume create --size`
inline constexpr size_t kMaxExtraDisks = 16;         ///< virtio-mmio slots left on microvm

/// `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`, at most 128 characters.
bool isValidVolumeName(std::string_view name);

/// `<cacheDir()>/volumes`.
[[nodiscard]] Result<std::string> volumesDir();
/// The image file of volume `name` (whether or not it exists); InvalidSpec for a bad name.
[[nodiscard]] Result<std::string> volumePath(const std::string& name);

struct VolumeInfo {
  std::string name;
  int64_t size_bytes = 0;  ///< apparent size
  std::string path;
};
/// "16.0 MB": upstream's size text (MiB, one decimal).
std::string formatVolumeSize(int64_t bytes);

[[nodiscard]] Result<VolumeInfo> createVolume(const std::string& name, int64_t mib);
/// Sorted by name.
[[nodiscard]] Result<std::vector<VolumeInfo>> listVolumes();
/// Refuses (Conflict) while a live sandbox has the volume attached.
[[nodiscard]] Status removeVolume(state::Store& store, const std::string& name);
/// A sparse byte copy keeping mode, owner and mtime; `dst` must not exist.
[[nodiscard]] Result<VolumeInfo> copyVolume(const std::string& src, const std::string& dst);

/// Ids of live sandboxes (supervisor alive) whose applied spec attaches `host_path`, the image of
/// a named volume or a raw disk.
[[nodiscard]] Result<std::vector<std::string>> sandboxesUsingDisk(state::Store& store,
                                                                  const std::string& host_path);

/// `run --disk`: `HOST_PATH:GUEST_MOUNT[:ro|readonly|rw]` or `@NAME:GUEST_MOUNT[:ro]` as a spec
/// mount (mode Disk with an absolute, existing host path, or mode Volume with the name). Whether a
/// named volume exists is checked at launch.
[[nodiscard]] Result<spec::Mount> parseDiskFlag(const std::string& arg);

/// The host image a Volume or Disk mount attaches; NotFound when it does not exist.
[[nodiscard]] Result<std::string> diskImageOf(const spec::Mount& mount);

}  // namespace matchlock::runtime
