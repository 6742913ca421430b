// SPDX-License-Identifier: Apache-2.0
#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "common/fd.h"
#include "common/result.h"
#include "common/scope_exit.h"
#include "state/db.h"
#include "state/migrate.h"
#include "state/store.h"
#include "state/subnet.h"
#include "sys/process_ref.h"

namespace matchlock::state {

// ProcessRef and its helpers live in sys/ (the store records them).
using sys::isAlive;
using sys::parseProcStat;
using sys::processRef;
using sys::processStartTime;
using sys::ProcStat;

namespace {

// ---- Helpers ----------------------------------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    std::string tmpl = "/tmp/ml-state-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  TempDir(TempDir&&) = delete;
  TempDir& operator=(TempDir&&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string file(std::string_view name) const { return fmt::format("{}/{}", path_, name); }

 private:
  std::string path_;
};

template <class T>
T expectOk(Result<T> result) {
  if (!result.has_value()) {
    FAIL("unexpected error: " << result.error().toString());
  }
  return std::move(result).value();
}

void expectOk(const Status& status) {
  if (!status.has_value()) {
    FAIL("unexpected error: " << status.error().toString());
  }
}

template <class T>
Error expectError(Result<T> result, Errc code) {
  REQUIRE_FALSE(result.has_value());
  INFO(result.error().toString());
  CHECK(errcName(result.error().code()) == errcName(code));
  return std::move(result).error();
}

bool fileExists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

unsigned fileMode(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

int64_t count(Db& db, const std::string& sql) {
  return expectOk(db.queryInt64(sql));
}

bool tableExists(Db& db, std::string_view table) {
  return count(db, fmt::format("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND "
                               "name = '{}'",
                               table)) == 1;
}

SandboxRecord sandbox(std::string id, std::string project = "proj", std::string name = "") {
  SandboxRecord r;
  r.name = name.empty() ? id : std::move(name);
  r.id = std::move(id);
  r.project = std::move(project);
  r.spec_json = R"({"image":"alpine:3.19","resources":{"cpus":1}})";
  r.spec_hash = "spec-hash";
  r.group_hashes = {{"image", "aa"}, {"resources", "bb"}};
  return r;
}

StoreOptions poolOptions(std::string_view pool) {
  StoreOptions options;
  options.subnet_pool = expectOk(SubnetPool::parse(pool));
  return options;
}

Migration testMigration(int64_t version, std::string name, std::string sql) {
  return Migration{version, std::move(name), std::move(sql)};
}

int64_t newestEmbeddedVersion() {
  return expectOk(embeddedMigrations()).back().version;
}

// Waits for `pid` and returns its raw wait status.
int waitFor(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      return -1;
    }
  }
  return status;
}

// ---- Db / Statement / Transaction -------------------------------------------------------------

TEST_CASE("Statement binds and reads every type", "[state][db]") {
  Db db = expectOk(Db::open(std::string(kMemoryPath)));
  expectOk(db.exec("CREATE TABLE t (i INTEGER, d REAL, s TEXT, b BLOB, n TEXT)"));
  Statement insert = expectOk(db.prepare("INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)"));
  const std::vector<std::byte> blob{std::byte{0}, std::byte{0xff}, std::byte{7}};
  expectOk(insert.bindInt64(1, int64_t{1} << 40));
  expectOk(insert.bindDouble(2, 2.5));
  expectOk(insert.bindText(3, std::string("text with \0 nul", 15)));
  expectOk(insert.bindBlob(4, blob));
  expectOk(insert.bindNull(5));
  expectOk(insert.run());
  expectOk(insert.reset());
  expectOk(insert.bindAll(7, 0.5, std::string_view("x"), std::nullopt, std::optional<int>()));
  // Parameter 4 is NULL through nullopt, 5 through an empty optional.
  expectOk(insert.run());

  Statement select = expectOk(db.prepare("SELECT i, d, s, b, n FROM t ORDER BY i DESC"));
  REQUIRE(expectOk(select.step()));
  CHECK(select.columnInt64(0) == (int64_t{1} << 40));
  CHECK(select.columnDouble(1) == 2.5);
  CHECK(select.columnText(2) == std::string("text with \0 nul", 15));
  CHECK(select.columnBlob(3) == blob);
  CHECK(select.columnIsNull(4));
  CHECK_FALSE(select.columnOptText(4).has_value());
  REQUIRE(expectOk(select.step()));
  CHECK(select.columnOptInt64(0) == std::optional<int64_t>(7));
  CHECK(select.columnIsNull(3));
  CHECK_FALSE(expectOk(select.step()));
}

TEST_CASE("SQLite errors map onto Errc", "[state][db]") {
  Db db = expectOk(Db::open(std::string(kMemoryPath)));
  expectOk(db.exec("CREATE TABLE t (k TEXT PRIMARY KEY)"));
  expectOk(db.exec("INSERT INTO t VALUES ('a')"));
  Error dup = expectError(db.exec("INSERT INTO t VALUES ('a')"), Errc::Conflict);
  CHECK_THAT(dup.message(), Catch::Contains("UNIQUE constraint failed: t.k"));
  Error syntax = expectError(db.prepare("SELEC nonsense"), Errc::Internal);
  CHECK_THAT(syntax.message(), Catch::Contains("syntax error"));
  expectError(Db::open("/nonexistent-dir/x/state.db"), Errc::System);
}

TEST_CASE("a busy database is Unavailable, not an internal error", "[state][db]") {
  TempDir dir;
  const std::string path = dir.file("busy.db");
  Db holder = expectOk(Db::open(path));
  Db waiter = expectOk(Db::open(path));
  REQUIRE(sqlite3_busy_timeout(waiter.raw(), 0) == SQLITE_OK);
  Transaction txn = expectOk(Transaction::begin(holder));
  Error busy = expectError(Transaction::begin(waiter), Errc::Unavailable);
  CHECK_THAT(busy.message(), Catch::Contains("locked"));
  expectOk(txn.commit());
  Transaction second = expectOk(Transaction::begin(waiter));
  expectOk(second.commit());
}

TEST_CASE("Transaction rolls back unless committed", "[state][db]") {
  Db db = expectOk(Db::open(std::string(kMemoryPath)));
  expectOk(db.exec("CREATE TABLE t (x INTEGER)"));
  {
    Transaction txn = expectOk(Transaction::begin(db));
    expectOk(db.exec("INSERT INTO t VALUES (1)"));
    CHECK_FALSE(db.autocommit());
  }
  CHECK(db.autocommit());
  CHECK(count(db, "SELECT count(*) FROM t") == 0);
  {
    Transaction txn = expectOk(Transaction::begin(db, Transaction::Mode::Deferred));
    expectOk(db.exec("INSERT INTO t VALUES (2)"));
    expectOk(txn.commit());
    expectError(txn.commit(), Errc::Internal);
  }
  CHECK(count(db, "SELECT count(*) FROM t") == 1);
}

// ---- Migrations -------------------------------------------------------------------------------

TEST_CASE("migration file names", "[state][migrate]") {
  Migration m = expectOk(parseMigrationName("0001_init.sql"));
  CHECK(m.version == 1);
  CHECK(m.name == "init");
  CHECK(expectOk(parseMigrationName("0042_add_vm_index.sql")).version == 42);
  for (const char* bad : {"init.sql", "0001.sql", "0001_.sql", "_init.sql", "0000_zero.sql",
                          "00a1_x.sql", "0001_init.txt", "0001_in it.sql"}) {
    INFO(bad);
    expectError(parseMigrationName(bad), Errc::Internal);
  }
  std::vector<Migration> embedded = expectOk(embeddedMigrations());
  REQUIRE_FALSE(embedded.empty());
  CHECK(embedded.front().version == 1);
  CHECK(embedded.front().name == "init");
  CHECK_THAT(embedded.front().sql, Catch::Contains("CREATE TABLE sandboxes"));
}

TEST_CASE("migrations apply on :memory:", "[state][migrate]") {
  Store store = expectOk(Store::open(std::string(kMemoryPath)));
  Db& db = store.db();
  const int64_t newest = newestEmbeddedVersion();
  CHECK(expectOk(schemaVersion(db)) == newest);
  CHECK(count(db, "SELECT count(*) FROM schema_migrations") ==
        static_cast<int64_t>(expectOk(embeddedMigrations()).size()));
  CHECK(count(db, "SELECT max(version) FROM schema_migrations") == newest);
  for (const char* table :
       {"projects", "sandboxes", "vms", "subnets", "owned_resources", "events"}) {
    INFO(table);
    CHECK(tableExists(db, table));
  }
  CHECK(count(db, "PRAGMA foreign_keys") == 1);
  // Migrating again is a no-op.
  expectOk(migrate(db, expectOk(embeddedMigrations())));
  CHECK(count(db, "SELECT count(*) FROM schema_migrations") ==
        static_cast<int64_t>(expectOk(embeddedMigrations()).size()));
}

TEST_CASE("file DB: 0600, WAL, idempotent reopen, no leftover backup", "[state][migrate]") {
  TempDir dir;
  const std::string path = dir.file("state.db");
  std::string first_applied_at;
  {
    Store store = expectOk(Store::open(path));
    CHECK(fileMode(path) == 0600);
    CHECK(fileMode(path + "-wal") == 0600);
    CHECK(fileMode(path + ".init.lock") == 0600);
    CHECK(expectOk(store.db().queryText("PRAGMA journal_mode")) == "wal");
    CHECK(count(store.db(), "PRAGMA synchronous") == 1);  // NORMAL
    CHECK(count(store.db(), "PRAGMA busy_timeout") == 15000);
    first_applied_at =
        expectOk(store.db().queryText("SELECT applied_at FROM schema_migrations WHERE version=1"));
    expectOk(store.upsertProject("kept"));
  }
  CHECK_FALSE(fileExists(path + ".premigrate.bak"));
  {
    Store store = expectOk(Store::open(path));
    CHECK(expectOk(schemaVersion(store.db())) == newestEmbeddedVersion());
    CHECK(expectOk(store.db().queryText(
              "SELECT applied_at FROM schema_migrations WHERE version=1")) == first_applied_at);
    CHECK(expectOk(store.listProjects()).size() == 1);
  }
  // A fresh DB has nothing to back up, and an up-to-date one needs no backup.
  CHECK_FALSE(fileExists(path + ".premigrate.bak"));
}

TEST_CASE("openDefault uses MATCHLOCK_HOME, created 0700", "[state][store]") {
  TempDir dir;
  const std::string home = dir.file("home/nested");
  const char* saved = std::getenv("MATCHLOCK_HOME");
  const std::string saved_value = saved != nullptr ? saved : "";
  ML_DEFER {
    if (saved != nullptr) {
      ::setenv("MATCHLOCK_HOME", saved_value.c_str(), 1);
    } else {
      ::unsetenv("MATCHLOCK_HOME");
    }
  };
  ::setenv("MATCHLOCK_HOME", home.c_str(), 1);
  CHECK(expectOk(Store::defaultPath()) == home + "/state.db");
  {
    Store store = expectOk(Store::openDefault());
    expectOk(store.upsertProject("p"));
  }
  CHECK(fileMode(home) == 0700);
  CHECK(fileMode(home + "/state.db") == 0600);
}

TEST_CASE("every descriptor SQLite opens is close-on-exec", "[state][db]") {
  TempDir dir;
  const std::string path = dir.file("state.db");
  Store store = expectOk(Store::open(path));
  expectOk(store.upsertProject("p"));  // touch the WAL and shm
  int checked = 0;
  DIR* fds = ::opendir("/proc/self/fd");
  REQUIRE(fds != nullptr);
  ML_DEFER {
    ::closedir(fds);
  };
  while (dirent* entry = ::readdir(fds)) {
    const std::string name = entry->d_name;
    if (name == "." || name == "..") {
      continue;
    }
    char target[4096];
    const ssize_t n =
        ::readlink(fmt::format("/proc/self/fd/{}", name).c_str(), target, sizeof(target) - 1);
    if (n <= 0) {
      continue;
    }
    const std::string link(target, static_cast<size_t>(n));
    if (link.rfind(dir.path(), 0) != 0) {
      continue;
    }
    INFO(link);
    const int flags = ::fcntl(std::stoi(name), F_GETFD);
    CHECK((flags & FD_CLOEXEC) != 0);
    ++checked;
  }
  CHECK(checked >= 2);  // state.db, -wal (and -shm, which is mmapped but also an fd)
}

TEST_CASE("upgrading an existing DB takes a backup and removes it afterwards", "[state][migrate]") {
  TempDir dir;
  const std::string path = dir.file("state.db");
  const std::string backup = path + ".premigrate.bak";
  const std::vector<Migration> v1 = {
      testMigration(1, "one", "CREATE TABLE t1 (x TEXT); INSERT INTO t1 VALUES ('old data');")};
  std::vector<Migration> v2 = v1;
  v2.push_back(testMigration(2, "two", "CREATE TABLE t2 (y TEXT);"));
  {
    Db db = expectOk(Db::open(path));
    bool called = false;
    MigrateOptions options;
    options.before_each_for_test = [&](const Migration&) {
      called = true;
      CHECK_FALSE(fileExists(backup));  // version 0: nothing to back up
    };
    expectOk(migrate(db, v1, options));
    CHECK(called);
    CHECK(expectOk(schemaVersion(db)) == 1);
  }
  {
    Db db = expectOk(Db::open(path));
    std::vector<int64_t> seen;
    MigrateOptions options;
    options.before_each_for_test = [&](const Migration& m) {
      seen.push_back(m.version);
      // The backup exists while migrating and holds the pre-upgrade schema.
      REQUIRE(fileExists(backup));
      CHECK(fileMode(backup) == 0600);
      Db copy = expectOk(Db::open(backup));
      CHECK(expectOk(schemaVersion(copy)) == 1);
      CHECK(expectOk(copy.queryText("SELECT x FROM t1")) == "old data");
    };
    expectOk(migrate(db, v2, options));
    CHECK(seen == std::vector<int64_t>{2});
    CHECK(expectOk(schemaVersion(db)) == 2);
    CHECK(tableExists(db, "t2"));
    CHECK(count(db, "SELECT count(*) FROM schema_migrations") == 2);
  }
  CHECK_FALSE(fileExists(backup));
  CHECK_FALSE(fileExists(backup + "-wal"));
}

TEST_CASE("a failing migration restores the pre-migration backup", "[state][migrate]") {
  TempDir dir;
  const std::string path = dir.file("state.db");
  const std::vector<Migration> v1 = {
      testMigration(1, "one", "CREATE TABLE t1 (x TEXT); INSERT INTO t1 VALUES ('old data');")};
  std::vector<Migration> broken = v1;
  // Migration 2 succeeds and commits; migration 3 fails halfway. Only restoring the backup (not a
  // mere rollback of migration 3) brings the DB back to version 1 without t2.
  broken.push_back(
      testMigration(2, "two", "CREATE TABLE t2 (y TEXT); UPDATE t1 SET x = 'changed by 2';"));
  broken.push_back(testMigration(3, "three", "CREATE TABLE t3 (z TEXT); THIS IS NOT SQL;"));
  {
    Db db = expectOk(Db::open(path));
    expectOk(migrate(db, v1));
  }
  {
    Db db = expectOk(Db::open(path));
    Error error = expectError(migrate(db, broken), Errc::Internal);
    CHECK_THAT(error.message(), Catch::Contains("0003_three"));
    CHECK_THAT(error.message(), Catch::Contains("syntax error"));
    REQUIRE(error.details().size() == 1);
    CHECK_THAT(error.details()[0], Catch::Contains("restored to schema version 1"));
    // The same connection sees the restored database and can keep working.
    CHECK(expectOk(schemaVersion(db)) == 1);
    CHECK_FALSE(tableExists(db, "t2"));
    CHECK_FALSE(tableExists(db, "t3"));
    CHECK(expectOk(db.queryText("SELECT x FROM t1")) == "old data");
    CHECK(count(db, "SELECT count(*) FROM schema_migrations") == 1);
    CHECK(expectOk(db.queryText("PRAGMA integrity_check")) == "ok");
    CHECK(expectOk(db.queryText("PRAGMA journal_mode")) == "wal");
  }
  CHECK_FALSE(fileExists(path + ".premigrate.bak"));
  {
    // And so does a fresh connection; a fixed migration list then applies cleanly.
    Db db = expectOk(Db::open(path));
    CHECK(expectOk(schemaVersion(db)) == 1);
    CHECK_FALSE(tableExists(db, "t2"));
    std::vector<Migration> fixed = broken;
    fixed[2].sql = "CREATE TABLE t3 (z TEXT);";
    expectOk(migrate(db, fixed));
    CHECK(expectOk(schemaVersion(db)) == 3);
    CHECK(expectOk(db.queryText("SELECT x FROM t1")) == "changed by 2");
  }
}

TEST_CASE("a DB from a newer matchlock is refused", "[state][migrate]") {
  TempDir dir;
  const std::string path = dir.file("state.db");
  const int64_t newest = newestEmbeddedVersion();
  {
    Store store = expectOk(Store::open(path));
    expectOk(store.db().exec(fmt::format("PRAGMA user_version = {}", newest + 7)));
  }
  Error error = expectError(Store::open(path), Errc::Conflict);
  CHECK_THAT(error.message(),
             Catch::Contains(fmt::format("state DB schema version {} is newer than this "
                                         "matchlock ({}); upgrade matchlock",
                                         newest + 7, newest)));
  CHECK_FALSE(fileExists(path + ".premigrate.bak"));
}

TEST_CASE("migration lists must be ascending", "[state][migrate]") {
  Db db = expectOk(Db::open(std::string(kMemoryPath)));
  const std::vector<Migration> unordered = {testMigration(2, "b", "SELECT 1;"),
                                            testMigration(1, "a", "SELECT 1;")};
  expectError(migrate(db, unordered), Errc::Internal);
  CHECK(expectOk(schemaVersion(db)) == 0);
}

// ---- Repositories -----------------------------------------------------------------------------

TEST_CASE("projects and sandboxes CRUD", "[state][store]") {
  Store store = expectOk(Store::open(std::string(kMemoryPath)));

  SandboxRecord input = sandbox("sb-1", "web", "api");
  input.source_file = "/repo/web.toml";
  input.secrets_hash = "keyed-hash-1";
  SandboxRecord created = expectOk(store.createSandbox(input));
  CHECK(created.id == "sb-1");
  CHECK(created.project == "web");
  CHECK(created.name == "api");
  CHECK(created.source_file == input.source_file);
  CHECK(created.spec_json == input.spec_json);
  CHECK(created.group_hashes == input.group_hashes);
  CHECK(created.secrets_hash == input.secrets_hash);
  CHECK(created.status == SandboxStatus::Pending);
  CHECK(created.generation == 1);
  CHECK_FALSE(created.supervisor.has_value());
  CHECK(created.created_at.size() == 24);  // 2024-05-01T12:00:00.123Z
  CHECK(created.created_at.back() == 'Z');
  CHECK(created.created_at == created.updated_at);

  // The project was created on the way.
  std::vector<ProjectRecord> projects = expectOk(store.listProjects());
  REQUIRE(projects.size() == 1);
  CHECK(projects[0].name == "web");
  expectOk(store.upsertProject("web"));
  expectOk(store.upsertProject("batch"));
  CHECK(expectOk(store.listProjects()).size() == 2);
  expectError(store.upsertProject(""), Errc::InvalidSpec);

  // Uniqueness of id and of (project, name).
  expectError(store.createSandbox(sandbox("sb-1", "other", "x")), Errc::Conflict);
  Error dup_name = expectError(store.createSandbox(sandbox("sb-2", "web", "api")), Errc::Conflict);
  CHECK_THAT(dup_name.message(), Catch::Contains("web/api"));
  expectOk(store.createSandbox(sandbox("sb-3", "batch", "api")));
  expectError(store.createSandbox(sandbox("")), Errc::InvalidSpec);
  SandboxRecord bad_json = sandbox("sb-9");
  bad_json.spec_json = "{not json";
  expectError(store.createSandbox(bad_json), Errc::InvalidSpec);

  // Lookups.
  CHECK(expectOk(store.getSandbox("sb-1")).name == "api");
  expectError(store.getSandbox("nope"), Errc::NotFound);
  auto found = expectOk(store.findSandbox("batch", "api"));
  REQUIRE(found.has_value());
  CHECK(found->id == "sb-3");
  CHECK_FALSE(expectOk(store.findSandbox("batch", "nope")).has_value());
  CHECK(expectOk(store.listSandboxes()).size() == 2);
  std::vector<SandboxRecord> web = expectOk(store.listSandboxes("web"));
  REQUIRE(web.size() == 1);
  CHECK(web[0].id == "sb-1");

  // Status, supervisor and spec updates.
  expectOk(store.updateSandboxStatus("sb-1", SandboxStatus::Failed, "boot timed out"));
  SandboxRecord failed = expectOk(store.getSandbox("sb-1"));
  CHECK(failed.status == SandboxStatus::Failed);
  CHECK(failed.last_error == std::optional<std::string>("boot timed out"));
  expectOk(store.updateSandboxStatus("sb-1", SandboxStatus::Running));
  CHECK_FALSE(expectOk(store.getSandbox("sb-1")).last_error.has_value());
  expectError(store.updateSandboxStatus("nope", SandboxStatus::Running), Errc::NotFound);

  expectOk(store.setSupervisor("sb-1", ProcessRef{4242, 987654321}));
  CHECK(expectOk(store.getSandbox("sb-1")).supervisor == ProcessRef{4242, 987654321});
  expectOk(store.setSupervisor("sb-1", std::nullopt));
  CHECK_FALSE(expectOk(store.getSandbox("sb-1")).supervisor.has_value());
  expectError(store.setSupervisor("sb-1", ProcessRef{-1, 1}), Errc::InvalidSpec);
  expectError(store.setSupervisor("nope", ProcessRef{1, 1}), Errc::NotFound);

  SandboxSpecUpdate update;
  update.spec_json = R"({"image":"alpine:3.20"})";
  update.spec_hash = "spec-hash-2";
  update.group_hashes = {{"image", "cc"}};
  CHECK(expectOk(store.updateSandboxSpec("sb-1", update)) == 2);
  SandboxRecord updated = expectOk(store.getSandbox("sb-1"));
  CHECK(updated.generation == 2);
  CHECK(updated.spec_json == update.spec_json);
  CHECK(updated.group_hashes == update.group_hashes);
  CHECK_FALSE(updated.source_file.has_value());
  CHECK_FALSE(updated.secrets_hash.has_value());
  expectError(store.updateSandboxSpec("nope", update), Errc::NotFound);

  // Delete.
  CHECK(expectOk(store.deleteSandbox("sb-3")) == 1);
  expectError(store.deleteSandbox("sb-3"), Errc::NotFound);
  CHECK(expectOk(store.listSandboxes()).size() == 1);
}

TEST_CASE("a sandbox row stores exactly the spec it is given, no secret values", "[state][store]") {
  // Contract: callers pass the normalized spec with secret *references* only, plus a keyed hash of
  // the resolved values. The store keeps those verbatim and nothing else.
  TempDir dir;
  const std::string path = dir.file("state.db");
  const std::string secret_value = "s3cr3t-value-that-must-never-be-stored";
  SandboxRecord input = sandbox("sb-secret");
  input.spec_json =
      R"({"image":"alpine","secrets":{"API_KEY":{"from_env":"API_KEY","hosts":["api.example.com"]}}})";
  input.secrets_hash = "hmac-sha256:0123abcd";
  {
    Store store = expectOk(Store::open(path));
    expectOk(store.createSandbox(input));
    Statement raw = expectOk(store.db().prepare(
        "SELECT spec_json, spec_hash, group_hashes, secrets_hash, source_file FROM sandboxes"));
    REQUIRE(expectOk(raw.step()));
    CHECK(raw.columnText(0) == input.spec_json);
    CHECK(raw.columnText(1) == input.spec_hash);
    CHECK(raw.columnText(2) == R"({"image":"aa","resources":"bb"})");
    CHECK(raw.columnText(3) == "hmac-sha256:0123abcd");
    CHECK(raw.columnIsNull(4));
  }
  // Nothing anywhere in the database files contains the value (closing checkpointed the WAL).
  for (const std::string& file : {path, path + "-wal"}) {
    if (!fileExists(file)) {
      continue;
    }
    std::string bytes = expectOk(readFile(file));
    CHECK(bytes.find(secret_value) == std::string::npos);
    CHECK(bytes.find("from_env") != std::string::npos);
  }
}

TEST_CASE("events are append-only", "[state][events]") {
  Store store = expectOk(Store::open(std::string(kMemoryPath)));
  expectOk(store.createSandbox(sandbox("sb-1")));
  Event e;
  e.project = "proj";
  e.sandbox_id = "sb-1";
  e.kind = "sandbox.created";
  e.message = "created";
  e.data_json = R"({"generation":1})";
  const int64_t first = expectOk(store.appendEvent(e));
  e.kind = "vm.started";
  const int64_t second = expectOk(store.appendEvent(e));
  Event global;
  global.kind = "gc.ran";
  const int64_t third = expectOk(store.appendEvent(global));
  CHECK(first < second);
  CHECK(second < third);

  Error update =
      expectError(store.db().exec("UPDATE events SET message = 'rewritten'"), Errc::Conflict);
  CHECK_THAT(update.message(), Catch::Contains("append-only"));
  Error del = expectError(store.db().exec("DELETE FROM events"), Errc::Conflict);
  CHECK_THAT(del.message(), Catch::Contains("append-only"));
  CHECK(count(store.db(), "SELECT count(*) FROM events") == 3);
  // Deleting the sandbox keeps its history.
  CHECK(expectOk(store.deleteSandbox("sb-1")) == 1);
  CHECK(count(store.db(), "SELECT count(*) FROM events") == 3);

  std::vector<Event> all = expectOk(store.listEvents());
  REQUIRE(all.size() == 3);
  CHECK(all[0].id == first);
  CHECK(all[0].kind == "sandbox.created");
  CHECK(all[0].data_json == R"({"generation":1})");
  CHECK(all[0].sandbox_id == std::optional<std::string>("sb-1"));
  CHECK_FALSE(all[2].project.has_value());
  CHECK(all[2].data_json == "{}");

  EventFilter by_sandbox;
  by_sandbox.sandbox_id = "sb-1";
  CHECK(expectOk(store.listEvents(by_sandbox)).size() == 2);
  EventFilter by_kind;
  by_kind.kind = "vm.started";
  CHECK(expectOk(store.listEvents(by_kind)).at(0).id == second);
  EventFilter newest;
  newest.limit = 2;
  std::vector<Event> tail = expectOk(store.listEvents(newest));
  REQUIRE(tail.size() == 2);
  CHECK(tail[0].id == second);
  CHECK(tail[1].id == third);
  EventFilter cursor;
  cursor.after_id = first;
  cursor.limit = 1;
  std::vector<Event> page = expectOk(store.listEvents(cursor));
  REQUIRE(page.size() == 1);
  CHECK(page[0].id == second);

  Event bad;
  bad.kind = "x";
  bad.data_json = "nope";
  expectError(store.appendEvent(bad), Errc::InvalidSpec);
  bad.kind = "";
  bad.data_json = "{}";
  expectError(store.appendEvent(bad), Errc::InvalidSpec);
}

TEST_CASE("owned resources: intent first, idempotent, guarded delete", "[state][resources]") {
  Store store = expectOk(Store::open(std::string(kMemoryPath)));
  expectOk(store.createSandbox(sandbox("sb-1")));
  expectOk(store.createSandbox(sandbox("sb-2")));

  OwnedResource tap = expectOk(store.recordResourceIntent("sb-1", ResourceKind::Tap, "ml1a2b3c4d"));
  CHECK(tap.state == ResourceState::Intent);
  CHECK(tap.detail_json == "{}");
  // Recording the same intent again (e.g. a retried apply step) returns the same row.
  OwnedResource again =
      expectOk(store.recordResourceIntent("sb-1", ResourceKind::Tap, "ml1a2b3c4d", R"({"x":1})"));
  CHECK(again.id == tap.id);
  CHECK(again.detail_json == "{}");
  CHECK(count(store.db(), "SELECT count(*) FROM owned_resources") == 1);
  // Same name, other kind: a different resource.
  expectOk(store.recordResourceIntent("sb-1", ResourceKind::NftTable, "ml1a2b3c4d"));
  // Same (kind, name) for another sandbox: conflict.
  Error stolen = expectError(store.recordResourceIntent("sb-2", ResourceKind::Tap, "ml1a2b3c4d"),
                             Errc::Conflict);
  CHECK_THAT(stolen.message(), Catch::Contains("already owned by sandbox 'sb-1'"));
  expectError(store.recordResourceIntent("nope", ResourceKind::Disk, "/x"), Errc::NotFound);
  expectError(store.recordResourceIntent("sb-1", ResourceKind::Disk, "/x", "{bad"),
              Errc::InvalidSpec);
  expectError(store.recordResourceIntent("sb-1", ResourceKind::Disk, ""), Errc::InvalidSpec);

  expectOk(store.markResourceCreated(ResourceKind::Tap, "ml1a2b3c4d", R"({"ifindex":7})"));
  auto created = expectOk(store.getResource(ResourceKind::Tap, "ml1a2b3c4d"));
  REQUIRE(created.has_value());
  CHECK(created->state == ResourceState::Created);
  CHECK(created->detail_json == R"({"ifindex":7})");
  expectOk(store.markResourceCreated(ResourceKind::Tap, "ml1a2b3c4d"));  // idempotent, keeps detail
  CHECK(expectOk(store.getResource(ResourceKind::Tap, "ml1a2b3c4d"))->detail_json ==
        R"({"ifindex":7})");
  // An intent on an existing created row does not downgrade it.
  CHECK(expectOk(store.recordResourceIntent("sb-1", ResourceKind::Tap, "ml1a2b3c4d")).state ==
        ResourceState::Created);
  expectError(store.markResourceCreated(ResourceKind::Tap, "nope"), Errc::NotFound);

  expectOk(store.markResourceDeleting(ResourceKind::Tap, "ml1a2b3c4d"));
  expectError(store.markResourceCreated(ResourceKind::Tap, "ml1a2b3c4d"), Errc::Conflict);
  expectError(store.markResourceDeleting(ResourceKind::Tap, "nope"), Errc::NotFound);

  expectOk(store.recordResourceIntent("sb-2", ResourceKind::RunDir, "/run/matchlock/sb-2"));
  CHECK(expectOk(store.listResources()).size() == 3);
  std::vector<OwnedResource> sb1 = expectOk(store.listResources("sb-1"));
  REQUIRE(sb1.size() == 2);
  CHECK(sb1[0].kind == ResourceKind::Tap);
  CHECK(sb1[1].kind == ResourceKind::NftTable);

  // A sandbox that still owns resources is not deleted silently.
  Error refused = expectError(store.deleteSandbox("sb-1"), Errc::Conflict);
  CHECK_THAT(refused.message(), Catch::Contains("still owns 2 resource(s)"));
  CHECK(refused.details().size() == 2);
  // Nor through raw SQL: the foreign key is ON DELETE RESTRICT.
  expectError(store.db().exec("DELETE FROM sandboxes WHERE id = 'sb-1'"), Errc::Conflict);

  CHECK(expectOk(store.deleteResource(ResourceKind::Tap, "ml1a2b3c4d")));
  CHECK_FALSE(expectOk(store.deleteResource(ResourceKind::Tap, "ml1a2b3c4d")));
  CHECK(expectOk(store.deleteResource(ResourceKind::NftTable, "ml1a2b3c4d")));
  CHECK(expectOk(store.deleteSandbox("sb-1")) == 1);

  // Force removes the rows with the sandbox, in one transaction.
  expectOk(
      store.upsertVm(VmRecord{"vm-2", "sb-2", "qemu", std::nullopt, VmStatus::Running, {}, {}}));
  expectOk(store.allocateSubnet("sb-2"));
  CHECK(expectOk(store.deleteSandbox("sb-2", DeleteMode::Force)) == 4);
  CHECK(expectOk(store.listResources()).empty());
  CHECK(expectOk(store.listSubnets()).empty());
  CHECK(expectOk(store.listVms()).empty());
}

TEST_CASE("vm records", "[state][store]") {
  Store store = expectOk(Store::open(std::string(kMemoryPath)));
  expectOk(store.createSandbox(sandbox("sb-1")));
  VmRecord vm{"vm-1", "sb-1", "qemu", ProcessRef{100, 200}, VmStatus::Starting, {}, {}};
  expectOk(store.upsertVm(vm));
  VmRecord got = expectOk(store.getVm("vm-1"));
  CHECK(got.backend == "qemu");
  CHECK(got.process == ProcessRef{100, 200});
  CHECK(got.status == VmStatus::Starting);
  expectOk(store.updateVmStatus("vm-1", VmStatus::Crashed, std::nullopt));
  got = expectOk(store.getVm("vm-1"));
  CHECK(got.status == VmStatus::Crashed);
  CHECK_FALSE(got.process.has_value());
  vm.backend = "firecracker";
  expectOk(store.upsertVm(vm));
  CHECK(expectOk(store.getVm("vm-1")).backend == "firecracker");
  CHECK(expectOk(store.listVms("sb-1")).size() == 1);
  CHECK(expectOk(store.listVms("other")).empty());
  expectError(store.upsertVm(VmRecord{"vm-x", "nope", "qemu", {}, VmStatus::Creating, {}, {}}),
              Errc::NotFound);
  expectError(store.updateVmStatus("nope", VmStatus::Running, std::nullopt), Errc::NotFound);
  expectError(store.getVm("nope"), Errc::NotFound);
  CHECK(expectOk(store.deleteVm("vm-1")));
  CHECK_FALSE(expectOk(store.deleteVm("vm-1")));
}

// ---- Subnets ----------------------------------------------------------------------------------

TEST_CASE("subnet pools parse and validate", "[state][subnet]") {
  SubnetPool pool = expectOk(SubnetPool::parse("10.213.0.0/16:24"));
  CHECK(pool.size() == 256);
  CHECK(pool.toString() == "10.213.0.0/16:24");
  CHECK(expectOk(pool.at(0)) == SubnetAllocation{0, "10.213.0.0/24", "10.213.0.1", "10.213.0.2"});
  CHECK(expectOk(pool.at(255)) ==
        SubnetAllocation{255, "10.213.255.0/24", "10.213.255.1", "10.213.255.2"});
  expectError(pool.at(256), Errc::Internal);
  expectError(pool.at(-1), Errc::Internal);

  CHECK(expectOk(SubnetPool::parse("10.213.0.0/16")).toString() == "10.213.0.0/16:24");
  CHECK(expectOk(SubnetPool::parse("192.168.4.0/22:/26")).size() == 16);
  SubnetPool tiny = expectOk(SubnetPool::parse("172.16.0.0/30:30"));
  CHECK(tiny.size() == 1);
  CHECK(expectOk(tiny.at(0)).guest_ip == "172.16.0.2");
  SubnetPool wide = expectOk(SubnetPool::parse("10.0.0.0/8:30"));
  CHECK(wide.size() == (int64_t{1} << 22));
  CHECK(expectOk(wide.at(wide.size() - 1)).cidr == "10.255.255.252/30");
  CHECK(SubnetPool::defaultPool().toString() == SubnetPool::kDefault);

  for (const char* bad : {"10.213.0.1/16:24", "10.213.0.0/16:15", "10.213.0.0/16:31",
                          "10.213.0.0/16:32", "300.1.1.0/24", "10.0.0/8", "10.0.0.0", "01.0.0.0/8",
                          "10.0.0.0/33", "10.0.0.0/8:", "10.0.0.0/8:x", "", "abc",
                          "10.0.0.0/8:24:1", "10.0.0.0./8", "10..0.0/8", "-1.0.0.0/8"}) {
    INFO(bad);
    expectError(SubnetPool::parse(bad), Errc::InvalidSpec);
  }
  Error hint = expectError(SubnetPool::parse("10.213.1.0/16"), Errc::InvalidSpec);
  CHECK_THAT(hint.message(), Catch::Contains("10.213.0.0/16"));
}

TEST_CASE("the default pool comes from MATCHLOCK_SUBNET_POOL", "[state][subnet]") {
  const char* saved = std::getenv("MATCHLOCK_SUBNET_POOL");
  const std::string saved_value = saved != nullptr ? saved : "";
  ML_DEFER {
    if (saved != nullptr) {
      ::setenv("MATCHLOCK_SUBNET_POOL", saved_value.c_str(), 1);
    } else {
      ::unsetenv("MATCHLOCK_SUBNET_POOL");
    }
  };
  ::unsetenv("MATCHLOCK_SUBNET_POOL");
  CHECK(expectOk(SubnetPool::fromEnv()).toString() == "10.213.0.0/16:24");
  ::setenv("MATCHLOCK_SUBNET_POOL", "192.168.100.0/24:28", 1);
  CHECK(expectOk(SubnetPool::fromEnv()).size() == 16);
  CHECK(expectOk(Store::open(std::string(kMemoryPath))).subnetPool().toString() ==
        "192.168.100.0/24:28");
  ::setenv("MATCHLOCK_SUBNET_POOL", "192.168.100.0/24:20", 1);
  Error error = expectError(SubnetPool::fromEnv(), Errc::InvalidSpec);
  CHECK_THAT(error.message(), Catch::Contains("MATCHLOCK_SUBNET_POOL"));
  expectError(Store::open(std::string(kMemoryPath)), Errc::InvalidSpec);
}

TEST_CASE("subnet allocation: lowest free, stable, exhaustion", "[state][subnet]") {
  Store store = expectOk(Store::open(std::string(kMemoryPath), poolOptions("192.168.8.0/22:24")));
  for (const char* id : {"a", "b", "c", "d", "e"}) {
    expectOk(store.createSandbox(sandbox(id)));
  }
  CHECK(expectOk(store.allocateSubnet("a")) ==
        SubnetAllocation{0, "192.168.8.0/24", "192.168.8.1", "192.168.8.2"});
  CHECK(expectOk(store.allocateSubnet("b")).index == 1);
  CHECK(expectOk(store.allocateSubnet("c")).index == 2);
  CHECK(expectOk(store.allocateSubnet("d")).cidr == "192.168.11.0/24");
  // Asking again returns the existing allocation.
  CHECK(expectOk(store.allocateSubnet("b")).index == 1);
  const auto before = std::chrono::steady_clock::now();
  Error full = expectError(store.allocateSubnet("e"), Errc::Unavailable);
  // Exhaustion is final: it is not retried like a busy database.
  CHECK(std::chrono::steady_clock::now() - before < std::chrono::milliseconds(200));
  CHECK_THAT(full.message(), Catch::Contains("no free subnet in pool 192.168.8.0/22:24"));
  // Releasing makes the lowest index free again.
  CHECK(expectOk(store.releaseSubnet("b")));
  CHECK_FALSE(expectOk(store.releaseSubnet("b")));
  CHECK(expectOk(store.allocateSubnet("e")).index == 1);
  CHECK(expectOk(store.releaseSubnet("a")));
  CHECK(expectOk(store.allocateSubnet("b")).index == 0);
  CHECK_FALSE(expectOk(store.getSubnet("a")).has_value());
  CHECK(expectOk(store.getSubnet("e"))->gateway == "192.168.9.1");
  expectError(store.allocateSubnet("nope"), Errc::NotFound);
  // Deleting a sandbox frees its subnet.
  CHECK(expectOk(store.deleteSandbox("c")) == 2);
  CHECK(expectOk(store.allocateSubnet("a")).index == 2);
  // The UNIQUE constraints back the allocator up.
  expectError(store.db().exec("INSERT INTO subnets (sandbox_id, idx, cidr, gateway, guest_ip) "
                              "VALUES ('d', 0, 'x', 'y', 'z')"),
              Errc::Conflict);
}

// ---- Processes --------------------------------------------------------------------------------

TEST_CASE("ProcessRef: start times from /proc", "[state][process]") {
  // comm may contain spaces and ')': parsing anchors on the last ')'.
  std::string stat = "4242 (evil) name (x) ) S";
  for (int field = 4; field <= 21; ++field) {
    stat += fmt::format(" {}", field);
  }
  stat += " 987654 23 24\n";
  ProcStat parsed = expectOk(parseProcStat(stat));
  CHECK(parsed.state == 'S');
  CHECK(parsed.start_time == 987654);
  expectError(parseProcStat("4242 (short) S 1 2 3"), Errc::Internal);
  expectError(parseProcStat("garbage"), Errc::Internal);

  ProcessRef self = expectOk(processRef(::getpid()));
  CHECK(self.pid == ::getpid());
  CHECK(self.start_time > 0);
  CHECK(isAlive(self));
  CHECK_FALSE(isAlive(ProcessRef{self.pid, self.start_time + 1}));
  CHECK_FALSE(isAlive(ProcessRef{0, 0}));

  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::_exit(0);
  }
  // Poll until the child has become a zombie (its stat says Z), then it must not count as alive.
  ProcessRef child_ref{child, 0};
  for (int i = 0; i < 1000; ++i) {
    auto text = readFile(fmt::format("/proc/{}/stat", child));
    if (!text.has_value()) {
      break;
    }
    ProcStat child_stat = expectOk(parseProcStat(*text));
    child_ref.start_time = child_stat.start_time;
    if (child_stat.state == 'Z') {
      CHECK_FALSE(isAlive(child_ref));
      break;
    }
    ::usleep(1000);
  }
  REQUIRE(WIFEXITED(waitFor(child)));
  CHECK_FALSE(isAlive(child_ref));
  expectError(processStartTime(child), Errc::NotFound);
}

// ---- Concurrency and crash safety -------------------------------------------------------------

constexpr int kWorkers = 8;
constexpr int kSandboxesPerWorker = 20;

// Blocks until every write end of the pipe is closed.
void waitForGate(int fd) {
  char byte = 0;
  while (::read(fd, &byte, 1) < 0 && errno == EINTR) {
  }
}

// Runs in a forked child: plain work only, result as an exit code. Never returns into Catch2.
// Phase 1 opens (and possibly creates and migrates) the DB and creates this worker's sandboxes;
// phase 2, released for all workers at once, allocates their subnets.
int allocateInChild(const std::string& path, int worker, int ready_fd, int go_fd) {
  StoreOptions options;
  auto pool = SubnetPool::parse("10.213.0.0/16:24");
  if (!pool.has_value()) {
    return 9;
  }
  options.subnet_pool = *pool;
  auto store = Store::open(path, std::move(options));
  if (!store.has_value()) {
    (void)::fprintf(stderr, "worker %d: open: %s\n", worker, store.error().toString().c_str());
    return 10;
  }
  std::vector<std::string> ids;
  for (int i = 0; i < kSandboxesPerWorker; ++i) {
    ids.push_back(fmt::format("w{}-s{}", worker, i));
    auto created = store->createSandbox(sandbox(ids.back(), fmt::format("p{}", worker)));
    if (!created.has_value()) {
      (void)::fprintf(stderr, "worker %d: create: %s\n", worker,
                      created.error().toString().c_str());
      return 11;
    }
  }
  const char byte = 'r';
  if (::write(ready_fd, &byte, 1) != 1) {
    return 12;
  }
  waitForGate(go_fd);
  for (const std::string& id : ids) {
    auto allocated = store->allocateSubnet(id);
    if (!allocated.has_value()) {
      (void)::fprintf(stderr, "worker %d: allocate: %s\n", worker,
                      allocated.error().toString().c_str());
      return 13;
    }
    auto again = store->allocateSubnet(id);
    if (!again.has_value() || !(*again == *allocated)) {
      return 14;
    }
    // A short pause hands the write lock to the others, so that on a 2-core machine the workers
    // really interleave instead of each finishing within one time slice.
    ::usleep(200);
  }
  return 0;
}

TEST_CASE("8 processes allocating subnets at once never get duplicates", "[state][concurrency]") {
  TempDir dir;
  const std::string path = dir.file("state.db");
  // The DB does not exist yet: the workers also race on creating and migrating it.
  Pipe open_gate = expectOk(Pipe::create());
  Pipe go_gate = expectOk(Pipe::create());
  Pipe ready = expectOk(Pipe::create());
  std::vector<pid_t> workers;
  ML_DEFER {
    for (pid_t pid : workers) {
      if (pid > 0) {
        ::kill(pid, SIGKILL);
        (void)waitFor(pid);
      }
    }
  };
  for (int worker = 0; worker < kWorkers; ++worker) {
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      open_gate.write.reset();
      go_gate.write.reset();
      ready.read.reset();
      ::alarm(120);  // never outlive a wedged parent
      waitForGate(open_gate.read.get());
      ::_exit(allocateInChild(path, worker, ready.write.get(), go_gate.read.get()));
    }
    workers.push_back(pid);
  }
  ready.write.reset();
  open_gate.write.reset();  // phase 1: everybody opens the DB at once
  int ready_count = 0;
  char byte = 0;
  while (ready_count < kWorkers) {
    const ssize_t n = ::read(ready.read.get(), &byte, 1);
    if (n == 1) {
      ++ready_count;
    } else if (n == 0 || errno != EINTR) {
      break;  // a worker died; its exit status is reported below
    }
  }
  CHECK(ready_count == kWorkers);
  go_gate.write.reset();  // phase 2: everybody allocates at once
  for (pid_t& pid : workers) {
    const int status = waitFor(pid);
    INFO("worker pid " << pid << " wait status " << status);
    pid = -1;
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }

  Store store = expectOk(Store::open(path, poolOptions("10.213.0.0/16:24")));
  std::vector<SubnetRecord> subnets = expectOk(store.listSubnets());
  REQUIRE(subnets.size() == static_cast<size_t>(kWorkers * kSandboxesPerWorker));
  std::set<int64_t> indexes;
  std::set<std::string> cidrs;
  std::set<std::string> owners;
  // How often the owning worker changes along the pool: 7 if the workers ran one after another.
  int owner_switches = 0;
  for (size_t i = 0; i < subnets.size(); ++i) {
    const SubnetRecord& subnet = subnets[i];
    indexes.insert(subnet.allocation.index);
    cidrs.insert(subnet.allocation.cidr);
    owners.insert(subnet.sandbox_id);
    CHECK(expectOk(store.subnetPool().at(subnet.allocation.index)) == subnet.allocation);
    if (i > 0 && subnet.sandbox_id.substr(0, subnet.sandbox_id.find('-')) !=
                     subnets[i - 1].sandbox_id.substr(0, subnets[i - 1].sandbox_id.find('-'))) {
      ++owner_switches;
    }
  }
  CHECK(indexes.size() == 160);
  CHECK(cidrs.size() == 160);
  CHECK(owners.size() == 160);
  // Lowest-free under contention packs the pool densely: exactly indexes 0..159.
  CHECK(*indexes.begin() == 0);
  CHECK(*indexes.rbegin() == 159);
  for (int worker = 0; worker < kWorkers; ++worker) {
    for (int i = 0; i < kSandboxesPerWorker; ++i) {
      CHECK(owners.count(fmt::format("w{}-s{}", worker, i)) == 1);
    }
  }
  // The allocations really interleaved across processes (the test would prove little otherwise).
  INFO("owner switches along the pool: " << owner_switches);
  CHECK(owner_switches > 2 * kWorkers);
  CHECK(expectOk(store.db().queryText("PRAGMA integrity_check")) == "ok");
  CHECK(count(store.db(), "SELECT count(*) FROM schema_migrations") ==
        static_cast<int64_t>(expectOk(embeddedMigrations()).size()));
}

constexpr int kCommittedRows = 10;
constexpr int kUncommittedRows = 5000;

// Runs in a forked child: commits some events, then writes many more inside an open transaction,
// tells the parent, and waits to be killed. Never returns.
[[noreturn]] void writeThenHang(const std::string& path, int ready_fd) {
  int code = [&] {
    auto store = Store::open(path);
    if (!store.has_value()) {
      return 10;
    }
    for (int i = 0; i < kCommittedRows; ++i) {
      Event event;
      event.kind = "committed";
      if (!store->appendEvent(event).has_value()) {
        return 11;
      }
    }
    Db& db = store->db();
    // A tiny page cache forces SQLite to spill uncommitted pages into the WAL, so the kill
    // leaves uncommitted frames on disk, not just in memory.
    if (!db.exec("PRAGMA cache_size = 8").has_value()) {
      return 12;
    }
    auto txn = Transaction::begin(db);
    if (!txn.has_value()) {
      return 13;
    }
    auto insert = db.prepare("INSERT INTO events (kind, message) VALUES ('uncommitted', ?1)");
    if (!insert.has_value() || !db.exec("INSERT INTO projects (name, created_at, updated_at) "
                                        "VALUES ('ghost', 'x', 'x')")
                                    .has_value()) {
      return 14;
    }
    const std::string filler(512, 'u');
    for (int i = 0; i < kUncommittedRows; ++i) {
      if (!insert->bindText(1, filler).has_value() || !insert->run().has_value() ||
          !insert->reset().has_value()) {
        return 15;
      }
    }
    const char byte = 'x';
    if (::write(ready_fd, &byte, 1) != 1) {
      return 16;
    }
    ::alarm(60);  // never outlive a wedged parent
    for (;;) {
      ::pause();
    }
  }();
  ::_exit(code);
}

TEST_CASE("a process killed mid-transaction leaves the DB consistent", "[state][crash]") {
  TempDir dir;
  const std::string path = dir.file("state.db");
  {
    Store store = expectOk(Store::open(path));
    expectOk(store.createSandbox(sandbox("before")));
  }
  Pipe ready = expectOk(Pipe::create());
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ready.read.reset();
    writeThenHang(path, ready.write.get());
  }
  bool reaped = false;
  ML_DEFER {
    if (!reaped) {
      ::kill(child, SIGKILL);
      (void)waitFor(child);
    }
  };
  ready.write.reset();
  char byte = 0;
  ssize_t n = 0;
  while ((n = ::read(ready.read.get(), &byte, 1)) < 0 && errno == EINTR) {
  }
  if (n != 1) {
    const int status = waitFor(child);
    reaped = true;
    FAIL("child failed before its transaction: wait status " << status << ", exit code "
                                                             << WEXITSTATUS(status));
  }

  // The child holds the write lock with thousands of uncommitted rows, part of them in the WAL.
  struct stat wal {};
  REQUIRE(::stat((path + "-wal").c_str(), &wal) == 0);
  INFO("WAL size while the transaction is open: " << wal.st_size);
  CHECK(wal.st_size > off_t{1024} * 1024);

  REQUIRE(::kill(child, SIGKILL) == 0);
  const int status = waitFor(child);
  reaped = true;
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);

  Store store = expectOk(Store::open(path));
  Db& db = store.db();
  CHECK(expectOk(db.queryText("PRAGMA integrity_check")) == "ok");
  CHECK(count(db, "SELECT count(*) FROM events WHERE kind = 'uncommitted'") == 0);
  CHECK(count(db, "SELECT count(*) FROM projects WHERE name = 'ghost'") == 0);
  CHECK(count(db, "SELECT count(*) FROM events WHERE kind = 'committed'") == kCommittedRows);
  CHECK(expectOk(store.getSandbox("before")).id == "before");
  // Writable again: the dead writer's lock is gone (the busy timeout would make this Unavailable).
  expectOk(store.createSandbox(sandbox("after")));
  Event event;
  event.kind = "after.crash";
  expectOk(store.appendEvent(event));
  CHECK(expectOk(store.allocateSubnet("after")).index == 0);
  expectOk(db.exec("PRAGMA wal_checkpoint(TRUNCATE)"));
  CHECK(expectOk(db.queryText("PRAGMA integrity_check")) == "ok");
  CHECK(count(db, "SELECT count(*) FROM pragma_foreign_key_check") == 0);
}

}  // namespace
}  // namespace matchlock::state
