// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"
#include "health/checker.h"
#include "net/sandbox_network.h"
#include "ports/sandbox_ports.h"
#include "sys/process_ref.h"
#include "vfs/sandbox_vfs.h"
#include "vm/backend.h"

namespace matchlock::supervisor {

/// The sandbox's main process (the spec's entrypoint/command): started once the guest is ready,
/// its output appended to `<run_dir>/main.log`, restarted by `restart` ("no", "on-failure",
/// "always", "unless-stopped") with backoff. Run by a `matchlock __main` child of the supervisor.
struct MainProcess {
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;
  std::string cwd;
  std::string user;
  std::string restart = "no";
};

/// What one supervisor runs: written by the CLI to `<run_dir>/vm.json` before it starts the
/// supervisor process, so that the supervisor needs nothing else to boot and serve the sandbox.
struct Config {
  std::string sandbox_id;
  std::string run_dir;           ///< 0700; holds the sockets, logs and the upper disk
  vm::VmConfig vm;               ///< kernel, initramfs, disks, cpus, memory, sockets, kernel params
  std::string backend = "qemu";  ///< vm::makeBackend name
  /// Size of the writable upper disk created (sparse, ext4) at start; 0 = do not create one.
  int64_t upper_disk_mib = 0;
  std::string upper_disk_path;
  /// Keep an existing upper disk (a sandbox's persistent overlay data) instead of formatting a
  /// new one; a smaller existing disk is grown to upper_disk_mib, a larger one is left as it is.
  bool keep_upper_disk = false;
  std::chrono::milliseconds boot_timeout{60000};
  /// State DB to record status in ("" = do not record, for tests).
  std::string state_db;
  std::optional<MainProcess> main_process;
  /// The sandbox's network (disabled = no NIC at all). Secret values are not in here: they come
  /// through `secrets_fd`.
  net::NetworkConfig network;
  /// Host-served filesystems (no mounts = no VFS layer).
  vfs::VfsConfig vfs;
  /// Published ports, bound before the VM starts (a taken port fails the start); changed live
  /// through the `ports` control verb.
  std::vector<ports::Binding> ports;
  /// The spec's healthcheck, run once the guest is ready (docs/health.md).
  std::optional<health::Check> healthcheck;
  /// Guest /etc/hosts additions (host name -> IP).
  std::map<std::string, std::string> add_hosts;
  /// Where the boot config disk (JSON the guest reads at boot: env, CA, hosts) is written.
  std::string boot_config_path;
  /// An inherited pipe carrying the secret values as one JSON object {name: value}, read to EOF
  /// at start (-1 = no secrets). Not serialized: values never touch the disk.
  int secrets_fd = -1;
  /// The process the sandbox belongs to (a `matchlock rpc` server): when it dies the guest is
  /// powered off, and the caller of run() removes the sandbox (ownerGone()). Unset: the sandbox
  /// lives until stopped.
  std::optional<sys::ProcessRef> owner;
};

/// True when `config` names an owner process that is no longer alive.
bool ownerGone(const Config& config);

nlohmann::json toJson(const Config& config);
Result<Config> configFromJson(const nlohmann::json& j);

/// Paths inside a run directory.
std::string controlSocketPath(const std::string& run_dir);
/// The VMM's directory: its sockets (channel, QMP, vhost-user) and console log; the only host
/// directory a jailed VMM can see (as /run/vmm).
std::string vmmDirPath(const std::string& run_dir);
std::string channelSocketPath(const std::string& run_dir);
std::string consoleLogPath(const std::string& run_dir);
std::string mainLogPath(const std::string& run_dir);
/// A sandbox's network (and later file) events, `<home>/events/<id>.jsonl` plus the rotated
/// `.1`: outside the run dir, so they survive a recreate, and removed with the record.
std::string eventsPath(const std::string& home, const std::string& sandbox_id);

/// Runs the supervisor in the current process until the VM ends: creates the upper disk, boots
/// the VM, waits (bounded) for the guest's readiness, serves the control socket (exec relays,
/// status, stop), records status changes, and cleans up its run-dir sockets. Returns the reason
/// the sandbox ended (an error when it failed to boot or crashed).
Status run(const Config& config);

}  // namespace matchlock::supervisor
