// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace matchlock::vm {

/// Builds a newc ("070701") cpio archive in memory, as the kernel's initramfs unpacker reads it.
/// Needs no privileges: device nodes and ownership are just header fields.
class CpioWriter {
 public:
  void addDirectory(std::string_view path, uint32_t mode = 0755);
  void addFile(std::string_view path, std::string_view data, uint32_t mode = 0644);
  void addSymlink(std::string_view path, std::string_view target);
  void addCharDevice(std::string_view path, uint32_t major, uint32_t minor, uint32_t mode = 0600);
  /// Appends the trailer and pads to 512 bytes; the writer is empty afterwards.
  std::string finish();

 private:
  void add(std::string_view path, uint32_t mode, std::string_view data, uint32_t rmajor = 0,
           uint32_t rminor = 0);
  std::string out_;
  uint32_t ino_ = 0;
};

/// The initramfs every sandbox boots: /init (the static matchlock-guest) and /dev/console.
/// Cached by the guest binary's SHA-256 under `cache_dir`; returns the path.
Result<std::string> ensureInitramfs(const std::string& guest_binary, const std::string& cache_dir);

}  // namespace matchlock::vm
