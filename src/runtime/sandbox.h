// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "common/result.h"
#include "health/checker.h"
#include "image/image.h"
#include "ports/sandbox_ports.h"
#include "spec/model.h"
#include "state/store.h"
#include "supervisor/supervisor.h"
#include "vm/backend.h"

namespace matchlock::runtime {

/// The project `matchlock run` puts its ad-hoc sandboxes in (reserved for declared projects).
inline constexpr const char* kAdhocProject = "default";

// ---- Where things live (docs/vm-runtime.md) ---------------------------------------------------

/// `$MATCHLOCK_HOME/run` (0700): one directory per sandbox id, holding its sockets, logs, vm.json
/// and, for ad-hoc sandboxes, the upper disk.
[[nodiscard]] Result<std::string> runRoot();
std::string runDirOf(const std::string& run_root, const std::string& id);
/// `$MATCHLOCK_HOME/data/<project>`: every declared sandbox's data dir of the project.
[[nodiscard]] Result<std::string> projectDataDir(const std::string& project);
/// `$MATCHLOCK_HOME/data/<project>/<name>`: a declared sandbox's overlay data (its upper disk),
/// kept across recreate and `down`, deleted by `down -v`.
[[nodiscard]] Result<std::string> dataDirOf(const std::string& project, const std::string& name);
/// `vm-<8 hex>`.
std::string newSandboxId();

/// The guest kernel: MATCHLOCK_KERNEL, else the one guest/kernel/build.sh caches for this build.
[[nodiscard]] Result<std::string> findKernel();
/// matchlock-guest: MATCHLOCK_GUEST, else next to this executable.
[[nodiscard]] Result<std::string> findGuest();

/// What every boot needs besides the image, resolved once per command (the KVM probe may boot a
/// VM, so callers resolve lazily, only when something will start).
struct BootAssets {
  std::string kernel;
  std::string initramfs;
  vm::Accel accel = vm::Accel::Tcg;
};
[[nodiscard]] Result<BootAssets> resolveBootAssets(const std::string& accel_name);

/// An image config's `KEY=VALUE` env list as a map (later entries win).
std::map<std::string, std::string> imageEnv(const image::ImageConfig& config);

/// The main process a spec declares (entrypoint/command), or nullopt for a sandbox that idles
/// until exec'd into. Docker's rules: ENTRYPOINT + CMD, a spec `entrypoint` drops the image's CMD;
/// env is the image's then the spec's; cwd and user fall back to the image's. The image's own CMD
/// alone is not run: sandboxes are long-lived and `command` is the explicit request for one.
std::optional<supervisor::MainProcess> mainProcessOf(const spec::SandboxSpec& spec,
                                                     const image::ImageConfig& image);

/// What an exec into a recorded sandbox runs with unless the caller overrides it: the image's env
/// overlaid with the spec's, the spec's workdir and user or else the image's (docker exec's rules).
/// The image config comes from the local store; without it, the spec's values alone.
struct ExecDefaults {
  std::map<std::string, std::string> env;
  std::string cwd;
  std::string user;
};
ExecDefaults execDefaults(const state::SandboxRecord& record);

// ---- Lifecycle --------------------------------------------------------------------------------

struct LaunchOptions {
  std::string project;
  /// Id of a new record (default: newSandboxId()); ignored when re-launching an existing one.
  std::string id;
  /// Persistent upper disk (declared sandboxes); empty: `<run dir>/upper.ext4`, discarded with
  /// the sandbox.
  std::string data_disk;
  std::chrono::seconds boot_timeout{120};
  std::optional<std::string> secrets_hash;
  std::optional<std::string> image_digest;
  /// The values of the spec's secrets, already resolved by the caller (null: launch resolves
  /// them). Handed to the supervisor through a pipe, never through a file, argv or env.
  const std::map<std::string, std::string>* secret_values = nullptr;
  /// The process the sandbox belongs to: when it dies, the supervisor powers the guest off and
  /// removes the sandbox (`matchlock rpc` without keep_on_disconnect).
  std::optional<sys::ProcessRef> owner;
};

/// Creates the sandbox's record (or, when `existing_id` is set, re-points that record at `spec`
/// and a new generation), records its resource intents, writes vm.json and starts the detached
/// supervisor. Returns the sandbox id once the supervisor is recorded; the guest boots in the
/// background (waitReady). On failure nothing of the launch is left running and the record says
/// why (a new record is deleted again).
[[nodiscard]] Result<std::string> launch(state::Store& store, const spec::SandboxSpec& spec,
                                         const image::PreparedImage& image,
                                         const BootAssets& assets, const LaunchOptions& options,
                                         const std::optional<std::string>& existing_id = {});

/// The spec's healthcheck as the supervisor's health layer takes it (nullopt: none, or NONE).
std::optional<health::Check> healthCheckOf(const spec::SandboxSpec& spec);
/// The spec's published ports as the supervisor's ports layer takes them.
std::vector<ports::Binding> portBindingsOf(const spec::SandboxSpec& spec);

/// Applies a live change (`up`'s `~ update`) to a running sandbox without restarting it: `ports`
/// replaces the published ports (all or nothing, put back if the egress update fails),
/// `healthcheck` the health layer's check (starting over); for the
/// `egress` and `secrets` groups its supervisor swaps the allow-list, private-range blocking and
/// the secrets' hosts and values (`secret_values`, sent over the control socket only); `meta` is
/// only recorded. Then the record takes `spec` as its applied spec (next generation, same
/// supervisor). On failure the record keeps its old spec, so the next `up` tries again.
[[nodiscard]] Status updateLive(state::Store& store, const state::SandboxRecord& record,
                                const spec::SandboxSpec& spec,
                                const std::vector<std::string>& groups,
                                const std::map<std::string, std::string>& secret_values,
                                const std::optional<std::string>& secrets_hash);

/// Waits (bounded by `timeout`) until the sandbox's guest is ready. Unavailable with the recorded
/// reason when it failed, crashed or its supervisor died.
[[nodiscard]] Status waitReady(state::Store& store, const std::string& id,
                               std::chrono::milliseconds timeout);

/// How a recorded sandbox really is, by observation (processes, run dir, owned resources), not
/// only by its recorded status. Read-only: never writes the state DB.
enum class Health {
  Running,    ///< supervisor and VMM alive, guest ready
  Starting,   ///< supervisor alive, guest not ready yet
  Stopped,    ///< cleanly stopped
  Crashed,    ///< the supervisor is gone although the record says it runs
  VmmDied,    ///< the VMM died (the supervisor noticed, or is about to)
  Leaked,     ///< alive, but owned resources (run dir, disk) vanished behind our back
  Failed,     ///< the last start failed
  Pending,    ///< a launch or teardown was interrupted (intent recorded, never completed)
  Unhealthy,  ///< running, but its healthcheck failed `retries` times in a row
};
std::string_view toString(Health health);
struct Observation {
  Health health = Health::Running;
  std::string detail;  ///< why, for anything but Running/Starting/Stopped
};
Observation observe(state::Store& store, const state::SandboxRecord& record,
                    const std::string& run_root);

/// Asks the supervisor for a clean guest power-off (bounded), then kills what is left.
void stop(state::Store& store, const state::SandboxRecord& record, const std::string& run_root);
/// Kills the supervisor and the VMM by recorded pid + start time (never a reused pid), bounded.
void killProcesses(state::Store& store, const state::SandboxRecord& record);
/// Kills what runs, removes the run dir and the owned-resource rows; keeps the sandbox row.
[[nodiscard]] Status teardown(state::Store& store, const state::SandboxRecord& record,
                              const std::string& run_root);
/// teardown() plus the sandbox row; with `remove_data` also its data dir.
[[nodiscard]] Status remove(state::Store& store, const state::SandboxRecord& record,
                            const std::string& run_root, bool remove_data);

/// A sandbox by id, `project/name`, or a name that only one project uses.
[[nodiscard]] Result<state::SandboxRecord> findSandbox(state::Store& store, const std::string& ref);

}  // namespace matchlock::runtime
