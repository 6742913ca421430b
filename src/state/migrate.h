// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "state/db.h"

namespace matchlock::state {

/// One schema migration: `schema/state/NNNN_name.sql` becomes {NNNN, "name", <file text>}.
struct Migration {
  int64_t version = 0;
  std::string name;
  std::string sql;
};

/// The migrations embedded from schema/state/*.sql at build time, sorted by version.
/// Fails (Internal) only if a file name does not follow NNNN_name.sql or versions repeat, which a
/// unit test rules out for the shipped files.
[[nodiscard]] Result<std::vector<Migration>> embeddedMigrations();

/// Parses "0001_init.sql" into {1, "init"}; the SQL text is left empty.
[[nodiscard]] Result<Migration> parseMigrationName(std::string_view file_name);

/// The schema version recorded in the database (PRAGMA user_version; 0 for a fresh database).
[[nodiscard]] Result<int64_t> schemaVersion(Db& db);

struct MigrateOptions {
  /// Test seam: called before each pending migration is applied (after the backup was taken).
  std::function<void(const Migration&)> before_each_for_test;
};

/// Brings `db` up to the newest version in `migrations` (which must be sorted, with unique
/// versions > 0).
///
/// - A database whose version is newer than the newest migration is refused with Conflict.
/// - For a file database already at version > 0, a `VACUUM INTO '<db>.premigrate.bak'` copy is
///   made before anything is applied.
/// - Each migration runs in its own IMMEDIATE transaction together with its bookkeeping row in
///   schema_migrations and the new PRAGMA user_version.
/// - If a migration fails, the database is restored from the backup (undoing migrations applied
///   earlier in the same run) and the error is returned. The backup is removed afterwards, on
///   success and after a successful restore.
///
/// The caller serializes concurrent initializers (Store::open holds `<db>.init.lock`).
[[nodiscard]] Status migrate(Db& db, std::span<const Migration> migrations,
                             const MigrateOptions& options = {});

/// An exclusive flock on `<db_path>.init.lock` (created 0600, O_CLOEXEC), held until destruction.
class InitLock {
 public:
  [[nodiscard]] static Result<InitLock> acquire(const std::string& db_path);

 private:
  explicit InitLock(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;  // closing the descriptor releases the lock
};

}  // namespace matchlock::state
