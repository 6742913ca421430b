// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "sys/process.h"

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
  /// Open descriptors for `path` that the VMM inherits (a jailed VMM cannot open host paths):
  /// read-only, and read-write unless `readonly`. Set by the backend, never serialized.
  int fd = -1;
  int rw_fd = -1;
};

/// Where and as whom the VMM runs when jailed (docs/threat-model.md, "The jailed VMM").
struct VmmJail {
  uid_t uid = 0;
  gid_t gid = 0;
  std::string root;     ///< an empty host directory the jail's root is mounted on
  std::string vmm_dir;  ///< host directory (the jail uid's) with every socket and log the VMM
                        ///< opens; the VMM sees it as /run/vmm
  std::vector<int> cgroup_fds;  ///< cgroup.procs files the VMM joins before exec
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
  /// The NIC: an open TAP queue fd the VMM inherits at the same number (-1 = no NIC at all).
  int tap_fd = -1;
  std::string mac;
  /// A virtio-fs device served over vhost-user at this socket ("" = none). The guest's RAM is
  /// then a shared memfd, so that the backend can map it.
  std::string vhost_user_fs_socket;
  std::string vhost_user_fs_tag;
  /// Unset: the VMM runs as we do, with our view of the filesystem.
  std::optional<VmmJail> jail;
};

/// vCPU count for a fractional CPU request.
int vcpuCount(double cpus);

/// A VMM that boots a VmConfig. The QEMU microvm backend (vm/qemu) is the tested one here; a
/// Firecracker backend fits the same shape (spawn the VMM, configure it over its API socket,
/// expose the guest stream on a UNIX socket: hybrid vsock `CONNECT <port>` instead of a
/// virtio-serial chardev). The supervisor owns the returned process and watches its pidfd.
class Backend {
 public:
  virtual ~Backend() = default;
  Backend() = default;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;
  Backend(Backend&&) = delete;
  Backend& operator=(Backend&&) = delete;

  virtual std::string_view name() const = 0;
  /// Starts the VMM for `config` with its stdout/stderr going where `io` says. When it returns,
  /// the guest is booting; readiness is the guest's business (port 5002).
  virtual Result<sys::ChildProcess> start(const VmConfig& config, const sys::SpawnOptions& io) = 0;
};
using BackendPtr = std::unique_ptr<Backend>;

/// The backend called `name` ("qemu"); NotFound for backends this build does not have.
Result<BackendPtr> makeBackend(std::string_view name);

}  // namespace matchlock::vm
