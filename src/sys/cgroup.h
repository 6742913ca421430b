// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"

namespace matchlock::sys {

/// Limits of one sandbox's VMM cgroup (docs/threat-model.md, "The jailed VMM").
struct CgroupLimits {
  int64_t memory_bytes = 0;  ///< memory.max (v1: memory.limit_in_bytes)
  int64_t pids = 0;          ///< pids.max
  int64_t cpu_quota_us = 0;  ///< cpu.max "<quota> <period>" (v1: cpu.cfs_quota_us)
  int64_t cpu_period_us = 100000;
};

/// The cgroup `matchlock/<name>` with the memory, pids and cpu controllers: under the unified
/// (v2) hierarchy when it has those controllers, else under each v1 hierarchy that has one (a
/// hybrid host binds them there). Created with its limits set; removed (rmdir, once empty) by
/// remove() or the destructor.
class SandboxCgroup {
 public:
  static Result<SandboxCgroup> create(const std::string& name, const CgroupLimits& limits);
  /// Removes what a dead sandbox left (idempotent: nothing there is fine).
  static Status remove(const std::string& name);

  SandboxCgroup() = default;
  SandboxCgroup(SandboxCgroup&&) noexcept = default;
  SandboxCgroup& operator=(SandboxCgroup&&) noexcept;
  SandboxCgroup(const SandboxCgroup&) = delete;
  SandboxCgroup& operator=(const SandboxCgroup&) = delete;
  ~SandboxCgroup();

  /// cgroup.procs of each directory, open for writing: a child joins by writing "0" to each.
  std::vector<int> procsFds() const;
  /// The directories (one for v2, one per controller for v1).
  const std::vector<std::string>& dirs() const { return dirs_; }
  bool unified() const { return unified_; }

 private:
  void release();
  std::vector<std::string> dirs_;
  std::vector<Fd> procs_;
  bool unified_ = false;
};

}  // namespace matchlock::sys
