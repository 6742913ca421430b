// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sqlite3.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cptr.h"
#include "common/result.h"

namespace matchlock::state {

using Sqlite3Ptr = CPtr<sqlite3, &sqlite3_close_v2>;
using StmtPtr = CPtr<sqlite3_stmt, &sqlite3_finalize>;

/// The path that opens a private in-memory database (tests only).
inline constexpr std::string_view kMemoryPath = ":memory:";

/// Maps an SQLite result code to an Error: BUSY/LOCKED -> Unavailable, CONSTRAINT -> Conflict,
/// I/O and open failures -> System (with the OS errno when SQLite has one), everything else ->
/// Internal. The message is "<what>: <sqlite message>". `db` may be null.
Error sqliteError(sqlite3* db, int rc, std::string_view what);

class Statement;

/// One SQLite connection (RAII; closed with sqlite3_close_v2). Move-only.
///
/// Opened with SQLITE_OPEN_FULLMUTEX (the handle may be shared between threads, although the
/// design keeps the write handle on the control loop) and SQLITE_OPEN_EXRESCODE. SQLite's unix VFS
/// opens every file (db, -wal, -shm, journals) with O_CLOEXEC. After open the connection runs with
/// journal_mode=WAL (file databases), busy_timeout=15000, foreign_keys=ON, synchronous=NORMAL.
class Db {
 public:
  /// Opens (creating if needed) the database at `path`; `kMemoryPath` opens a private in-memory
  /// database. The caller creates parent directories and chooses file permissions.
  [[nodiscard]] static Result<Db> open(const std::string& path);

  Db(Db&&) noexcept = default;
  Db& operator=(Db&&) noexcept = default;
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  ~Db() = default;

  /// Runs one or more SQL statements that return no rows of interest (sqlite3_exec).
  [[nodiscard]] Status exec(std::string_view sql);
  /// Prepares one statement. The Statement must not outlive this Db.
  [[nodiscard]] Result<Statement> prepare(std::string_view sql);
  /// Runs a single-row, single-column integer query (e.g. "PRAGMA user_version").
  [[nodiscard]] Result<int64_t> queryInt64(std::string_view sql);
  /// Runs a single-row, single-column text query (e.g. "PRAGMA integrity_check").
  [[nodiscard]] Result<std::string> queryText(std::string_view sql);

  /// Rows changed by the most recent INSERT/UPDATE/DELETE on this connection.
  int64_t changes() const { return sqlite3_changes64(db_.get()); }
  int64_t lastInsertRowid() const { return sqlite3_last_insert_rowid(db_.get()); }
  /// True when no transaction is open.
  bool autocommit() const { return sqlite3_get_autocommit(db_.get()) != 0; }
  const std::string& path() const { return path_; }
  bool inMemory() const { return path_ == kMemoryPath; }
  sqlite3* raw() const { return db_.get(); }

 private:
  Db(Sqlite3Ptr db, std::string path) : db_(std::move(db)), path_(std::move(path)) {}

  Sqlite3Ptr db_;
  std::string path_;
};

/// A prepared statement (RAII; finalized on destruction). Bind indexes start at 1, column indexes
/// at 0, as in the SQLite C API. Move-only; must not outlive its Db.
class Statement {
 public:
  Statement(Statement&&) noexcept = default;
  Statement& operator=(Statement&&) noexcept = default;
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  ~Statement() = default;

  [[nodiscard]] Status bindInt64(int index, int64_t value);
  [[nodiscard]] Status bindDouble(int index, double value);
  /// Binds a copy of `value` (SQLITE_TRANSIENT), so temporaries are fine.
  [[nodiscard]] Status bindText(int index, std::string_view value);
  [[nodiscard]] Status bindBlob(int index, std::span<const std::byte> value);
  [[nodiscard]] Status bindNull(int index);

  /// Binds by C++ type: integers and bool -> INTEGER, floating point -> REAL, strings -> TEXT,
  /// std::nullopt / nullptr -> NULL, std::optional<T> -> NULL or T.
  template <class T>
  [[nodiscard]] Status bind(int index, const T& value);

  /// Binds `values` to parameters 1..N in order.
  template <class... Ts>
  [[nodiscard]] Status bindAll(const Ts&... values) {
    int index = 0;
    Status status = ok();
    ((status = status.has_value() ? bind(++index, values) : status), ...);
    return status;
  }

  /// Advances. Returns true when a row is available, false when the statement is done.
  [[nodiscard]] Result<bool> step();
  /// Steps to completion, ignoring any rows (INSERT/UPDATE/DELETE).
  [[nodiscard]] Status run();
  /// Resets for re-execution and clears bindings.
  [[nodiscard]] Status reset();

  int columnCount() const { return sqlite3_column_count(stmt_.get()); }
  bool columnIsNull(int col) const { return sqlite3_column_type(stmt_.get(), col) == SQLITE_NULL; }
  int64_t columnInt64(int col) const { return sqlite3_column_int64(stmt_.get(), col); }
  double columnDouble(int col) const { return sqlite3_column_double(stmt_.get(), col); }
  /// The column as text; "" for NULL.
  std::string columnText(int col) const;
  std::vector<std::byte> columnBlob(int col) const;
  std::optional<std::string> columnOptText(int col) const;
  std::optional<int64_t> columnOptInt64(int col) const;

  sqlite3_stmt* raw() const { return stmt_.get(); }

 private:
  friend class Db;
  explicit Statement(StmtPtr stmt) : stmt_(std::move(stmt)) {}
  Error error(int rc, std::string_view what) const;

  StmtPtr stmt_;
};

/// RAII transaction guard. `begin()` starts a transaction (IMMEDIATE by default: the write lock is
/// taken up front, so writers queue on the busy timeout instead of failing on lock upgrade). The
/// destructor rolls back unless commit() succeeded. Must not outlive its Db.
class Transaction {
 public:
  enum class Mode { Deferred, Immediate, Exclusive };

  [[nodiscard]] static Result<Transaction> begin(Db& db, Mode mode = Mode::Immediate);

  Transaction(Transaction&& other) noexcept
      : db_(other.db_), active_(std::exchange(other.active_, false)) {}
  Transaction& operator=(Transaction&&) = delete;
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction();

  [[nodiscard]] Status commit();
  /// Rolls back now (idempotent). Errors are ignored: the connection is back in autocommit mode
  /// either way.
  void rollback() noexcept;

 private:
  explicit Transaction(Db& db) : db_(&db) {}

  Db* db_;
  bool active_ = true;
};

// Template definitions.

namespace internal {
template <class T>
struct IsOptional : std::false_type {};
template <class T>
struct IsOptional<std::optional<T>> : std::true_type {};
}  // namespace internal

template <class T>
Status Statement::bind(int index, const T& value) {
  if constexpr (std::is_same_v<T, std::nullopt_t> || std::is_same_v<T, std::nullptr_t>) {
    return bindNull(index);
  } else if constexpr (internal::IsOptional<T>::value) {
    if (!value.has_value()) {
      return bindNull(index);
    }
    return bind(index, *value);
  } else if constexpr (std::is_same_v<T, bool>) {
    return bindInt64(index, value ? 1 : 0);
  } else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) {
    static_assert(!std::is_enum_v<T>, "bind enums through their text name");
    return bindInt64(index, static_cast<int64_t>(value));
  } else if constexpr (std::is_floating_point_v<T>) {
    return bindDouble(index, static_cast<double>(value));
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    return bindText(index, static_cast<std::string_view>(value));
  } else {
    static_assert(sizeof(T) == 0, "unsupported bind type");
  }
}

}  // namespace matchlock::state
