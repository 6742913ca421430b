// SPDX-License-Identifier: Apache-2.0
#include "state/store.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <ctime>
#include <thread>
#include <utility>
#include <variant>

#include <nlohmann/json.hpp>

#include "common/paths.h"

namespace matchlock::state {
namespace {

using Json = nlohmann::json;

template <class E, size_t N>
std::string_view enumName(const std::array<std::pair<E, std::string_view>, N>& table, E value) {
  for (const auto& [e, name] : table) {
    if (e == value) {
      return name;
    }
  }
  return "unknown";
}

template <class E, size_t N>
Result<E> enumParse(const std::array<std::pair<E, std::string_view>, N>& table,
                    std::string_view name, std::string_view what) {
  for (const auto& [e, n] : table) {
    if (n == name) {
      return e;
    }
  }
  return makeError(Errc::Internal, fmt::format("unknown {} '{}' in state DB", what, name));
}

constexpr std::array<std::pair<SandboxStatus, std::string_view>, 7> kSandboxStatuses{{
    {SandboxStatus::Pending, "pending"},
    {SandboxStatus::Creating, "creating"},
    {SandboxStatus::Running, "running"},
    {SandboxStatus::Stopped, "stopped"},
    {SandboxStatus::Crashed, "crashed"},
    {SandboxStatus::Failed, "failed"},
    {SandboxStatus::Removing, "removing"},
}};

constexpr std::array<std::pair<VmStatus, std::string_view>, 7> kVmStatuses{{
    {VmStatus::Creating, "creating"},
    {VmStatus::Starting, "starting"},
    {VmStatus::Running, "running"},
    {VmStatus::Stopping, "stopping"},
    {VmStatus::Stopped, "stopped"},
    {VmStatus::Crashed, "crashed"},
    {VmStatus::Failed, "failed"},
}};

constexpr std::array<std::pair<ResourceKind, std::string_view>, 7> kResourceKinds{{
    {ResourceKind::Tap, "tap"},
    {ResourceKind::NftTable, "nft_table"},
    {ResourceKind::Disk, "disk"},
    {ResourceKind::RunDir, "run_dir"},
    {ResourceKind::Process, "process"},
    {ResourceKind::Netns, "netns"},
    {ResourceKind::Socket, "socket"},
}};

constexpr std::array<std::pair<ResourceState, std::string_view>, 3> kResourceStates{{
    {ResourceState::Intent, "intent"},
    {ResourceState::Created, "created"},
    {ResourceState::Deleting, "deleting"},
}};

constexpr int kWriteAttempts = 5;
constexpr auto kRetryBackoff = std::chrono::milliseconds(25);

/// RFC 3339 UTC with milliseconds, the format of every timestamp column.
std::string nowTimestamp() {
  const auto now = std::chrono::system_clock::now();
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  const auto secs = static_cast<time_t>(ms / 1000);
  struct tm tm {};
  gmtime_r(&secs, &tm);
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms % 1000);
}

bool isJson(std::string_view text) {
  return Json::accept(text.begin(), text.end());
}

Status requireJson(std::string_view text, std::string_view what) {
  if (!isJson(text)) {
    return makeError(Errc::InvalidSpec, fmt::format("{} is not valid JSON", what));
  }
  return ok();
}

Status requireNonEmpty(std::string_view value, std::string_view what) {
  if (value.empty()) {
    return makeError(Errc::InvalidSpec, fmt::format("{} must not be empty", what));
  }
  return ok();
}

std::string encodeGroupHashes(const std::map<std::string, std::string>& hashes) {
  Json object = Json::object();
  for (const auto& [group, hash] : hashes) {
    object[group] = hash;
  }
  return object.dump(-1, ' ', false, Json::error_handler_t::replace);
}

Result<std::map<std::string, std::string>> decodeGroupHashes(std::string_view text) {
  Json object = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (object.is_discarded() || !object.is_object()) {
    return makeError(Errc::Internal, "sandboxes.group_hashes is not a JSON object");
  }
  std::map<std::string, std::string> out;
  for (const auto& item : object.items()) {
    if (!item.value().is_string()) {
      return makeError(Errc::Internal,
                       fmt::format("sandboxes.group_hashes[{}] is not a string", item.key()));
    }
    out.emplace(item.key(), item.value().get_ref<const std::string&>());
  }
  return out;
}

std::optional<ProcessRef> readProcessRef(const Statement& stmt, int pid_col, int start_col) {
  if (stmt.columnIsNull(pid_col) || stmt.columnIsNull(start_col)) {
    return std::nullopt;
  }
  return ProcessRef{static_cast<pid_t>(stmt.columnInt64(pid_col)),
                    static_cast<uint64_t>(stmt.columnInt64(start_col))};
}

std::optional<int64_t> pidOf(const std::optional<ProcessRef>& ref) {
  if (!ref.has_value()) {
    return std::nullopt;
  }
  return static_cast<int64_t>(ref->pid);
}

std::optional<int64_t> startTimeOf(const std::optional<ProcessRef>& ref) {
  if (!ref.has_value()) {
    return std::nullopt;
  }
  return static_cast<int64_t>(ref->start_time);
}

Status validateProcessRef(const std::optional<ProcessRef>& ref) {
  if (ref.has_value() && (ref->pid <= 0 || ref->start_time > uint64_t{INT64_MAX})) {
    return makeError(Errc::InvalidSpec, fmt::format("invalid process reference pid {}", ref->pid));
  }
  return ok();
}

// ---- Sandboxes --------------------------------------------------------------------------------

constexpr std::string_view kSandboxColumns =
    "id, project, name, source_file, spec_json, spec_hash, group_hashes, secrets_hash, status, "
    "generation, supervisor_pid, supervisor_start_time, last_error, created_at, updated_at, "
    "image_digest, health, health_detail";

Result<SandboxRecord> readSandbox(const Statement& stmt) {
  SandboxRecord r;
  r.id = stmt.columnText(0);
  r.project = stmt.columnText(1);
  r.name = stmt.columnText(2);
  r.source_file = stmt.columnOptText(3);
  r.spec_json = stmt.columnText(4);
  r.spec_hash = stmt.columnText(5);
  ML_ASSIGN_OR_RETURN(r.group_hashes, decodeGroupHashes(stmt.columnText(6)));
  r.secrets_hash = stmt.columnOptText(7);
  ML_ASSIGN_OR_RETURN(r.status, parseSandboxStatus(stmt.columnText(8)));
  r.generation = stmt.columnInt64(9);
  r.supervisor = readProcessRef(stmt, 10, 11);
  r.last_error = stmt.columnOptText(12);
  r.created_at = stmt.columnText(13);
  r.updated_at = stmt.columnText(14);
  r.image_digest = stmt.columnOptText(15);
  r.health = stmt.columnOptText(16);
  r.health_detail = stmt.columnOptText(17);
  return r;
}

Result<std::optional<SandboxRecord>> querySandbox(Db& db, std::string_view id) {
  ML_ASSIGN_OR_RETURN(
      Statement stmt,
      db.prepare(fmt::format("SELECT {} FROM sandboxes WHERE id = ?1", kSandboxColumns)));
  ML_RETURN_IF_ERROR(stmt.bindText(1, id));
  ML_ASSIGN_OR_RETURN(bool row, stmt.step());
  if (!row) {
    return std::optional<SandboxRecord>();
  }
  ML_ASSIGN_OR_RETURN(SandboxRecord record, readSandbox(stmt));
  return std::optional<SandboxRecord>(std::move(record));
}

Status requireSandbox(Db& db, std::string_view id) {
  ML_ASSIGN_OR_RETURN(Statement stmt, db.prepare("SELECT 1 FROM sandboxes WHERE id = ?1"));
  ML_RETURN_IF_ERROR(stmt.bindText(1, id));
  ML_ASSIGN_OR_RETURN(bool row, stmt.step());
  if (!row) {
    return makeError(Errc::NotFound, fmt::format("sandbox '{}' not found", id));
  }
  return ok();
}

// ---- VMs --------------------------------------------------------------------------------------

constexpr std::string_view kVmColumns =
    "id, sandbox_id, backend, pid, start_time, status, created_at, updated_at";

Result<VmRecord> readVm(const Statement& stmt) {
  VmRecord vm;
  vm.id = stmt.columnText(0);
  vm.sandbox_id = stmt.columnText(1);
  vm.backend = stmt.columnText(2);
  vm.process = readProcessRef(stmt, 3, 4);
  ML_ASSIGN_OR_RETURN(vm.status, parseVmStatus(stmt.columnText(5)));
  vm.created_at = stmt.columnText(6);
  vm.updated_at = stmt.columnText(7);
  return vm;
}

// ---- Subnets ----------------------------------------------------------------------------------

Result<std::optional<SubnetAllocation>> querySubnet(Db& db, std::string_view sandbox_id) {
  ML_ASSIGN_OR_RETURN(
      Statement stmt,
      db.prepare("SELECT idx, cidr, gateway, guest_ip FROM subnets WHERE sandbox_id = ?1"));
  ML_RETURN_IF_ERROR(stmt.bindText(1, sandbox_id));
  ML_ASSIGN_OR_RETURN(bool row, stmt.step());
  if (!row) {
    return std::optional<SubnetAllocation>();
  }
  return std::optional<SubnetAllocation>(SubnetAllocation{stmt.columnInt64(0), stmt.columnText(1),
                                                          stmt.columnText(2), stmt.columnText(3)});
}

// The lowest index not in use: 0 if free, else the smallest idx+1 that has no row. The UNIQUE index
// on idx makes both probes index lookups.
constexpr std::string_view kLowestFreeIndex = R"sql(
SELECT CASE
  WHEN NOT EXISTS (SELECT 1 FROM subnets WHERE idx = 0) THEN 0
  ELSE (SELECT s.idx + 1 FROM subnets AS s
        WHERE NOT EXISTS (SELECT 1 FROM subnets AS t WHERE t.idx = s.idx + 1)
        ORDER BY s.idx LIMIT 1)
END
)sql";

// ---- Owned resources --------------------------------------------------------------------------

constexpr std::string_view kResourceColumns =
    "id, sandbox_id, kind, name, state, detail, created_at, updated_at";

Result<OwnedResource> readResource(const Statement& stmt) {
  OwnedResource r;
  r.id = stmt.columnInt64(0);
  r.sandbox_id = stmt.columnText(1);
  ML_ASSIGN_OR_RETURN(r.kind, parseResourceKind(stmt.columnText(2)));
  r.name = stmt.columnText(3);
  ML_ASSIGN_OR_RETURN(r.state, parseResourceState(stmt.columnText(4)));
  r.detail_json = stmt.columnText(5);
  r.created_at = stmt.columnText(6);
  r.updated_at = stmt.columnText(7);
  return r;
}

Result<std::optional<OwnedResource>> queryResource(Db& db, ResourceKind kind,
                                                   std::string_view name) {
  ML_ASSIGN_OR_RETURN(
      Statement stmt,
      db.prepare(fmt::format("SELECT {} FROM owned_resources WHERE kind = ?1 AND name = ?2",
                             kResourceColumns)));
  ML_RETURN_IF_ERROR(stmt.bindAll(resourceKindName(kind), name));
  ML_ASSIGN_OR_RETURN(bool row, stmt.step());
  if (!row) {
    return std::optional<OwnedResource>();
  }
  ML_ASSIGN_OR_RETURN(OwnedResource resource, readResource(stmt));
  return std::optional<OwnedResource>(std::move(resource));
}

Error resourceNotFound(ResourceKind kind, std::string_view name) {
  return {Errc::NotFound, fmt::format("no owned resource {} '{}'", resourceKindName(kind), name)};
}

// ---- Events -----------------------------------------------------------------------------------

constexpr std::string_view kEventColumns = "id, ts, project, sandbox_id, kind, message, data";

Event readEvent(const Statement& stmt) {
  Event e;
  e.id = stmt.columnInt64(0);
  e.ts = stmt.columnText(1);
  e.project = stmt.columnOptText(2);
  e.sandbox_id = stmt.columnOptText(3);
  e.kind = stmt.columnText(4);
  e.message = stmt.columnText(5);
  e.data_json = stmt.columnText(6);
  return e;
}

}  // namespace

// ---- Enum names -------------------------------------------------------------------------------

std::string_view sandboxStatusName(SandboxStatus status) {
  return enumName(kSandboxStatuses, status);
}
Result<SandboxStatus> parseSandboxStatus(std::string_view name) {
  return enumParse(kSandboxStatuses, name, "sandbox status");
}
std::string_view vmStatusName(VmStatus status) {
  return enumName(kVmStatuses, status);
}
Result<VmStatus> parseVmStatus(std::string_view name) {
  return enumParse(kVmStatuses, name, "vm status");
}
std::string_view resourceKindName(ResourceKind kind) {
  return enumName(kResourceKinds, kind);
}
Result<ResourceKind> parseResourceKind(std::string_view name) {
  return enumParse(kResourceKinds, name, "resource kind");
}
std::string_view resourceStateName(ResourceState state) {
  return enumName(kResourceStates, state);
}
Result<ResourceState> parseResourceState(std::string_view name) {
  return enumParse(kResourceStates, name, "resource state");
}

// ---- Store: open ------------------------------------------------------------------------------

template <class F>
auto Store::inWriteTransaction(F&& fn) -> decltype(fn()) {
  for (int attempt = 1;; ++attempt) {
    auto result = [&]() -> decltype(fn()) {
      ML_ASSIGN_OR_RETURN(Transaction txn, Transaction::begin(db_));
      auto value = fn();
      if (!value.has_value()) {
        return value;
      }
      ML_RETURN_IF_ERROR(txn.commit());
      return value;
    }();
    // Unavailable means the DB stayed locked past the busy timeout (or SQLite detected a deadlock
    // and refused to wait); the whole unit of work is retried a bounded number of times. `fn`
    // must therefore not report its own conditions as Unavailable (see allocateSubnet).
    if (result.has_value() || result.error().code() != Errc::Unavailable ||
        attempt == kWriteAttempts) {
      return result;
    }
    std::this_thread::sleep_for(kRetryBackoff * attempt + std::chrono::milliseconds(getpid() % 16));
  }
}

Result<Store> Store::open(const std::string& path, StoreOptions options) {
  SubnetPool pool = SubnetPool::defaultPool();
  if (options.subnet_pool.has_value()) {
    pool = *options.subnet_pool;
  } else {
    ML_ASSIGN_OR_RETURN(pool, SubnetPool::fromEnv());
  }
  std::vector<Migration> migrations;
  if (options.migrations.has_value()) {
    migrations = std::move(*options.migrations);
  } else {
    ML_ASSIGN_OR_RETURN(migrations, embeddedMigrations());
  }

  std::optional<InitLock> lock;
  if (path != kMemoryPath) {
    // Create the file ourselves so it gets 0600; SQLite gives -wal and -shm the same mode.
    ML_ASSIGN_OR_RETURN(Fd created, openFile(path, O_RDWR | O_CREAT | O_NOFOLLOW, 0600));
    ML_ASSIGN_OR_RETURN(lock, InitLock::acquire(path));
  }
  ML_ASSIGN_OR_RETURN(Db db, Db::open(path));
  Status migrated = migrate(db, migrations);
  if (!migrated.has_value()) {
    return makeError(std::move(migrated).error().withContext(fmt::format("state DB {}", path)));
  }
  return Store(std::move(db), pool);
}

Result<std::string> Store::defaultPath() {
  ML_ASSIGN_OR_RETURN(std::string home, matchlockHome());
  return home + "/state.db";
}

Result<Store> Store::openDefault(StoreOptions options) {
  ML_ASSIGN_OR_RETURN(std::string home, matchlockHome());
  ML_RETURN_IF_ERROR(makeDirs(home, 0700));
  return open(home + "/state.db", std::move(options));
}

// ---- Projects ---------------------------------------------------------------------------------

Status Store::upsertProject(std::string_view name) {
  ML_RETURN_IF_ERROR(requireNonEmpty(name, "project name"));
  return inWriteTransaction([&]() -> Status {
    ML_ASSIGN_OR_RETURN(
        Statement stmt,
        db_.prepare("INSERT INTO projects (name, created_at, updated_at) "
                    "VALUES (?1, ?2, ?2) "
                    "ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at"));
    ML_RETURN_IF_ERROR(stmt.bindAll(name, nowTimestamp()));
    return stmt.run();
  });
}

Result<bool> Store::deleteProjectIfEmpty(std::string_view name) {
  return inWriteTransaction([&]() -> Result<bool> {
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("DELETE FROM projects WHERE name = ?1 AND NOT EXISTS "
                                    "(SELECT 1 FROM sandboxes WHERE project = ?1) RETURNING name"));
    ML_RETURN_IF_ERROR(stmt.bindAll(name));
    ML_ASSIGN_OR_RETURN(bool row, stmt.step());
    if (row) {
      ML_RETURN_IF_ERROR(stmt.run());
    }
    return row;
  });
}

Result<std::vector<ProjectRecord>> Store::listProjects() {
  ML_ASSIGN_OR_RETURN(
      Statement stmt,
      db_.prepare("SELECT name, created_at, updated_at FROM projects ORDER BY name"));
  std::vector<ProjectRecord> out;
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, stmt.step());
    if (!row) {
      return out;
    }
    out.push_back({stmt.columnText(0), stmt.columnText(1), stmt.columnText(2)});
  }
}

// ---- Sandboxes --------------------------------------------------------------------------------

Result<SandboxRecord> Store::createSandbox(const SandboxRecord& record) {
  ML_RETURN_IF_ERROR(requireNonEmpty(record.id, "sandbox id"));
  ML_RETURN_IF_ERROR(requireNonEmpty(record.project, "sandbox project"));
  ML_RETURN_IF_ERROR(requireNonEmpty(record.name, "sandbox name"));
  ML_RETURN_IF_ERROR(requireJson(record.spec_json, "sandbox spec"));
  ML_RETURN_IF_ERROR(validateProcessRef(record.supervisor));
  auto result = inWriteTransaction([&]() -> Result<SandboxRecord> {
    const std::string now = nowTimestamp();
    {
      ML_ASSIGN_OR_RETURN(Statement project,
                          db_.prepare("INSERT INTO projects (name, created_at, updated_at) "
                                      "VALUES (?1, ?2, ?2) ON CONFLICT (name) DO NOTHING"));
      ML_RETURN_IF_ERROR(project.bindAll(record.project, now));
      ML_RETURN_IF_ERROR(project.run());
    }
    ML_ASSIGN_OR_RETURN(
        Statement stmt,
        db_.prepare(fmt::format(
            "INSERT INTO sandboxes ({}) VALUES "
            "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?10, ?11, ?12, ?13, ?13, ?14, ?15, ?16)",
            kSandboxColumns)));
    ML_RETURN_IF_ERROR(stmt.bindAll(
        record.id, record.project, record.name, record.source_file, record.spec_json,
        record.spec_hash, encodeGroupHashes(record.group_hashes), record.secrets_hash,
        sandboxStatusName(record.status), pidOf(record.supervisor), startTimeOf(record.supervisor),
        record.last_error, now, record.image_digest, record.health, record.health_detail));
    ML_RETURN_IF_ERROR(stmt.run());
    ML_ASSIGN_OR_RETURN(auto stored, querySandbox(db_, record.id));
    if (!stored.has_value()) {
      return makeError(Errc::Internal, "inserted sandbox row vanished");
    }
    return std::move(*stored);
  });
  if (!result.has_value()) {
    return makeError(std::move(result).error().withContext(
        fmt::format("creating sandbox '{}/{}' ({})", record.project, record.name, record.id)));
  }
  return result;
}

Result<SandboxRecord> Store::getSandbox(std::string_view id) {
  ML_ASSIGN_OR_RETURN(auto record, querySandbox(db_, id));
  if (!record.has_value()) {
    return makeError(Errc::NotFound, fmt::format("sandbox '{}' not found", id));
  }
  return std::move(*record);
}

Result<std::optional<SandboxRecord>> Store::findSandbox(std::string_view project,
                                                        std::string_view name) {
  ML_ASSIGN_OR_RETURN(
      Statement stmt,
      db_.prepare(fmt::format("SELECT {} FROM sandboxes WHERE project = ?1 AND name = ?2",
                              kSandboxColumns)));
  ML_RETURN_IF_ERROR(stmt.bindAll(project, name));
  ML_ASSIGN_OR_RETURN(bool row, stmt.step());
  if (!row) {
    return std::optional<SandboxRecord>();
  }
  ML_ASSIGN_OR_RETURN(SandboxRecord record, readSandbox(stmt));
  return std::optional<SandboxRecord>(std::move(record));
}

Result<std::vector<SandboxRecord>> Store::listSandboxes(std::optional<std::string_view> project) {
  ML_ASSIGN_OR_RETURN(Statement stmt, db_.prepare(fmt::format("SELECT {} FROM sandboxes "
                                                              "WHERE ?1 IS NULL OR project = ?1 "
                                                              "ORDER BY project, name",
                                                              kSandboxColumns)));
  ML_RETURN_IF_ERROR(stmt.bind(1, project));
  std::vector<SandboxRecord> out;
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, stmt.step());
    if (!row) {
      return out;
    }
    ML_ASSIGN_OR_RETURN(SandboxRecord record, readSandbox(stmt));
    out.push_back(std::move(record));
  }
}

Result<int64_t> Store::updateSandboxSpec(std::string_view id, const SandboxSpecUpdate& update) {
  ML_RETURN_IF_ERROR(requireJson(update.spec_json, "sandbox spec"));
  return inWriteTransaction([&]() -> Result<int64_t> {
    ML_ASSIGN_OR_RETURN(
        Statement stmt,
        db_.prepare("UPDATE sandboxes SET source_file = ?2, spec_json = ?3, spec_hash = ?4, "
                    "group_hashes = ?5, secrets_hash = ?6, generation = generation + 1, "
                    "updated_at = ?7, image_digest = ?8 WHERE id = ?1 RETURNING generation"));
    ML_RETURN_IF_ERROR(stmt.bindAll(id, update.source_file, update.spec_json, update.spec_hash,
                                    encodeGroupHashes(update.group_hashes), update.secrets_hash,
                                    nowTimestamp(), update.image_digest));
    ML_ASSIGN_OR_RETURN(bool row, stmt.step());
    if (!row) {
      return makeError(Errc::NotFound, fmt::format("sandbox '{}' not found", id));
    }
    const int64_t generation = stmt.columnInt64(0);
    ML_RETURN_IF_ERROR(stmt.run());
    return generation;
  });
}

Status Store::updateSandboxStatus(std::string_view id, SandboxStatus status,
                                  std::optional<std::string_view> last_error) {
  return inWriteTransaction([&]() -> Status {
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("UPDATE sandboxes SET status = ?2, last_error = ?3, "
                                    "updated_at = ?4 WHERE id = ?1"));
    ML_RETURN_IF_ERROR(stmt.bindAll(id, sandboxStatusName(status), last_error, nowTimestamp()));
    ML_RETURN_IF_ERROR(stmt.run());
    if (db_.changes() == 0) {
      return makeError(Errc::NotFound, fmt::format("sandbox '{}' not found", id));
    }
    return ok();
  });
}

Status Store::updateSandboxHealth(std::string_view id, std::optional<std::string_view> health,
                                  std::optional<std::string_view> detail) {
  return inWriteTransaction([&]() -> Status {
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("UPDATE sandboxes SET health = ?2, health_detail = ?3, "
                                    "updated_at = ?4 WHERE id = ?1"));
    ML_RETURN_IF_ERROR(stmt.bindAll(id, health, detail, nowTimestamp()));
    ML_RETURN_IF_ERROR(stmt.run());
    if (db_.changes() == 0) {
      return makeError(Errc::NotFound, fmt::format("sandbox '{}' not found", id));
    }
    return ok();
  });
}

Status Store::setSupervisor(std::string_view id, std::optional<ProcessRef> supervisor) {
  ML_RETURN_IF_ERROR(validateProcessRef(supervisor));
  return inWriteTransaction([&]() -> Status {
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("UPDATE sandboxes SET supervisor_pid = ?2, "
                                    "supervisor_start_time = ?3, updated_at = ?4 WHERE id = ?1"));
    ML_RETURN_IF_ERROR(
        stmt.bindAll(id, pidOf(supervisor), startTimeOf(supervisor), nowTimestamp()));
    ML_RETURN_IF_ERROR(stmt.run());
    if (db_.changes() == 0) {
      return makeError(Errc::NotFound, fmt::format("sandbox '{}' not found", id));
    }
    return ok();
  });
}

Result<int64_t> Store::deleteSandbox(std::string_view id, DeleteMode mode) {
  return inWriteTransaction([&]() -> Result<int64_t> {
    ML_RETURN_IF_ERROR(requireSandbox(db_, id));
    if (mode == DeleteMode::RefuseIfResources) {
      ML_ASSIGN_OR_RETURN(Statement owned,
                          db_.prepare("SELECT kind, name, state FROM owned_resources "
                                      "WHERE sandbox_id = ?1 ORDER BY id"));
      ML_RETURN_IF_ERROR(owned.bindText(1, id));
      std::vector<std::string> names;
      for (;;) {
        ML_ASSIGN_OR_RETURN(bool row, owned.step());
        if (!row) {
          break;
        }
        names.push_back(fmt::format("{} '{}' ({})", owned.columnText(0), owned.columnText(1),
                                    owned.columnText(2)));
      }
      if (!names.empty()) {
        Error error(Errc::Conflict,
                    fmt::format("sandbox '{}' still owns {} resource(s); tear them down first", id,
                                names.size()));
        for (auto& name : names) {
          error.addDetail(std::move(name));
        }
        return makeError(std::move(error));
      }
    }
    int64_t deleted = 0;
    // Children first and explicitly: changes() does not count cascaded rows.
    for (std::string_view table : {"owned_resources", "subnets", "vms", "sandboxes"}) {
      const std::string_view column = table == "sandboxes" ? "id" : "sandbox_id";
      ML_ASSIGN_OR_RETURN(Statement stmt,
                          db_.prepare(fmt::format("DELETE FROM {} WHERE {} = ?1", table, column)));
      ML_RETURN_IF_ERROR(stmt.bindText(1, id));
      ML_RETURN_IF_ERROR(stmt.run());
      deleted += db_.changes();
    }
    return deleted;
  });
}

// ---- VMs --------------------------------------------------------------------------------------

Status Store::upsertVm(const VmRecord& vm) {
  ML_RETURN_IF_ERROR(requireNonEmpty(vm.id, "vm id"));
  ML_RETURN_IF_ERROR(requireNonEmpty(vm.backend, "vm backend"));
  ML_RETURN_IF_ERROR(validateProcessRef(vm.process));
  return inWriteTransaction([&]() -> Status {
    ML_RETURN_IF_ERROR(requireSandbox(db_, vm.sandbox_id));
    ML_ASSIGN_OR_RETURN(
        Statement stmt,
        db_.prepare(fmt::format(
            "INSERT INTO vms ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7) "
            "ON CONFLICT (id) DO UPDATE SET sandbox_id = excluded.sandbox_id, "
            "backend = excluded.backend, pid = excluded.pid, start_time = excluded.start_time, "
            "status = excluded.status, updated_at = excluded.updated_at",
            kVmColumns)));
    ML_RETURN_IF_ERROR(stmt.bindAll(vm.id, vm.sandbox_id, vm.backend, pidOf(vm.process),
                                    startTimeOf(vm.process), vmStatusName(vm.status),
                                    nowTimestamp()));
    return stmt.run();
  });
}

Result<VmRecord> Store::getVm(std::string_view id) {
  ML_ASSIGN_OR_RETURN(Statement stmt,
                      db_.prepare(fmt::format("SELECT {} FROM vms WHERE id = ?1", kVmColumns)));
  ML_RETURN_IF_ERROR(stmt.bindText(1, id));
  ML_ASSIGN_OR_RETURN(bool row, stmt.step());
  if (!row) {
    return makeError(Errc::NotFound, fmt::format("vm '{}' not found", id));
  }
  return readVm(stmt);
}

Result<std::vector<VmRecord>> Store::listVms(std::optional<std::string_view> sandbox_id) {
  ML_ASSIGN_OR_RETURN(Statement stmt, db_.prepare(fmt::format("SELECT {} FROM vms "
                                                              "WHERE ?1 IS NULL OR sandbox_id = ?1 "
                                                              "ORDER BY created_at, id",
                                                              kVmColumns)));
  ML_RETURN_IF_ERROR(stmt.bind(1, sandbox_id));
  std::vector<VmRecord> out;
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, stmt.step());
    if (!row) {
      return out;
    }
    ML_ASSIGN_OR_RETURN(VmRecord vm, readVm(stmt));
    out.push_back(std::move(vm));
  }
}

Status Store::updateVmStatus(std::string_view id, VmStatus status,
                             std::optional<ProcessRef> process) {
  ML_RETURN_IF_ERROR(validateProcessRef(process));
  return inWriteTransaction([&]() -> Status {
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("UPDATE vms SET status = ?2, pid = ?3, start_time = ?4, "
                                    "updated_at = ?5 WHERE id = ?1"));
    ML_RETURN_IF_ERROR(stmt.bindAll(id, vmStatusName(status), pidOf(process), startTimeOf(process),
                                    nowTimestamp()));
    ML_RETURN_IF_ERROR(stmt.run());
    if (db_.changes() == 0) {
      return makeError(Errc::NotFound, fmt::format("vm '{}' not found", id));
    }
    return ok();
  });
}

Result<bool> Store::deleteVm(std::string_view id) {
  return inWriteTransaction([&]() -> Result<bool> {
    ML_ASSIGN_OR_RETURN(Statement stmt, db_.prepare("DELETE FROM vms WHERE id = ?1"));
    ML_RETURN_IF_ERROR(stmt.bindText(1, id));
    ML_RETURN_IF_ERROR(stmt.run());
    return db_.changes() > 0;
  });
}

// ---- Subnets ----------------------------------------------------------------------------------

Result<SubnetAllocation> Store::allocateSubnet(std::string_view sandbox_id) {
  // BEGIN IMMEDIATE serializes allocators across processes: the read of the used indexes and the
  // insert happen under one write lock, so two allocators can never pick the same index. The
  // UNIQUE constraints on idx and cidr are the safety net behind that. An exhausted pool comes
  // back as nullopt so that it is not mistaken for a busy DB and retried.
  ML_ASSIGN_OR_RETURN(
      std::optional<SubnetAllocation> allocated,
      inWriteTransaction([&]() -> Result<std::optional<SubnetAllocation>> {
        ML_ASSIGN_OR_RETURN(auto existing, querySubnet(db_, sandbox_id));
        if (existing.has_value()) {
          return existing;
        }
        ML_RETURN_IF_ERROR(requireSandbox(db_, sandbox_id));
        ML_ASSIGN_OR_RETURN(int64_t index, db_.queryInt64(kLowestFreeIndex));
        if (index >= pool_.size()) {
          return std::optional<SubnetAllocation>();
        }
        ML_ASSIGN_OR_RETURN(SubnetAllocation allocation, pool_.at(index));
        ML_ASSIGN_OR_RETURN(Statement stmt,
                            db_.prepare("INSERT INTO subnets (sandbox_id, idx, cidr, gateway, "
                                        "guest_ip, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"));
        ML_RETURN_IF_ERROR(stmt.bindAll(sandbox_id, allocation.index, allocation.cidr,
                                        allocation.gateway, allocation.guest_ip, nowTimestamp()));
        ML_RETURN_IF_ERROR(stmt.run());
        return std::optional<SubnetAllocation>(std::move(allocation));
      }));
  if (!allocated.has_value()) {
    return makeError(Errc::Unavailable,
                     fmt::format("no free subnet in pool {} (all {} subnets are allocated)",
                                 pool_.toString(), pool_.size()));
  }
  return std::move(*allocated);
}

Result<std::optional<SubnetAllocation>> Store::getSubnet(std::string_view sandbox_id) {
  return querySubnet(db_, sandbox_id);
}

Result<std::vector<SubnetRecord>> Store::listSubnets() {
  ML_ASSIGN_OR_RETURN(Statement stmt,
                      db_.prepare("SELECT sandbox_id, idx, cidr, gateway, guest_ip, created_at "
                                  "FROM subnets ORDER BY idx"));
  std::vector<SubnetRecord> out;
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, stmt.step());
    if (!row) {
      return out;
    }
    out.push_back(SubnetRecord{
        stmt.columnText(0),
        {stmt.columnInt64(1), stmt.columnText(2), stmt.columnText(3), stmt.columnText(4)},
        stmt.columnText(5)});
  }
}

Result<bool> Store::releaseSubnet(std::string_view sandbox_id) {
  return inWriteTransaction([&]() -> Result<bool> {
    ML_ASSIGN_OR_RETURN(Statement stmt, db_.prepare("DELETE FROM subnets WHERE sandbox_id = ?1"));
    ML_RETURN_IF_ERROR(stmt.bindText(1, sandbox_id));
    ML_RETURN_IF_ERROR(stmt.run());
    return db_.changes() > 0;
  });
}

// ---- Owned resources --------------------------------------------------------------------------

Result<OwnedResource> Store::recordResourceIntent(std::string_view sandbox_id, ResourceKind kind,
                                                  std::string_view name,
                                                  std::string_view detail_json) {
  ML_RETURN_IF_ERROR(requireNonEmpty(name, "resource name"));
  ML_RETURN_IF_ERROR(requireJson(detail_json, "resource detail"));
  return inWriteTransaction([&]() -> Result<OwnedResource> {
    ML_ASSIGN_OR_RETURN(auto existing, queryResource(db_, kind, name));
    if (existing.has_value()) {
      if (existing->sandbox_id != sandbox_id) {
        return makeError(Errc::Conflict,
                         fmt::format("{} '{}' is already owned by sandbox '{}'",
                                     resourceKindName(kind), name, existing->sandbox_id));
      }
      return std::move(*existing);
    }
    ML_RETURN_IF_ERROR(requireSandbox(db_, sandbox_id));
    ML_ASSIGN_OR_RETURN(
        Statement stmt,
        db_.prepare("INSERT INTO owned_resources (sandbox_id, kind, name, state, detail, "
                    "created_at, updated_at) VALUES (?1, ?2, ?3, 'intent', ?4, ?5, ?5)"));
    ML_RETURN_IF_ERROR(
        stmt.bindAll(sandbox_id, resourceKindName(kind), name, detail_json, nowTimestamp()));
    ML_RETURN_IF_ERROR(stmt.run());
    ML_ASSIGN_OR_RETURN(auto stored, queryResource(db_, kind, name));
    if (!stored.has_value()) {
      return makeError(Errc::Internal, "inserted resource row vanished");
    }
    return std::move(*stored);
  });
}

Status Store::markResourceCreated(ResourceKind kind, std::string_view name,
                                  std::optional<std::string_view> detail_json) {
  if (detail_json.has_value()) {
    ML_RETURN_IF_ERROR(requireJson(*detail_json, "resource detail"));
  }
  return inWriteTransaction([&]() -> Status {
    ML_ASSIGN_OR_RETURN(auto existing, queryResource(db_, kind, name));
    if (!existing.has_value()) {
      return makeError(resourceNotFound(kind, name));
    }
    if (existing->state == ResourceState::Deleting) {
      return makeError(Errc::Conflict,
                       fmt::format("{} '{}' is being deleted", resourceKindName(kind), name));
    }
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("UPDATE owned_resources SET state = 'created', "
                                    "detail = coalesce(?3, detail), updated_at = ?4 "
                                    "WHERE kind = ?1 AND name = ?2"));
    ML_RETURN_IF_ERROR(stmt.bindAll(resourceKindName(kind), name, detail_json, nowTimestamp()));
    return stmt.run();
  });
}

Status Store::markResourceDeleting(ResourceKind kind, std::string_view name) {
  return inWriteTransaction([&]() -> Status {
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("UPDATE owned_resources SET state = 'deleting', "
                                    "updated_at = ?3 WHERE kind = ?1 AND name = ?2"));
    ML_RETURN_IF_ERROR(stmt.bindAll(resourceKindName(kind), name, nowTimestamp()));
    ML_RETURN_IF_ERROR(stmt.run());
    if (db_.changes() == 0) {
      return makeError(resourceNotFound(kind, name));
    }
    return ok();
  });
}

Result<bool> Store::deleteResource(ResourceKind kind, std::string_view name) {
  return inWriteTransaction([&]() -> Result<bool> {
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("DELETE FROM owned_resources WHERE kind = ?1 AND name = ?2"));
    ML_RETURN_IF_ERROR(stmt.bindAll(resourceKindName(kind), name));
    ML_RETURN_IF_ERROR(stmt.run());
    return db_.changes() > 0;
  });
}

Result<std::optional<OwnedResource>> Store::getResource(ResourceKind kind, std::string_view name) {
  return queryResource(db_, kind, name);
}

Result<std::vector<OwnedResource>> Store::listResources(
    std::optional<std::string_view> sandbox_id) {
  ML_ASSIGN_OR_RETURN(Statement stmt,
                      db_.prepare(fmt::format("SELECT {} FROM owned_resources "
                                              "WHERE ?1 IS NULL OR sandbox_id = ?1 ORDER BY id",
                                              kResourceColumns)));
  ML_RETURN_IF_ERROR(stmt.bind(1, sandbox_id));
  std::vector<OwnedResource> out;
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, stmt.step());
    if (!row) {
      return out;
    }
    ML_ASSIGN_OR_RETURN(OwnedResource resource, readResource(stmt));
    out.push_back(std::move(resource));
  }
}

// ---- Events -----------------------------------------------------------------------------------

Result<int64_t> Store::appendEvent(const Event& event) {
  ML_RETURN_IF_ERROR(requireNonEmpty(event.kind, "event kind"));
  ML_RETURN_IF_ERROR(requireJson(event.data_json, "event data"));
  return inWriteTransaction([&]() -> Result<int64_t> {
    ML_ASSIGN_OR_RETURN(Statement stmt,
                        db_.prepare("INSERT INTO events (ts, project, sandbox_id, kind, message, "
                                    "data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"));
    ML_RETURN_IF_ERROR(stmt.bindAll(nowTimestamp(), event.project, event.sandbox_id, event.kind,
                                    event.message, event.data_json));
    ML_RETURN_IF_ERROR(stmt.run());
    return db_.lastInsertRowid();
  });
}

Result<std::vector<Event>> Store::listEvents(const EventFilter& filter) {
  std::vector<std::variant<int64_t, std::string>> params;
  std::string where = "1";
  auto add = [&](std::string_view clause, auto value) {
    params.emplace_back(std::move(value));
    where += fmt::format(" AND {} = ?{}", clause, params.size());
  };
  if (filter.project.has_value()) {
    add("project", *filter.project);
  }
  if (filter.sandbox_id.has_value()) {
    add("sandbox_id", *filter.sandbox_id);
  }
  if (filter.kind.has_value()) {
    add("kind", *filter.kind);
  }
  std::string sql;
  if (filter.after_id.has_value()) {
    params.emplace_back(*filter.after_id);
    where += fmt::format(" AND id > ?{}", params.size());
    params.emplace_back(filter.limit > 0 ? filter.limit : int64_t{-1});
    sql = fmt::format("SELECT {} FROM events WHERE {} ORDER BY id LIMIT ?{}", kEventColumns, where,
                      params.size());
  } else {
    params.emplace_back(filter.limit > 0 ? filter.limit : int64_t{-1});
    sql = fmt::format(
        "SELECT * FROM (SELECT {} FROM events WHERE {} ORDER BY id DESC LIMIT ?{}) ORDER BY id",
        kEventColumns, where, params.size());
  }
  ML_ASSIGN_OR_RETURN(Statement stmt, db_.prepare(sql));
  for (size_t i = 0; i < params.size(); ++i) {
    const int index = static_cast<int>(i + 1);
    ML_RETURN_IF_ERROR(
        std::visit([&](const auto& value) { return stmt.bind(index, value); }, params[i]));
  }
  std::vector<Event> out;
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, stmt.step());
    if (!row) {
      return out;
    }
    out.push_back(readEvent(stmt));
  }
}

}  // namespace matchlock::state
