// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace matchlock::vm {

/// Hardware acceleration. Auto probes KVM once (a bounded boot) and falls back to TCG: on hosts
/// where /dev/kvm exists but nested KVM is broken, a VM would crawl and then die.
enum class Accel { Auto, Kvm, Tcg };
Result<Accel> parseAccel(std::string_view text);
std::string_view toString(Accel accel);

struct DiskSpec {
  std::string path;
  std::string serial;  ///< the guest finds disks by serial (matchlock.root=serial:NAME)
  bool readonly = false;
};

/// Everything a backend needs to boot one sandbox VM.
struct VmConfig {
  std::string id;
  std::string kernel;
  std::string initramfs;
  double cpus = 1;  ///< vCPUs = ceil(cpus); the guest enforces the fraction with cpu.max
  int64_t memory_mib = 512;
  std::vector<DiskSpec> disks;
  std::string channel_socket;  ///< UNIX socket carrying the host<->guest stream
  std::string control_socket;  ///< VMM control (QMP for QEMU, REST API for Firecracker)
  std::string console_log;
  std::vector<std::string> kernel_params;  ///< matchlock.* parameters for the guest init
  Accel accel = Accel::Tcg;                ///< resolved: never Auto here
};

/// vCPU count for a fractional CPU request.
int vcpuCount(double cpus);

}  // namespace matchlock::vm
