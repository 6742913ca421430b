// SPDX-License-Identifier: Apache-2.0
#include "image/store.h"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/chrono.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <ctime>
#include <set>

#include "common/cptr.h"
#include "common/paths.h"
#include "image/reference.h"
#include "state/migrate.h"

namespace matchlock::image {
namespace {

constexpr std::string_view kSchemaV1 = R"sql(
CREATE TABLE images (
  name TEXT PRIMARY KEY,
  manifest_digest TEXT NOT NULL,
  config_digest TEXT NOT NULL,
  source TEXT NOT NULL,
  platform TEXT NOT NULL,
  size INTEGER NOT NULL,
  created_at TEXT NOT NULL
) STRICT;
CREATE TABLE image_layers (
  name TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
  ordinal INTEGER NOT NULL,
  digest TEXT NOT NULL,
  media_type TEXT NOT NULL,
  size INTEGER NOT NULL,
  PRIMARY KEY (name, ordinal)
) STRICT;
CREATE INDEX image_layers_digest ON image_layers(digest);
)sql";

using DirPtr = CPtr<DIR, &closedir>;

std::vector<std::string> listDir(const std::string& dir) {
  std::vector<std::string> out;
  DirPtr d(::opendir(dir.c_str()));
  if (!d) {
    return out;
  }
  while (dirent* e = ::readdir(d.get())) {
    std::string name = e->d_name;
    if (name != "." && name != "..") {
      out.push_back(std::move(name));
    }
  }
  return out;
}

int64_t fileSize(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
}

}  // namespace

std::string nowTimestamp() {
  std::time_t t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", tm);
}

TempFile::~TempFile() {
  if (!path_.empty()) {
    (void)::unlink(path_.c_str());
  }
}

Status TempFile::write(std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd_.get(), data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return makeError(Errc::System, fmt::format("write {}", path_), errno);
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return ok();
}

Status TempFile::finish() {
  if (fd_) {
    if (::fsync(fd_.get()) != 0) {
      return makeError(Errc::System, fmt::format("fsync {}", path_), errno);
    }
    fd_.reset();
  }
  return ok();
}

Result<std::string> Store::defaultRoot() {
  ML_ASSIGN_OR_RETURN(std::string cache, cacheDir());
  return cache + "/images";
}

Result<Store> Store::open(const std::string& root) {
  for (const char* sub : {"", "/blobs/sha256", "/rootfs", "/tmp", "/locks"}) {
    ML_RETURN_IF_ERROR(makeDirs(root + sub, 0700));
  }
  const std::string db_path = root + "/metadata.db";
  ML_ASSIGN_OR_RETURN(state::InitLock init_lock, state::InitLock::acquire(db_path));
  {
    // Create the file 0600 before SQLite does (it would use the umask).
    ML_ASSIGN_OR_RETURN(Fd created, openFile(db_path, O_RDWR | O_CREAT, 0600));
  }
  ML_ASSIGN_OR_RETURN(state::Db db, state::Db::open(db_path));
  std::vector<state::Migration> migrations{{1, "images", std::string(kSchemaV1)}};
  auto migrated = state::migrate(db, migrations);
  if (!migrated) {
    return makeError(std::move(migrated).error().withContext("image metadata " + db_path));
  }
  return Store(root, std::move(db));
}

std::string Store::blobPath(const Digest& digest) const {
  return fmt::format("{}/blobs/{}/{}", root_, digest.algo, digest.hex);
}

bool Store::hasBlob(const Digest& digest) const {
  return ::access(blobPath(digest).c_str(), F_OK) == 0;
}

Result<std::string> Store::readBlob(const Digest& digest) const {
  auto data = readFile(blobPath(digest));
  if (!data) {
    return makeError(std::move(data).error().withContext("blob " + digest.str()));
  }
  Digest got = digestOf(*data);
  if (got != digest) {
    return makeError(Errc::Internal,
                     fmt::format("stored blob {} is corrupt (content hashes to {}); run `matchlock "
                                 "image rm` on the images using it and pull again",
                                 digest.str(), got.str()));
  }
  return data;
}

Result<TempFile> Store::createTemp(std::string_view hint) {
  std::string pattern = fmt::format("{}/{}.XXXXXX", tmpDir(), hint);
  int fd = ::mkostemp(pattern.data(), O_CLOEXEC);
  if (fd < 0) {
    return makeError(Errc::System, "mkostemp " + pattern, errno);
  }
  return TempFile(Fd(fd), pattern);
}

Status Store::commitBlob(TempFile& temp, const Digest& computed, const Digest& expected) {
  if (computed != expected) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("digest mismatch: expected {}, content hashes to {}; the blob "
                                 "was discarded",
                                 expected.str(), computed.str()));
  }
  ML_RETURN_IF_ERROR(temp.finish());
  const std::string dest = blobPath(expected);
  if (::access(dest.c_str(), F_OK) == 0) {
    return ok();  // someone else stored the same content; the temp file is dropped
  }
  if (::rename(temp.path().c_str(), dest.c_str()) != 0) {
    return makeError(Errc::System, fmt::format("rename {} -> {}", temp.path(), dest), errno);
  }
  temp.release();
  return ok();
}

Result<Digest> Store::putBlob(std::string_view data, const std::optional<Digest>& expected) {
  Digest computed = digestOf(data);
  const Digest& want = expected.has_value() ? *expected : computed;
  if (hasBlob(want) && computed == want) {
    return computed;
  }
  ML_ASSIGN_OR_RETURN(TempFile temp, createTemp("blob"));
  ML_RETURN_IF_ERROR(temp.write(data));
  ML_RETURN_IF_ERROR(commitBlob(temp, computed, want));
  return computed;
}

Result<FileLock> Store::lockDigest(const Digest& digest) const {
  return FileLock::acquire(fmt::format("{}/locks/{}.lock", root_, digest.hex),
                           FileLock::Mode::Exclusive);
}

Result<FileLock> Store::lockStore(FileLock::Mode mode) const {
  return FileLock::acquire(root_ + "/store.lock", mode);
}

Status Store::saveImage(const ImageRecord& record) {
  ML_ASSIGN_OR_RETURN(state::Transaction tx, state::Transaction::begin(db_));
  {
    ML_ASSIGN_OR_RETURN(state::Statement del, db_.prepare("DELETE FROM images WHERE name = ?"));
    ML_RETURN_IF_ERROR(del.bindAll(record.name));
    ML_RETURN_IF_ERROR(del.run());
  }
  {
    ML_ASSIGN_OR_RETURN(state::Statement ins,
                        db_.prepare("INSERT INTO images(name, manifest_digest, config_digest, "
                                    "source, platform, size, created_at) VALUES (?,?,?,?,?,?,?)"));
    ML_RETURN_IF_ERROR(ins.bindAll(record.name, record.manifest_digest, record.config_digest,
                                   record.source, record.platform, record.size,
                                   record.created_at.empty() ? nowTimestamp() : record.created_at));
    ML_RETURN_IF_ERROR(ins.run());
  }
  ML_ASSIGN_OR_RETURN(state::Statement layer,
                      db_.prepare("INSERT INTO image_layers(name, ordinal, digest, media_type, "
                                  "size) VALUES (?,?,?,?,?)"));
  for (size_t i = 0; i < record.layers.size(); ++i) {
    const LayerRecord& l = record.layers[i];
    ML_RETURN_IF_ERROR(layer.reset());
    ML_RETURN_IF_ERROR(
        layer.bindAll(record.name, static_cast<int64_t>(i), l.digest, l.media_type, l.size));
    ML_RETURN_IF_ERROR(layer.run());
  }
  return tx.commit();
}

Result<std::vector<LayerRecord>> Store::layersOf(const std::string& name) {
  ML_ASSIGN_OR_RETURN(state::Statement q,
                      db_.prepare("SELECT digest, media_type, size FROM image_layers WHERE name = "
                                  "? ORDER BY ordinal"));
  ML_RETURN_IF_ERROR(q.bindAll(name));
  std::vector<LayerRecord> out;
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, q.step());
    if (!row) {
      break;
    }
    out.push_back(LayerRecord{q.columnText(0), q.columnText(1), q.columnInt64(2)});
  }
  return out;
}

Result<std::vector<ImageRecord>> Store::listImages() {
  ML_ASSIGN_OR_RETURN(state::Statement q,
                      db_.prepare("SELECT name, manifest_digest, config_digest, source, platform, "
                                  "size, created_at FROM images ORDER BY name"));
  std::vector<ImageRecord> out;
  for (;;) {
    ML_ASSIGN_OR_RETURN(bool row, q.step());
    if (!row) {
      break;
    }
    ImageRecord r;
    r.name = q.columnText(0);
    r.manifest_digest = q.columnText(1);
    r.config_digest = q.columnText(2);
    r.source = q.columnText(3);
    r.platform = q.columnText(4);
    r.size = q.columnInt64(5);
    r.created_at = q.columnText(6);
    out.push_back(std::move(r));
  }
  for (ImageRecord& r : out) {
    ML_ASSIGN_OR_RETURN(r.layers, layersOf(r.name));
  }
  return out;
}

Result<std::optional<ImageRecord>> Store::findImage(std::string_view name) {
  ML_ASSIGN_OR_RETURN(std::vector<ImageRecord> all, listImages());
  for (ImageRecord& r : all) {
    if (r.name == name) {
      return std::optional<ImageRecord>(std::move(r));
    }
  }
  return std::optional<ImageRecord>();
}

Result<ImageRecord> Store::resolveImage(std::string_view name) {
  std::vector<std::string> candidates{std::string(name)};
  if (auto local = normalizeLocalName(name)) {
    candidates.push_back(*local);
  }
  if (auto ref = parseReference(name, defaultRegistry())) {
    candidates.push_back(ref->str());
  }
  for (const std::string& c : candidates) {
    ML_ASSIGN_OR_RETURN(std::optional<ImageRecord> found, findImage(c));
    if (found) {
      return std::move(*found);
    }
  }
  return makeError(Errc::NotFound, fmt::format("image '{}' not found in the local store", name));
}

Status Store::removeImage(std::string_view name) {
  ML_ASSIGN_OR_RETURN(ImageRecord record, resolveImage(name));
  ML_ASSIGN_OR_RETURN(state::Transaction tx, state::Transaction::begin(db_));
  ML_ASSIGN_OR_RETURN(state::Statement del, db_.prepare("DELETE FROM images WHERE name = ?"));
  ML_RETURN_IF_ERROR(del.bindAll(record.name));
  ML_RETURN_IF_ERROR(del.run());
  return tx.commit();
}

Result<GcReport> Store::gc() {
  ML_ASSIGN_OR_RETURN(FileLock lock, lockStore(FileLock::Mode::Exclusive));
  ML_ASSIGN_OR_RETURN(std::vector<ImageRecord> images, listImages());
  std::set<std::string> live_hex;
  for (const ImageRecord& r : images) {
    for (const std::string* d : {&r.manifest_digest, &r.config_digest}) {
      if (auto digest = parseDigest(*d)) {
        live_hex.insert(digest->hex);
      }
    }
    for (const LayerRecord& l : r.layers) {
      if (auto digest = parseDigest(l.digest)) {
        live_hex.insert(digest->hex);
      }
    }
  }
  GcReport report;
  const std::string blob_dir = root_ + "/blobs/sha256";
  for (const std::string& name : listDir(blob_dir)) {
    if (live_hex.count(name) != 0) {
      continue;
    }
    std::string path = blob_dir + "/" + name;
    int64_t size = fileSize(path);
    if (::unlink(path.c_str()) == 0) {
      ++report.removed_blobs;
      report.freed_bytes += size;
    }
  }
  for (const std::string& name : listDir(rootfsDir())) {
    std::string hex = name.substr(0, name.find('-'));
    if (live_hex.count(hex) != 0) {
      continue;
    }
    std::string path = rootfsDir() + "/" + name;
    int64_t size = fileSize(path);
    if (::unlink(path.c_str()) == 0) {
      ++report.removed_rootfs;
      report.freed_bytes += size;
    }
  }
  // Temp files: writers hold the store lock shared, so with it held exclusively none is in use.
  for (const std::string& name : listDir(tmpDir())) {
    std::string path = tmpDir() + "/" + name;
    int64_t size = fileSize(path);
    if (::unlink(path.c_str()) == 0) {
      ++report.removed_temp;
      report.freed_bytes += size;
    }
  }
  return report;
}

}  // namespace matchlock::image
