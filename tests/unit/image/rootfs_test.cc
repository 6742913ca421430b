// SPDX-License-Identifier: Apache-2.0
#include "image/rootfs.h"

#include <archive.h>
#include <archive_entry.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "common/cptr.h"
#include "common/fd.h"
#include "image/digest.h"
#include "image/image.h"

// Tar entries are written as designated initializers that leave most fields defaulted.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace matchlock::image {
namespace {

using WriterPtr = CPtr<archive, &archive_write_free>;
using EntryPtr = CPtr<archive_entry, &archive_entry_free>;

struct TarEntry {
  std::string path;
  unsigned type = AE_IFREG;
  unsigned mode = 0644;
  int64_t uid = 0;
  int64_t gid = 0;
  std::string data;
  std::string symlink;
  std::string hardlink;
};

class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "ml-rootfs-test.XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

LayerSource writeTar(const TempDir& dir, const std::string& name,
                     const std::vector<TarEntry>& entries, bool gzip = false) {
  std::string path = dir.path() + "/" + name;
  WriterPtr w(archive_write_new());
  REQUIRE(archive_write_set_format_pax_restricted(w.get()) == ARCHIVE_OK);
  if (gzip) {
    REQUIRE(archive_write_add_filter_gzip(w.get()) == ARCHIVE_OK);
  }
  REQUIRE(archive_write_open_filename(w.get(), path.c_str()) == ARCHIVE_OK);
  for (const TarEntry& t : entries) {
    EntryPtr e(archive_entry_new());
    archive_entry_set_pathname(e.get(), t.path.c_str());
    archive_entry_set_filetype(e.get(), t.type);
    archive_entry_set_perm(e.get(), t.mode);
    archive_entry_set_uid(e.get(), t.uid);
    archive_entry_set_gid(e.get(), t.gid);
    archive_entry_set_mtime(e.get(), 1700000000, 0);
    if (!t.symlink.empty()) {
      archive_entry_set_symlink(e.get(), t.symlink.c_str());
    }
    if (!t.hardlink.empty()) {
      archive_entry_set_hardlink(e.get(), t.hardlink.c_str());
    }
    if (t.type == AE_IFREG && t.hardlink.empty()) {
      archive_entry_set_size(e.get(), static_cast<la_int64_t>(t.data.size()));
    }
    REQUIRE(archive_write_header(w.get(), e.get()) == ARCHIVE_OK);
    if (!t.data.empty()) {
      REQUIRE(archive_write_data(w.get(), t.data.data(), t.data.size()) ==
              static_cast<la_ssize_t>(t.data.size()));
    }
  }
  REQUIRE(archive_write_close(w.get()) == ARCHIVE_OK);
  return LayerSource{path, "sha256:test-" + name};
}

std::map<std::string, MergedEntry> byPath(const std::vector<MergedEntry>& entries) {
  std::map<std::string, MergedEntry> out;
  for (const MergedEntry& e : entries) {
    out[e.path] = e;
  }
  return out;
}

TEST_CASE("merge: whiteouts, opaque directories, hard links, owners and modes") {
  TempDir dir;
  std::vector<LayerSource> layers{
      writeTar(dir, "l1.tar",
               {{.path = "etc/", .type = AE_IFDIR, .mode = 0755},
                {.path = "etc/gone", .data = "x"},
                {.path = "etc/kept", .data = "k"},
                {.path = "opq/", .type = AE_IFDIR, .mode = 0755},
                {.path = "opq/old", .data = "old"},
                {.path = "bin/su", .mode = 04755, .data = "su"},
                {.path = "home/u/f", .mode = 0600, .uid = 1000, .gid = 1001, .data = "f"},
                {.path = "a", .data = "linked"},
                {.path = "b", .hardlink = "a"},
                {.path = "lnk", .type = AE_IFLNK, .mode = 0777, .symlink = "/etc/kept"}},
               true),
      writeTar(dir, "l2.tar",
               {{.path = "./etc/.wh.gone"},
                {.path = "same", .data = "kept"},
                {.path = ".wh.same"},
                {.path = "opq/.wh..wh..opq"},
                {.path = "opq/new", .data = "new"},
                {.path = "./.wh.lnk"}}),
  };
  auto merged = mergeLayers(layers);
  REQUIRE(merged);
  auto m = byPath(*merged);
  CHECK(m.count("/etc/gone") == 0);
  CHECK(m.count("/etc/kept") == 1);
  CHECK(m.count("/opq/old") == 0);
  CHECK(m.count("/opq/new") == 1);
  CHECK(m.count("/lnk") == 0);
  CHECK(m.count("/same") == 1);  // a whiteout does not hide its own layer's entry
  CHECK(m.at("/bin/su").mode == (S_IFREG | 04755));
  CHECK(m.at("/home/u/f").uid == 1000);
  CHECK(m.at("/home/u/f").gid == 1001);
  CHECK(m.at("/home").mode == (S_IFDIR | 0755));  // implicit parent
  CHECK(m.at("/a").inode == m.at("/b").inode);
}

TEST_CASE("merge: hostile layers are rejected with the layer and entry named") {
  TempDir dir;
  auto check = [&](const std::vector<TarEntry>& entries, const std::string& expect) {
    std::vector<LayerSource> layers{writeTar(dir, "bad.tar", entries)};
    auto merged = mergeLayers(layers);
    REQUIRE_FALSE(merged);
    CHECK(merged.error().code() == Errc::InvalidSpec);
    INFO(merged.error().message());
    CHECK(merged.error().message().find("sha256:test-bad.tar") != std::string::npos);
    CHECK(merged.error().message().find(expect) != std::string::npos);
  };
  check({{.path = "../../etc/passwd", .data = "x"}}, "path traversal");
  check({{.path = "ok/../../x", .data = "x"}}, "path traversal");
  check({{.path = "/etc/passwd", .data = "x"}}, "absolute path");
  check({{.path = "esc", .type = AE_IFLNK, .mode = 0777, .symlink = "/etc"},
         {.path = "esc/passwd", .data = "x"}},
        "is a symlink");
  check({{.path = "h", .hardlink = "../outside"}}, "path traversal");
  check({{.path = "h", .hardlink = "missing"}}, "hard link to missing");
}

TEST_CASE("buildExt4 writes an image with libext2fs, without root") {
  if (::access("/sbin/mke2fs", X_OK) != 0 && ::access("/usr/sbin/mke2fs", X_OK) != 0) {
    WARN("mke2fs not installed: skipped");
    return;
  }
  TempDir dir;
  std::vector<LayerSource> layers{
      writeTar(dir, "l.tar",
               {{.path = "bin/su", .mode = 04755, .data = "su"},
                {.path = "big", .data = std::string(300000, 'z')},
                {.path = "c", .hardlink = "big"},
                {.path = "dev/null", .type = AE_IFCHR, .mode = 0666},
                {.path = "l", .type = AE_IFLNK, .mode = 0777, .symlink = std::string(200, 'p')}})};
  std::string out = dir.path() + "/root.ext4";
  auto built = buildExt4(layers, out, dir.path());
  REQUIRE(built);
  struct stat st {};
  REQUIRE(::stat(out.c_str(), &st) == 0);
  CHECK(st.st_size > 0);
  CHECK((st.st_mode & 0777) == 0444);
  // Only the finished image remains: the work file was renamed.
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    (void)e;
    ++files;
  }
  CHECK(files == 2);
}

TEST_CASE("prepareImage: local record, runtime config and cached rootfs") {
  if (::access("/sbin/mke2fs", X_OK) != 0 && ::access("/usr/sbin/mke2fs", X_OK) != 0) {
    WARN("mke2fs not installed: skipped");
    return;
  }
  ::unsetenv("MATCHLOCK_DEFAULT_REGISTRY");
  TempDir dir;
  auto store = Store::open(dir.path() + "/images");
  REQUIRE(store);
  LayerSource layer = writeTar(dir, "l.tar", {{.path = "bin/true", .mode = 0755, .data = "x"}});
  auto layer_data = readFile(layer.path);
  REQUIRE(layer_data);
  auto layer_digest = store->putBlob(*layer_data);
  auto config_digest = store->putBlob(
      R"({"os":"linux","architecture":"amd64","config":{"Cmd":["/bin/true"],"User":"7"}})");
  auto manifest_digest = store->putBlob("{}");
  REQUIRE((layer_digest && config_digest && manifest_digest));
  ImageRecord r;
  r.name = "local/img:latest";
  r.manifest_digest = manifest_digest->str();
  r.config_digest = config_digest->str();
  r.source = "import";
  r.platform = "linux/amd64";
  r.layers.push_back(LayerRecord{layer_digest->str(), "application/vnd.oci.image.layer.v1.tar",
                                 static_cast<int64_t>(layer_data->size())});
  REQUIRE(store->saveImage(r));

  auto prepared = prepareImage(*store, "local/img", PullOptions{});
  REQUIRE(prepared);
  CHECK(prepared->record.name == "local/img:latest");
  CHECK(prepared->config.cmd == std::vector<std::string>{"/bin/true"});
  CHECK(prepared->config.user == "7");
  CHECK(::access(prepared->rootfs.c_str(), R_OK) == 0);
  auto again = prepareImage(*store, "local/img:latest", PullOptions{});
  REQUIRE(again);
  CHECK(again->rootfs == prepared->rootfs);

  // Not stored and no registry in the name: the reference error, not a network attempt.
  auto missing = prepareImage(*store, "other", PullOptions{});
  REQUIRE_FALSE(missing);
  CHECK(missing.error().message().find("no default registry") != std::string::npos);
}

}  // namespace
}  // namespace matchlock::image
