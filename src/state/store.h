// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "state/db.h"
#include "state/migrate.h"
#include "state/subnet.h"
#include "sys/process_ref.h"

namespace matchlock::state {

using sys::ProcessRef;

// ---- Records ----------------------------------------------------------------------------------

/// Lifecycle status of a sandbox as recorded by the reconciler.
enum class SandboxStatus { Pending, Creating, Running, Stopped, Crashed, Failed, Removing };
std::string_view sandboxStatusName(SandboxStatus status);
[[nodiscard]] Result<SandboxStatus> parseSandboxStatus(std::string_view name);

enum class VmStatus { Creating, Starting, Running, Stopping, Stopped, Crashed, Failed };
std::string_view vmStatusName(VmStatus status);
[[nodiscard]] Result<VmStatus> parseVmStatus(std::string_view name);

/// Kinds of host objects a sandbox owns. Names are derived deterministically from the sandbox id
/// (TAP `ml<8-hex>`, nft table `ml_<8-hex>`, run dir `<rundir>/<id>/`).
enum class ResourceKind { Tap, NftTable, Disk, RunDir, Process, Netns, Socket };
std::string_view resourceKindName(ResourceKind kind);
[[nodiscard]] Result<ResourceKind> parseResourceKind(std::string_view name);

/// intent: recorded, the object may or may not exist yet; created: the object exists;
/// deleting: teardown started. The row is removed once the object is gone.
enum class ResourceState { Intent, Created, Deleting };
std::string_view resourceStateName(ResourceState state);
[[nodiscard]] Result<ResourceState> parseResourceState(std::string_view name);

struct ProjectRecord {
  std::string name;
  std::string created_at;
  std::string updated_at;
};

/// A sandbox row. `spec_json` is the applied, normalized spec as the caller gives it: callers MUST
/// pass specs whose secrets are references only (env var name, file path, command), never values.
/// The store cannot tell a value from a reference and stores exactly what it is given.
struct SandboxRecord {
  std::string id;
  std::string project;
  std::string name;
  std::optional<std::string> source_file;  ///< absent for sandboxes created over RPC
  std::string spec_json = "{}";
  std::string spec_hash;
  /// Field group -> sha256 hex of that group's normalized JSON ("image", "resources", ...).
  std::map<std::string, std::string> group_hashes;
  /// Keyed hash over resolved secret values (rotation detection); never the values themselves.
  std::optional<std::string> secrets_hash;
  SandboxStatus status = SandboxStatus::Pending;
  int64_t generation = 1;
  std::optional<ProcessRef> supervisor;
  std::optional<std::string> last_error;
  std::string created_at;  ///< set by the store
  std::string updated_at;  ///< set by the store
  /// Manifest digest of the image the sandbox was last booted from (absent: unknown).
  std::optional<std::string> image_digest;
  /// Healthcheck status from its supervisor: absent without a healthcheck, else "starting",
  /// "healthy" or "unhealthy" (health_detail says why).
  std::optional<std::string> health;
  std::optional<std::string> health_detail;
};

/// The fields of a new applied spec (updateSandboxSpec).
struct SandboxSpecUpdate {
  std::optional<std::string> source_file;
  std::string spec_json;
  std::string spec_hash;
  std::map<std::string, std::string> group_hashes;
  std::optional<std::string> secrets_hash;
  std::optional<std::string> image_digest;
};

struct VmRecord {
  std::string id;
  std::string sandbox_id;
  std::string backend;  ///< "qemu", "firecracker", ...
  std::optional<ProcessRef> process;
  VmStatus status = VmStatus::Creating;
  std::string created_at;
  std::string updated_at;
};

struct SubnetRecord {
  std::string sandbox_id;
  SubnetAllocation allocation;
  std::string created_at;
};

struct OwnedResource {
  int64_t id = 0;
  std::string sandbox_id;
  ResourceKind kind = ResourceKind::Tap;
  std::string name;
  ResourceState state = ResourceState::Intent;
  std::string detail_json = "{}";
  std::string created_at;
  std::string updated_at;
};

struct Event {
  int64_t id = 0;  ///< set by the store; strictly increasing
  std::string ts;  ///< set by the store
  std::optional<std::string> project;
  std::optional<std::string> sandbox_id;
  std::string kind;  ///< e.g. "sandbox.created", "vm.crashed"
  std::string message;
  std::string data_json = "{}";
};

struct EventFilter {
  std::optional<std::string> project;
  std::optional<std::string> sandbox_id;
  std::optional<std::string> kind;
  /// Only events with id > after_id (a cursor for following the log).
  std::optional<int64_t> after_id;
  /// Maximum number of events. With after_id: the oldest matching ones after the cursor; without:
  /// the newest matching ones. Either way the result is in ascending id order.
  int64_t limit = 100;
};

enum class DeleteMode {
  /// Refuse (Conflict) while the sandbox still has owned_resources rows.
  RefuseIfResources,
  /// Delete the owned_resources rows too (the caller has torn the objects down or gives up on
  /// them).
  Force,
};

struct StoreOptions {
  /// Subnet pool for allocateSubnet; default SubnetPool::fromEnv().
  std::optional<SubnetPool> subnet_pool;
  /// Migrations to apply; default embeddedMigrations(). Tests pass their own list.
  std::optional<std::vector<Migration>> migrations;
};

// ---- Store ------------------------------------------------------------------------------------

/// The state store: one SQLite connection plus typed repositories. Every method runs in its own
/// transaction (writes use BEGIN IMMEDIATE and are retried with bounded backoff when the DB stays
/// busy past the busy timeout). Not thread-safe by design: one Store per owning thread (the control
/// loop owns the write handle); separate processes each open their own Store.
class Store {
 public:
  /// Opens `path` (kMemoryPath for tests), creating the file with mode 0600 if needed, and migrates
  /// it. Initialization is serialized across processes with an flock on `<path>.init.lock`.
  [[nodiscard]] static Result<Store> open(const std::string& path, StoreOptions options = {});
  /// Opens `$MATCHLOCK_HOME/state.db` (default ~/.matchlock), creating the directory with 0700.
  [[nodiscard]] static Result<Store> openDefault(StoreOptions options = {});
  /// `<matchlockHome()>/state.db`.
  [[nodiscard]] static Result<std::string> defaultPath();

  Db& db() { return db_; }
  const SubnetPool& subnetPool() const { return pool_; }

  // Projects.
  [[nodiscard]] Status upsertProject(std::string_view name);
  [[nodiscard]] Result<std::vector<ProjectRecord>> listProjects();
  /// Deletes the project row when no sandbox belongs to it; returns whether it was deleted.
  [[nodiscard]] Result<bool> deleteProjectIfEmpty(std::string_view name);

  // Sandboxes.
  /// Inserts a sandbox (creating its project if needed). Conflict if the id or (project, name)
  /// exists. Timestamps and generation are set by the store; returns the stored row.
  [[nodiscard]] Result<SandboxRecord> createSandbox(const SandboxRecord& record);
  /// NotFound if absent.
  [[nodiscard]] Result<SandboxRecord> getSandbox(std::string_view id);
  [[nodiscard]] Result<std::optional<SandboxRecord>> findSandbox(std::string_view project,
                                                                 std::string_view name);
  /// Ordered by project, then name.
  [[nodiscard]] Result<std::vector<SandboxRecord>> listSandboxes(
      std::optional<std::string_view> project = std::nullopt);
  /// Replaces the applied spec and bumps the generation; returns the new generation.
  [[nodiscard]] Result<int64_t> updateSandboxSpec(std::string_view id,
                                                  const SandboxSpecUpdate& update);
  /// Sets the status; `last_error` replaces the stored error (nullopt clears it).
  [[nodiscard]] Status updateSandboxStatus(std::string_view id, SandboxStatus status,
                                           std::optional<std::string_view> last_error = {});
  /// Records (or with nullopt clears) the supervisor process.
  [[nodiscard]] Status setSupervisor(std::string_view id, std::optional<ProcessRef> supervisor);
  /// The supervisor's healthcheck status (nullopt: the sandbox has none).
  [[nodiscard]] Status updateSandboxHealth(std::string_view id,
                                           std::optional<std::string_view> health,
                                           std::optional<std::string_view> detail);
  /// Deletes the sandbox with its subnet, VMs and (with DeleteMode::Force) owned resources, in one
  /// transaction. Returns the number of rows deleted; NotFound if absent. Events are kept.
  [[nodiscard]] Result<int64_t> deleteSandbox(std::string_view id,
                                              DeleteMode mode = DeleteMode::RefuseIfResources);

  // VMs.
  /// Inserts or replaces the VM row (keeps created_at).
  [[nodiscard]] Status upsertVm(const VmRecord& vm);
  [[nodiscard]] Result<VmRecord> getVm(std::string_view id);
  [[nodiscard]] Result<std::vector<VmRecord>> listVms(
      std::optional<std::string_view> sandbox_id = std::nullopt);
  [[nodiscard]] Status updateVmStatus(std::string_view id, VmStatus status,
                                      std::optional<ProcessRef> process);
  /// Returns whether a row was deleted.
  [[nodiscard]] Result<bool> deleteVm(std::string_view id);

  // Subnets.
  /// Returns the sandbox's existing allocation, or allocates the lowest free index of the pool.
  /// Unavailable when the pool is exhausted; NotFound if the sandbox does not exist.
  [[nodiscard]] Result<SubnetAllocation> allocateSubnet(std::string_view sandbox_id);
  [[nodiscard]] Result<std::optional<SubnetAllocation>> getSubnet(std::string_view sandbox_id);
  [[nodiscard]] Result<std::vector<SubnetRecord>> listSubnets();
  /// Returns whether an allocation was released.
  [[nodiscard]] Result<bool> releaseSubnet(std::string_view sandbox_id);

  // Owned resources.
  /// Records the intent to create (kind, name) for `sandbox_id` *before* creating it. Idempotent:
  /// an existing row of the same sandbox is returned unchanged (whatever its state); a row owned by
  /// another sandbox is a Conflict. `detail_json` must be a JSON value (InvalidSpec otherwise).
  [[nodiscard]] Result<OwnedResource> recordResourceIntent(std::string_view sandbox_id,
                                                           ResourceKind kind, std::string_view name,
                                                           std::string_view detail_json = "{}");
  /// intent|created -> created (Conflict from deleting). Optionally replaces the detail.
  [[nodiscard]] Status markResourceCreated(ResourceKind kind, std::string_view name,
                                           std::optional<std::string_view> detail_json = {});
  /// any -> deleting.
  [[nodiscard]] Status markResourceDeleting(ResourceKind kind, std::string_view name);
  /// Removes the row once the object is gone; returns whether a row existed.
  [[nodiscard]] Result<bool> deleteResource(ResourceKind kind, std::string_view name);
  [[nodiscard]] Result<std::optional<OwnedResource>> getResource(ResourceKind kind,
                                                                 std::string_view name);
  [[nodiscard]] Result<std::vector<OwnedResource>> listResources(
      std::optional<std::string_view> sandbox_id = std::nullopt);

  // Events (append-only).
  /// Appends an event; returns its id. id and ts of `event` are ignored.
  [[nodiscard]] Result<int64_t> appendEvent(const Event& event);
  [[nodiscard]] Result<std::vector<Event>> listEvents(const EventFilter& filter = {});

 private:
  Store(Db db, SubnetPool pool) : db_(std::move(db)), pool_(pool) {}

  template <class F>
  auto inWriteTransaction(F&& fn) -> decltype(fn());

  Db db_;
  SubnetPool pool_;
};

}  // namespace matchlock::state
