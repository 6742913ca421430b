// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/fd.h"
#include "common/file_lock.h"
#include "common/result.h"
#include "image/digest.h"
#include "state/db.h"

namespace matchlock::image {

using matchlock::FileLock;

struct LayerRecord {
  std::string digest;
  std::string media_type;
  int64_t size = 0;
};

/// One named image in the store. `name` is the key: `host/repo:tag` for pulled images (exactly the
/// canonical reference), `name:tag` for imported ones.
struct ImageRecord {
  std::string name;
  std::string manifest_digest;
  std::string config_digest;
  std::string source;    // "registry" or "import"
  std::string platform;  // "linux/amd64"
  int64_t size = 0;      // sum of the (compressed) layer sizes
  std::string created_at;
  std::vector<LayerRecord> layers;
};

struct GcReport {
  int removed_blobs = 0;
  int removed_rootfs = 0;
  int removed_temp = 0;
  int64_t freed_bytes = 0;
};

/// A temp file in the store's tmp/ directory; removed on destruction unless committed.
class TempFile {
 public:
  TempFile(Fd fd, std::string path) : fd_(std::move(fd)), path_(std::move(path)) {}
  TempFile(TempFile&& other) noexcept
      : fd_(std::move(other.fd_)), path_(std::exchange(other.path_, std::string())) {}
  TempFile& operator=(TempFile&&) = delete;
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile();

  int fd() const { return fd_.get(); }
  const std::string& path() const { return path_; }
  /// Writes all of `data` (EINTR-safe).
  [[nodiscard]] Status write(std::string_view data);
  /// fsyncs and closes; the path stays owned (and removed on destruction unless released).
  [[nodiscard]] Status finish();
  /// Forgets the path (after it was renamed away).
  void release() { path_.clear(); }

 private:
  Fd fd_;
  std::string path_;
};

/// The content-addressed image store under `<cache>/images` (docs/images.md):
///
///   blobs/sha256/<hex>   manifests, configs and layers exactly as pulled/imported
///   rootfs/<hex>-v<N>.ext4  the read-only rootfs disk per manifest digest
///   tmp/                 partial downloads and disks being built (never read as content)
///   locks/<hex>.lock     flock per digest (serializes fetch/build of the same content)
///   store.lock           shared by writers, exclusive by gc
///   metadata.db          SQLite: images, image_layers
///
/// A blob appears under blobs/ only by rename() after its digest was verified, so a reader never
/// sees a half-written or corrupt blob.
class Store {
 public:
  /// `<cacheDir()>/images`.
  [[nodiscard]] static Result<std::string> defaultRoot();
  [[nodiscard]] static Result<Store> open(const std::string& root);

  Store(Store&&) noexcept = default;
  Store& operator=(Store&&) noexcept = default;
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;
  ~Store() = default;

  const std::string& root() const { return root_; }
  std::string blobPath(const Digest& digest) const;
  bool hasBlob(const Digest& digest) const;
  /// Reads a blob and re-verifies its digest (for small documents: manifests and configs).
  [[nodiscard]] Result<std::string> readBlob(const Digest& digest) const;

  [[nodiscard]] Result<TempFile> createTemp(std::string_view hint);
  /// Verifies that `computed` equals `expected`, fsyncs and renames the temp file into blobs/.
  /// On mismatch the temp file is removed and InvalidSpec "digest mismatch" is returned.
  [[nodiscard]] Status commitBlob(TempFile& temp, const Digest& computed, const Digest& expected);
  /// Stores `data`; verifies it against `expected` when given.
  [[nodiscard]] Result<Digest> putBlob(std::string_view data,
                                       const std::optional<Digest>& expected = std::nullopt);

  /// Exclusive lock for fetching or building content with this digest.
  [[nodiscard]] Result<FileLock> lockDigest(const Digest& digest) const;
  /// Writers hold this shared for the whole operation; gc holds it exclusively.
  [[nodiscard]] Result<FileLock> lockStore(FileLock::Mode mode) const;

  [[nodiscard]] Status saveImage(const ImageRecord& record);
  [[nodiscard]] Result<std::optional<ImageRecord>> findImage(std::string_view name);
  /// Finds `name` as given, then with ":latest", then as a parsed registry reference.
  [[nodiscard]] Result<ImageRecord> resolveImage(std::string_view name);
  [[nodiscard]] Result<std::vector<ImageRecord>> listImages();
  /// NotFound when absent.
  [[nodiscard]] Status removeImage(std::string_view name);
  /// Deletes blobs and rootfs disks no image references, and stale temp files.
  [[nodiscard]] Result<GcReport> gc();

  std::string rootfsDir() const { return root_ + "/rootfs"; }
  std::string tmpDir() const { return root_ + "/tmp"; }

 private:
  Store(std::string root, state::Db db) : root_(std::move(root)), db_(std::move(db)) {}
  [[nodiscard]] Result<std::vector<LayerRecord>> layersOf(const std::string& name);

  std::string root_;
  state::Db db_;
};

/// RFC 3339 UTC timestamp of now ("2026-01-02T03:04:05Z").
std::string nowTimestamp();

}  // namespace matchlock::image
