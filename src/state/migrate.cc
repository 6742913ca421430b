// SPDX-License-Identifier: Apache-2.0
#include "state/migrate.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>

#include "common/log.h"
#include "ml_state_schema_embedded.h"

namespace matchlock::state {
namespace {

constexpr std::string_view kBookkeeping = R"sql(
CREATE TABLE IF NOT EXISTS schema_migrations (
  version    INTEGER NOT NULL PRIMARY KEY,
  name       TEXT NOT NULL,
  applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
)sql";

bool isNameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-';
}

std::string backupPath(const Db& db) {
  return db.path() + ".premigrate.bak";
}

// Removes a file SQLite may have created; a missing file is fine.
Status removeIfExists(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return makeError(Errc::System, fmt::format("removing {}", path), errno);
  }
  return ok();
}

Status removeBackup(const std::string& path) {
  for (const char* suffix : {"", "-journal", "-wal", "-shm"}) {
    ML_RETURN_IF_ERROR(removeIfExists(path + suffix));
  }
  return ok();
}

Status takeBackup(Db& db, const std::string& path) {
  ML_RETURN_IF_ERROR(removeBackup(path));
  {
    // VACUUM INTO accepts an existing empty file; creating it first gives it mode 0600.
    ML_ASSIGN_OR_RETURN(Fd fd, openFile(path, O_WRONLY | O_CREAT | O_EXCL, 0600));
  }
  ML_ASSIGN_OR_RETURN(Statement stmt, db.prepare("VACUUM INTO ?1"));
  ML_RETURN_IF_ERROR(stmt.bindText(1, path));
  Status status = stmt.run();
  if (!status.has_value()) {
    (void)removeBackup(path);
    return makeError(std::move(status).error().withContext(
        fmt::format("backing up state DB to {} before migrating", path)));
  }
  return ok();
}

// Copies the backup over the live database through the online backup API, which works on the open
// connection and keeps WAL bookkeeping consistent (no file juggling under other readers).
Status restoreBackup(Db& db, const std::string& path) {
  sqlite3* raw = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READONLY | SQLITE_OPEN_EXRESCODE, nullptr);
  Sqlite3Ptr src(raw);
  if (rc != SQLITE_OK) {
    return makeError(sqliteError(src.get(), rc, fmt::format("opening backup {}", path)));
  }
  sqlite3_backup* backup = sqlite3_backup_init(db.raw(), "main", src.get(), "main");
  if (backup == nullptr) {
    return makeError(sqliteError(db.raw(), sqlite3_extended_errcode(db.raw()),
                                 fmt::format("restoring from {}", path)));
  }
  rc = sqlite3_backup_step(backup, -1);
  const int finish_rc = sqlite3_backup_finish(backup);
  if (rc != SQLITE_DONE) {
    return makeError(sqliteError(db.raw(), rc, fmt::format("restoring from {}", path)));
  }
  if (finish_rc != SQLITE_OK) {
    return makeError(sqliteError(db.raw(), finish_rc, fmt::format("restoring from {}", path)));
  }
  return ok();
}

Status applyOne(Db& db, const Migration& migration) {
  ML_ASSIGN_OR_RETURN(Transaction txn, Transaction::begin(db));
  ML_RETURN_IF_ERROR(db.exec(kBookkeeping));
  ML_RETURN_IF_ERROR(db.exec(migration.sql));
  {
    // foreign_keys cannot be switched inside a transaction, so a migration that rebuilds tables
    // uses PRAGMA defer_foreign_keys; this check catches violations it leaves behind.
    ML_ASSIGN_OR_RETURN(Statement check, db.prepare("PRAGMA foreign_key_check"));
    ML_ASSIGN_OR_RETURN(bool violation, check.step());
    if (violation) {
      return makeError(Errc::Internal,
                       fmt::format("foreign key violation in table {}", check.columnText(0)));
    }
  }
  ML_ASSIGN_OR_RETURN(Statement record,
                      db.prepare("INSERT INTO schema_migrations (version, name) VALUES (?1, ?2)"));
  ML_RETURN_IF_ERROR(record.bindAll(migration.version, migration.name));
  ML_RETURN_IF_ERROR(record.run());
  ML_RETURN_IF_ERROR(db.exec(fmt::format("PRAGMA user_version = {}", migration.version)));
  return txn.commit();
}

}  // namespace

Result<Migration> parseMigrationName(std::string_view file_name) {
  auto bad = [&] {
    return makeError(Errc::Internal,
                     fmt::format("migration file name '{}' is not NNNN_name.sql", file_name));
  };
  constexpr std::string_view kSuffix = ".sql";
  if (file_name.size() <= kSuffix.size() || !file_name.ends_with(kSuffix)) {
    return bad();
  }
  std::string_view stem = file_name.substr(0, file_name.size() - kSuffix.size());
  const size_t underscore = stem.find('_');
  if (underscore == std::string_view::npos || underscore == 0 || underscore + 1 == stem.size()) {
    return bad();
  }
  std::string_view digits = stem.substr(0, underscore);
  std::string_view name = stem.substr(underscore + 1);
  if (!std::ranges::all_of(digits, [](char c) { return c >= '0' && c <= '9'; }) ||
      !std::ranges::all_of(name, isNameChar)) {
    return bad();
  }
  int64_t version = 0;
  auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), version);
  if (ec != std::errc() || ptr != digits.data() + digits.size() || version <= 0) {
    return bad();
  }
  return Migration{version, std::string(name), {}};
}

Result<std::vector<Migration>> embeddedMigrations() {
  std::vector<Migration> out;
  for (const auto& file : embedded::embeddedFiles()) {
    ML_ASSIGN_OR_RETURN(Migration migration, parseMigrationName(file.name));
    migration.sql = std::string(file.data);
    out.push_back(std::move(migration));
  }
  std::ranges::sort(out, {}, &Migration::version);
  for (size_t i = 1; i < out.size(); ++i) {
    if (out[i].version == out[i - 1].version) {
      return makeError(Errc::Internal,
                       fmt::format("duplicate state migration version {}", out[i].version));
    }
  }
  return out;
}

Result<int64_t> schemaVersion(Db& db) {
  return db.queryInt64("PRAGMA user_version");
}

Status migrate(Db& db, std::span<const Migration> migrations, const MigrateOptions& options) {
  for (size_t i = 0; i < migrations.size(); ++i) {
    if (migrations[i].version <= 0 ||
        (i > 0 && migrations[i].version <= migrations[i - 1].version)) {
      return makeError(Errc::Internal, "state migrations must have ascending versions > 0");
    }
  }
  const int64_t newest = migrations.empty() ? 0 : migrations.back().version;
  ML_ASSIGN_OR_RETURN(int64_t current, schemaVersion(db));
  if (current > newest) {
    return makeError(Errc::Conflict,
                     fmt::format("state DB schema version {} is newer than this matchlock ({}); "
                                 "upgrade matchlock",
                                 current, newest));
  }
  auto first_pending = std::ranges::find_if(
      migrations, [&](const Migration& migration) { return migration.version > current; });
  if (first_pending == migrations.end()) {
    return ok();
  }

  std::string backup;
  if (current > 0 && !db.inMemory()) {
    backup = backupPath(db);
    ML_RETURN_IF_ERROR(takeBackup(db, backup));
    ML_LOG(state, info, "migrating {} from schema {} to {} (backup {})", db.path(), current, newest,
           backup);
  }

  for (auto it = first_pending; it != migrations.end(); ++it) {
    if (options.before_each_for_test) {
      options.before_each_for_test(*it);
    }
    Status status = applyOne(db, *it);
    if (status.has_value()) {
      continue;
    }
    Error error = std::move(status).error().withContext(
        fmt::format("applying state migration {:04}_{}", it->version, it->name));
    if (backup.empty()) {
      return makeError(std::move(error));
    }
    Status restored = restoreBackup(db, backup);
    if (!restored.has_value()) {
      // Keep the backup: it is now the only good copy.
      error.addDetail(fmt::format("restoring the pre-migration backup failed: {}; it is kept at {}",
                                  restored.error().toString(), backup));
      return makeError(std::move(error));
    }
    (void)removeBackup(backup);
    error.addDetail(fmt::format("state DB restored to schema version {}", current));
    return makeError(std::move(error));
  }

  if (!backup.empty()) {
    ML_RETURN_IF_ERROR(removeBackup(backup));
  }
  return ok();
}

Result<InitLock> InitLock::acquire(const std::string& db_path) {
  const std::string path = db_path + ".init.lock";
  ML_ASSIGN_OR_RETURN(Fd fd, openFile(path, O_RDWR | O_CREAT, 0600));
  while (::flock(fd.get(), LOCK_EX) != 0) {
    if (errno != EINTR) {
      return makeError(Errc::System, fmt::format("flock {}", path), errno);
    }
  }
  return InitLock(std::move(fd));
}

}  // namespace matchlock::state
