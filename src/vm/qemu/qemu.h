// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/resource.h>

#include <chrono>
#include <string>
#include <vector>

#include "common/result.h"
#include "vm/backend.h"

namespace matchlock::vm::qemu {

/// RLIMIT_NPROC of a jailed VMM (its uid is its own): QEMU's vCPU, I/O and worker threads.
inline constexpr rlim_t kVmmMaxThreads = 256;

/// The QEMU microvm backend.
class QemuBackend : public Backend {
 public:
  explicit QemuBackend(std::string binary = "qemu-system-x86_64") : binary_(std::move(binary)) {}
  std::string_view name() const override { return "qemu"; }
  Result<sys::ChildProcess> start(const VmConfig& config, const sys::SpawnOptions& io) override;

 private:
  std::string binary_;
};

/// qemu-system-x86_64 arguments for a microvm booting `config` (pure; tested as such).
/// microvm runs with acpi=off so that QEMU lists the virtio-mmio devices on the kernel command
/// line (our kernel has no ACPI), and with -no-reboot so that the guest's reboot ends QEMU.
std::vector<std::string> buildArgv(const VmConfig& config, const std::string& qemu_binary);

struct ProbeResult {
  bool kvm_works = false;
  std::string detail;  ///< why not, for `--accel auto` diagnostics
};

/// Boots the probe kernel/initramfs (matchlock.probe=1) under KVM with a bounded wait. True only
/// if it reaches init and powers off within `bound`; a missing or unusable /dev/kvm, a KVM
/// emulation failure or a slow boot all mean false. The result is cached in `cache_file`.
ProbeResult probeKvm(const std::string& qemu_binary, const std::string& kernel,
                     const std::string& initramfs, const std::string& cache_file,
                     std::chrono::milliseconds bound);

/// Resolves Accel::Auto (and MATCHLOCK_ACCEL) to Kvm or Tcg; explicit choices pass through.
Accel resolveAccel(Accel requested, const std::string& qemu_binary, const std::string& kernel,
                   const std::string& initramfs, const std::string& cache_dir);

}  // namespace matchlock::vm::qemu
