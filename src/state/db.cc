// SPDX-License-Identifier: Apache-2.0
#include "state/db.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstdint>

namespace matchlock::state {
namespace {

// SQLITE_TRANSIENT is an old-style cast of -1 inside a macro; spell it without the cast warning.
sqlite3_destructor_type transientDestructor() {
  return reinterpret_cast<sqlite3_destructor_type>(  // NOLINT(performance-no-int-to-ptr)
      static_cast<intptr_t>(-1));
}

constexpr int kBusyTimeoutMs = 15000;

}  // namespace

Error sqliteError(sqlite3* db, int rc, std::string_view what) {
  const int primary = rc & 0xff;
  std::string detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  std::string message = fmt::format("{}: {}", what, detail);
  switch (primary) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return {Errc::Unavailable, std::move(message)};
    case SQLITE_CONSTRAINT:
      return {Errc::Conflict, std::move(message)};
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN:
    case SQLITE_FULL:
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_NOLFS: {
      int sys_errno = db != nullptr ? sqlite3_system_errno(db) : 0;
      if (sys_errno == EACCES || sys_errno == EPERM) {
        return {Errc::PermissionDenied, std::move(message), sys_errno};
      }
      return {Errc::System, std::move(message), sys_errno};
    }
    default:
      return {Errc::Internal, std::move(message)};
  }
}

// ---- Db ---------------------------------------------------------------------------------------

Result<Db> Db::open(const std::string& path) {
  sqlite3* raw = nullptr;
  const int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX |
                    SQLITE_OPEN_EXRESCODE | SQLITE_OPEN_NOFOLLOW;
  int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
  // sqlite3_open_v2 hands back a handle even on failure; it must be closed either way.
  Sqlite3Ptr handle(raw);
  if (rc != SQLITE_OK) {
    return makeError(sqliteError(handle.get(), rc, fmt::format("opening state DB {}", path)));
  }
  Db db(std::move(handle), path);
  rc = sqlite3_busy_timeout(db.raw(), kBusyTimeoutMs);
  if (rc != SQLITE_OK) {
    return makeError(sqliteError(db.raw(), rc, "setting busy timeout"));
  }
  ML_RETURN_IF_ERROR(db.exec("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;"));
  if (!db.inMemory()) {
    // Switching to WAL takes an exclusive lock once; the busy handler covers concurrent openers.
    ML_ASSIGN_OR_RETURN(std::string mode, db.queryText("PRAGMA journal_mode = WAL"));
    if (mode != "wal") {
      return makeError(
          Errc::System,
          fmt::format("state DB {}: cannot enable WAL (journal_mode is {})", path, mode));
    }
  }
  ML_ASSIGN_OR_RETURN(int64_t fk, db.queryInt64("PRAGMA foreign_keys"));
  if (fk != 1) {
    return makeError(Errc::Internal, "SQLite built without foreign key support");
  }
  return db;
}

Status Db::exec(std::string_view sql) {
  char* err = nullptr;
  std::string owned(sql);
  int rc = sqlite3_exec(db_.get(), owned.c_str(), nullptr, nullptr, &err);
  CPtr<char, &sqlite3_free> err_owner(err);
  if (rc != SQLITE_OK) {
    return makeError(sqliteError(db_.get(), rc, "exec"));
  }
  return ok();
}

Result<Statement> Db::prepare(std::string_view sql) {
  sqlite3_stmt* raw = nullptr;
  const char* tail = nullptr;
  int rc = sqlite3_prepare_v3(db_.get(), sql.data(), static_cast<int>(sql.size()), 0, &raw, &tail);
  StmtPtr stmt(raw);
  if (rc != SQLITE_OK) {
    return makeError(sqliteError(db_.get(), rc, fmt::format("preparing \"{}\"", sql)));
  }
  if (stmt == nullptr) {
    return makeError(Errc::Internal, fmt::format("preparing \"{}\": empty statement", sql));
  }
  return Statement(std::move(stmt));
}

Result<int64_t> Db::queryInt64(std::string_view sql) {
  ML_ASSIGN_OR_RETURN(Statement stmt, prepare(sql));
  ML_ASSIGN_OR_RETURN(bool row, stmt.step());
  if (!row) {
    return makeError(Errc::Internal, fmt::format("\"{}\" returned no row", sql));
  }
  return stmt.columnInt64(0);
}

Result<std::string> Db::queryText(std::string_view sql) {
  ML_ASSIGN_OR_RETURN(Statement stmt, prepare(sql));
  ML_ASSIGN_OR_RETURN(bool row, stmt.step());
  if (!row) {
    return makeError(Errc::Internal, fmt::format("\"{}\" returned no row", sql));
  }
  return stmt.columnText(0);
}

// ---- Statement --------------------------------------------------------------------------------

Error Statement::error(int rc, std::string_view what) const {
  const char* sql = sqlite3_sql(stmt_.get());
  return sqliteError(sqlite3_db_handle(stmt_.get()), rc,
                     fmt::format("{} \"{}\"", what, sql != nullptr ? sql : ""));
}

Status Statement::bindInt64(int index, int64_t value) {
  int rc = sqlite3_bind_int64(stmt_.get(), index, value);
  if (rc != SQLITE_OK) {
    return makeError(error(rc, fmt::format("binding parameter {} of", index)));
  }
  return ok();
}

Status Statement::bindDouble(int index, double value) {
  int rc = sqlite3_bind_double(stmt_.get(), index, value);
  if (rc != SQLITE_OK) {
    return makeError(error(rc, fmt::format("binding parameter {} of", index)));
  }
  return ok();
}

Status Statement::bindText(int index, std::string_view value) {
  int rc = sqlite3_bind_text64(stmt_.get(), index, value.data(), value.size(),
                               transientDestructor(), SQLITE_UTF8);
  if (rc != SQLITE_OK) {
    return makeError(error(rc, fmt::format("binding parameter {} of", index)));
  }
  return ok();
}

Status Statement::bindBlob(int index, std::span<const std::byte> value) {
  int rc =
      sqlite3_bind_blob64(stmt_.get(), index, value.data(), value.size(), transientDestructor());
  if (rc != SQLITE_OK) {
    return makeError(error(rc, fmt::format("binding parameter {} of", index)));
  }
  return ok();
}

Status Statement::bindNull(int index) {
  int rc = sqlite3_bind_null(stmt_.get(), index);
  if (rc != SQLITE_OK) {
    return makeError(error(rc, fmt::format("binding parameter {} of", index)));
  }
  return ok();
}

Result<bool> Statement::step() {
  int rc = sqlite3_step(stmt_.get());
  if (rc == SQLITE_ROW) {
    return true;
  }
  if (rc == SQLITE_DONE) {
    return false;
  }
  Error err = error(rc, "executing");
  // A failed step leaves the statement needing a reset before reuse; the error is already taken.
  (void)sqlite3_reset(stmt_.get());
  return makeError(std::move(err));
}

Status Statement::run() {
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, step());
    if (!row) {
      return ok();
    }
  }
}

Status Statement::reset() {
  int rc = sqlite3_reset(stmt_.get());
  (void)sqlite3_clear_bindings(stmt_.get());
  if (rc != SQLITE_OK) {
    return makeError(error(rc, "resetting"));
  }
  return ok();
}

std::string Statement::columnText(int col) const {
  const unsigned char* text = sqlite3_column_text(stmt_.get(), col);
  if (text == nullptr) {
    return {};
  }
  const int size = sqlite3_column_bytes(stmt_.get(), col);
  return {reinterpret_cast<const char*>(text), static_cast<size_t>(size)};
}

std::vector<std::byte> Statement::columnBlob(int col) const {
  const void* data = sqlite3_column_blob(stmt_.get(), col);
  const int size = sqlite3_column_bytes(stmt_.get(), col);
  if (data == nullptr || size <= 0) {
    return {};
  }
  const auto* bytes = static_cast<const std::byte*>(data);
  return {bytes, bytes + size};
}

std::optional<std::string> Statement::columnOptText(int col) const {
  if (columnIsNull(col)) {
    return std::nullopt;
  }
  return columnText(col);
}

std::optional<int64_t> Statement::columnOptInt64(int col) const {
  if (columnIsNull(col)) {
    return std::nullopt;
  }
  return columnInt64(col);
}

// ---- Transaction ------------------------------------------------------------------------------

Result<Transaction> Transaction::begin(Db& db, Mode mode) {
  const char* sql = mode == Mode::Immediate   ? "BEGIN IMMEDIATE"
                    : mode == Mode::Exclusive ? "BEGIN EXCLUSIVE"
                                              : "BEGIN DEFERRED";
  ML_RETURN_IF_ERROR(db.exec(sql));
  return Transaction(db);
}

Transaction::~Transaction() {
  rollback();
}

Status Transaction::commit() {
  if (!active_) {
    return makeError(Errc::Internal, "commit on a finished transaction");
  }
  Status status = db_->exec("COMMIT");
  if (!status.has_value()) {
    // COMMIT can fail with BUSY and leave the transaction open; roll back so the connection is
    // usable and the caller can retry the whole unit of work.
    rollback();
    return status;
  }
  active_ = false;
  return ok();
}

void Transaction::rollback() noexcept {
  if (!active_) {
    return;
  }
  active_ = false;
  // Some errors (SQLITE_FULL, IOERR, ...) already rolled the transaction back automatically.
  if (!db_->autocommit()) {
    (void)sqlite3_exec(db_->raw(), "ROLLBACK", nullptr, nullptr, nullptr);
  }
}

}  // namespace matchlock::state
