// SPDX-License-Identifier: Apache-2.0
// The host provider against a real tree under /tmp: semantics, read-only refusals, ownership and
// the containment attacks of docs/vfs.md. Runs as root (devices, chown).
#include <dirent.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "common/fd.h"
#include "vfs/provider.h"

namespace matchlock::vfs {
// Defined in host_provider.cc.
Ret<ProviderPtr> makeHostProviderForTest(Fd root, bool read_only, const Caller& guest_owner,
                                         size_t max_nodes, size_t max_handles);
}  // namespace matchlock::vfs

namespace {

namespace fs = std::filesystem;
using matchlock::Fd;
using namespace matchlock::vfs;

const Caller kGuest{1000, 1000, 1};
constexpr char kSecret[] = "outside secret\n";

void writeHost(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
  REQUIRE(out.good());
}

std::string readHost(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct stat lstatHost(const std::string& path) {
  struct stat st {};
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st;
}

bool existsHost(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// Everything about a tree that an escape could change: names, types, modes, owners, sizes,
// times, contents and link targets.
std::string snapshot(const std::string& dir) {
  std::vector<std::string> lines;
  auto describe = [&](const fs::path& p) {
    struct stat st = lstatHost(p.string());
    std::ostringstream line;
    line << fs::relative(p, dir).string() << ' ' << std::oct << st.st_mode << std::dec << ' '
         << st.st_uid << ':' << st.st_gid << ' ' << st.st_nlink << ' ' << st.st_size << ' '
         << st.st_mtim.tv_sec << '.' << st.st_mtim.tv_nsec << ' ' << st.st_ctim.tv_sec << '.'
         << st.st_ctim.tv_nsec;
    if (S_ISREG(st.st_mode)) {
      line << " [" << readHost(p.string()) << ']';
    } else if (S_ISLNK(st.st_mode)) {
      line << " -> " << fs::read_symlink(p).string();
    }
    lines.push_back(line.str());
  };
  describe(dir);
  for (const auto& e : fs::recursive_directory_iterator(dir)) {  // does not follow symlinks
    describe(e.path());
  }
  std::sort(lines.begin(), lines.end());
  std::string out;
  for (const auto& l : lines) {
    out += l + '\n';
  }
  return out;
}

// base/root is served; base/outside is a sentinel next to it that nothing may touch.
struct Tree {
  std::string base;
  std::string root;
  std::string outside;
  std::string outside_before;

  Tree() {
    base = (fs::temp_directory_path() / "ml-vfs-host-test.XXXXXX").string();
    REQUIRE(::mkdtemp(base.data()) != nullptr);
    root = base + "/root";
    outside = base + "/outside";
    REQUIRE(::mkdir(root.c_str(), 0755) == 0);
    REQUIRE(::mkdir(outside.c_str(), 0755) == 0);
    REQUIRE(::mkdir((outside + "/dir").c_str(), 0755) == 0);
    writeHost(outside + "/secret", kSecret);
    writeHost(outside + "/dir/inner", "inner\n");
    outside_before = snapshot(outside);
  }
  ~Tree() {
    std::error_code ec;
    fs::remove_all(base, ec);
  }
  Tree(const Tree&) = delete;
  Tree& operator=(const Tree&) = delete;

  std::string at(const std::string& rel) const { return root + "/" + rel; }
  void checkOutsideUntouched() const { CHECK(snapshot(outside) == outside_before); }

  ProviderPtr provider(bool read_only = false, size_t max_nodes = size_t{1} << 20,
                       size_t max_handles = 4096) const {
    Fd fd(::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    REQUIRE(fd);
    auto p = makeHostProviderForTest(std::move(fd), read_only, kGuest, max_nodes, max_handles);
    REQUIRE(p);
    return std::move(*p);
  }
};

Entry lookupOk(Provider& p, uint64_t parent, const std::string& name) {
  auto e = p.lookup(parent, name);
  INFO("lookup " << name);
  REQUIRE(e);
  return *e;
}

std::string readAll(Provider& p, uint64_t fh, uint64_t offset = 0, size_t size = 1 << 16) {
  std::string out;
  REQUIRE(p.read(fh, offset, size, out));
  return out;
}

struct Listed {
  std::string name;
  uint64_t ino;
  uint32_t type;
  uint64_t next;
};

// Lists from `offset`, at most `limit` entries.
std::vector<Listed> list(Provider& p, uint64_t dh, uint64_t offset = 0, size_t limit = SIZE_MAX) {
  std::vector<Listed> out;
  auto r = p.readdir(dh, offset, [&](const DirEntry& e) {
    if (out.size() >= limit) {
      return false;
    }
    out.push_back({std::string(e.name), e.ino, e.type, e.next});
    return true;
  });
  REQUIRE(r);
  return out;
}

SetAttr modeAttr(uint32_t mode) {
  SetAttr a;
  a.valid = FATTR_MODE;
  a.mode = mode;
  return a;
}

TEST_CASE("host: lookup and getattr report host objects with stable node ids", "[vfs][host]") {
  Tree t;
  writeHost(t.at("file"), "hello");
  REQUIRE(::mkdir(t.at("dir").c_str(), 0750) == 0);
  auto p = t.provider();

  auto root = p->getattr(p->rootNode());
  REQUIRE(root);
  CHECK(S_ISDIR(root->st_mode));
  CHECK(root->st_ino == lstatHost(t.root).st_ino);

  Entry file = lookupOk(*p, p->rootNode(), "file");
  CHECK(S_ISREG(file.attr.st_mode));
  CHECK(file.attr.st_size == 5);
  CHECK(file.attr.st_ino == lstatHost(t.at("file")).st_ino);
  CHECK(file.node != p->rootNode());
  CHECK(lookupOk(*p, p->rootNode(), "file").node == file.node);

  Entry dir = lookupOk(*p, p->rootNode(), "dir");
  CHECK(S_ISDIR(dir.attr.st_mode));
  CHECK((dir.attr.st_mode & 07777) == 0750);
  CHECK(dir.node != file.node);

  CHECK(p->lookup(p->rootNode(), "missing").error() == ENOENT);
  CHECK(p->lookup(file.node, "x").error() == ENOTDIR);
  CHECK(p->getattr(9999).error() == ESTALE);

  // The host renaming an object keeps its node.
  REQUIRE(::rename(t.at("file").c_str(), t.at("dir/renamed").c_str()) == 0);
  CHECK(lookupOk(*p, dir.node, "renamed").node == file.node);
  auto after = p->getattr(file.node);
  REQUIRE(after);
  CHECK(after->st_size == 5);

  p->forget(file.node);
  CHECK(p->getattr(file.node).error() == ESTALE);
  Entry again = lookupOk(*p, dir.node, "renamed");
  CHECK(again.attr.st_ino == file.attr.st_ino);
  p->forget(p->rootNode());  // never forgotten
  CHECK(p->getattr(p->rootNode()));
  CHECK_FALSE(p->readOnly());
}

TEST_CASE("host: names that are not one component are refused", "[vfs][host]") {
  Tree t;
  auto p = t.provider();
  const uint64_t r = p->rootNode();
  CHECK(p->lookup(r, "..").error() == EINVAL);
  CHECK(p->lookup(r, ".").error() == EINVAL);
  CHECK(p->lookup(r, "").error() == ENOENT);
  CHECK(p->lookup(r, "../outside").error() == EINVAL);
  CHECK(p->lookup(r, "a/b").error() == EINVAL);
  CHECK(p->lookup(r, std::string("a\0b", 3)).error() == EINVAL);
  CHECK(p->lookup(r, std::string(256, 'a')).error() == ENAMETOOLONG);
  CHECK(p->create(r, "../outside/x", 0644, O_RDWR, kGuest).error() == EINVAL);
  CHECK(p->mkdir(r, "..", 0755, kGuest).error() == EINVAL);
  CHECK(p->symlink(r, "../escape", "x", kGuest).error() == EINVAL);
  CHECK(p->unlink(r, "../outside/secret").error() == EINVAL);
  CHECK(p->rmdir(r, "..").error() == EINVAL);
  CHECK(p->rename(r, "..", r, "x", 0).error() == EINVAL);
  CHECK(p->mknod(r, "../n", S_IFREG | 0644, 0, kGuest).error() == EINVAL);
  t.checkOutsideUntouched();
}

TEST_CASE("host: readdir lists everything with resumable offsets", "[vfs][host]") {
  Tree t;
  std::set<std::string> names;
  for (int i = 0; i < 300; ++i) {
    std::string name = "entry-with-a-fairly-long-name-" + std::to_string(i);
    writeHost(t.at(name), "");
    names.insert(name);
  }
  REQUIRE(::mkdir(t.at("sub").c_str(), 0755) == 0);
  names.insert("sub");
  auto p = t.provider();

  auto dh = p->opendir(p->rootNode());
  REQUIRE(dh);
  auto all = list(*p, *dh);
  std::set<std::string> seen;
  for (const auto& e : all) {
    CHECK(seen.insert(e.name).second);
  }
  CHECK(seen.count(".") == 1);
  CHECK(seen.count("..") == 1);
  seen.erase(".");
  seen.erase("..");
  CHECK(seen == names);

  // st_ino agrees with getattr; the root's ".." is the root itself, not the host parent.
  const ino_t root_ino = lstatHost(t.root).st_ino;
  for (const auto& e : all) {
    if (e.name == "." || e.name == "..") {
      CHECK(e.ino == root_ino);
    } else if (e.name == "sub") {
      CHECK(e.type == DT_DIR);
      CHECK(e.ino == lookupOk(*p, p->rootNode(), "sub").attr.st_ino);
    } else if (e.name == "entry-with-a-fairly-long-name-7") {
      CHECK(e.type == DT_REG);
      CHECK(e.ino == lookupOk(*p, p->rootNode(), e.name).attr.st_ino);
    }
  }

  // Pages of 7: each resumes at the previous page's last `next`.
  std::vector<std::string> paged;
  uint64_t offset = 0;
  for (;;) {
    auto page = list(*p, *dh, offset, 7);
    if (page.empty()) {
      break;
    }
    for (const auto& e : page) {
      paged.push_back(e.name);
    }
    offset = page.back().next;
  }
  std::vector<std::string> all_names;
  for (const auto& e : all) {
    all_names.push_back(e.name);
  }
  CHECK(paged == all_names);

  // An earlier offset replays from there (seekdir).
  auto from10 = list(*p, *dh, all[9].next);
  REQUIRE(from10.size() == all.size() - 10);
  CHECK(from10.front().name == all[10].name);
  CHECK(list(*p, *dh, 0).size() == all.size());

  auto sub = lookupOk(*p, p->rootNode(), "sub");
  auto sdh = p->opendir(sub.node);
  REQUIRE(sdh);
  for (const auto& e : list(*p, *sdh)) {
    if (e.name == "..") {
      CHECK(e.ino == root_ino);
    } else {
      CHECK(e.name == ".");
      CHECK(e.ino == sub.attr.st_ino);
    }
  }
  p->releasedir(*sdh);
  p->releasedir(*dh);
  CHECK(p->readdir(*dh, 0, [](const DirEntry&) { return true; }).error() == EBADF);
  CHECK(p->opendir(lookupOk(*p, p->rootNode(), "entry-with-a-fairly-long-name-1").node).error() ==
        ENOTDIR);
}

TEST_CASE("host: create, write, read, append, truncate, fsync, release", "[vfs][host]") {
  Tree t;
  auto p = t.provider();
  const uint64_t r = p->rootNode();

  auto c = p->create(r, "new", 0640, O_RDWR | O_EXCL, kGuest);
  REQUIRE(c);
  auto [entry, fh] = *c;
  CHECK(S_ISREG(entry.attr.st_mode));
  CHECK((entry.attr.st_mode & 07777) == 0640);
  CHECK((lstatHost(t.at("new")).st_mode & 07777) == 0640);
  CHECK(lookupOk(*p, r, "new").node == entry.node);
  CHECK(p->create(r, "new", 0640, O_RDWR | O_EXCL, kGuest).error() == EEXIST);

  auto w = p->write(fh, 0, "hello world");
  REQUIRE(w);
  CHECK(*w == 11);
  CHECK(readAll(*p, fh) == "hello world");
  CHECK(readAll(*p, fh, 6, 3) == "wor");
  CHECK(readAll(*p, fh, 100).empty());
  REQUIRE(p->flush(fh));
  REQUIRE(p->fsync(fh, false));
  REQUIRE(p->fsync(fh, true));
  p->release(fh);
  CHECK(readHost(t.at("new")) == "hello world");
  std::string gone;
  CHECK(p->read(fh, 0, 1, gone).error() == EBADF);
  CHECK(p->write(fh, 0, "x").error() == EBADF);

  // create without O_EXCL opens the existing file, O_TRUNC included.
  auto again = p->create(r, "new", 0600, O_RDWR | O_TRUNC, kGuest);
  REQUIRE(again);
  CHECK(again->first.node == entry.node);
  CHECK(readHost(t.at("new")).empty());
  CHECK((lstatHost(t.at("new")).st_mode & 07777) == 0640);  // an existing file keeps its mode
  p->release(again->second);

  // O_APPEND handles write at the end whatever the offset.
  writeHost(t.at("log"), "one\n");
  Entry log = lookupOk(*p, r, "log");
  auto ah = p->open(log.node, O_WRONLY | O_APPEND);
  REQUIRE(ah);
  REQUIRE(p->write(*ah, 0, "two\n"));
  REQUIRE(p->write(*ah, 0, "three\n"));
  p->release(*ah);
  CHECK(readHost(t.at("log")) == "one\ntwo\nthree\n");

  // Truncate through a handle and by node.
  auto rw = p->open(log.node, O_RDWR);
  REQUIRE(rw);
  SetAttr size;
  size.valid = FATTR_SIZE | FATTR_FH;
  size.size = 3;
  auto st = p->setattr(log.node, size, *rw);
  REQUIRE(st);
  CHECK(st->st_size == 3);
  CHECK(readHost(t.at("log")) == "one");
  size.valid = FATTR_SIZE;
  size.size = 1;
  REQUIRE(p->setattr(log.node, size, 0));
  CHECK(readHost(t.at("log")) == "o");
  size.size = 4096;
  REQUIRE(p->setattr(log.node, size, 0));
  CHECK(lstatHost(t.at("log")).st_size == 4096);
  CHECK(p->setattr(log.node, size, 12345).error() == EBADF);
  CHECK(p->setattr(r, size, 0).error() == EISDIR);
  p->release(*rw);

  // A read-only handle cannot write.
  auto ro = p->open(log.node, O_RDONLY);
  REQUIRE(ro);
  CHECK(p->write(*ro, 0, "x").error() == EBADF);
  p->release(*ro);
  CHECK(p->open(log.node, O_ACCMODE).error() == EINVAL);
  CHECK(p->open(r, O_RDONLY).error() == EISDIR);
}

TEST_CASE("host: fallocate, SEEK_DATA and SEEK_HOLE", "[vfs][host]") {
  Tree t;
  auto p = t.provider();
  auto c = p->create(p->rootNode(), "f", 0644, O_RDWR, kGuest);
  REQUIRE(c);
  const uint64_t fh = c->second;
  REQUIRE(p->write(fh, 0, std::string(4096, 'x')));
  REQUIRE(p->fallocate(fh, 0, 0, 8192));
  CHECK(lstatHost(t.at("f")).st_size == 8192);
  REQUIRE(p->fallocate(fh, FALLOC_FL_KEEP_SIZE, 8192, 8192));
  CHECK(lstatHost(t.at("f")).st_size == 8192);
  CHECK(p->fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096).error() ==
        EOPNOTSUPP);
  auto data = p->lseek(fh, 0, SEEK_DATA);
  REQUIRE(data);
  CHECK(*data == 0);
  auto hole = p->lseek(fh, 0, SEEK_HOLE);
  REQUIRE(hole);
  CHECK(*hole <= 8192);
  CHECK(p->lseek(fh, 0, SEEK_SET).error() == EINVAL);
  CHECK(p->lseek(fh, 1 << 20, SEEK_DATA).error() == ENXIO);
  p->release(fh);
  CHECK(p->lseek(fh, 0, SEEK_DATA).error() == EBADF);
}

TEST_CASE("host: mkdir, rmdir, unlink and rename with flags", "[vfs][host]") {
  Tree t;
  auto p = t.provider();
  const uint64_t r = p->rootNode();

  auto d = p->mkdir(r, "d", 0755, kGuest);
  REQUIRE(d);
  CHECK(S_ISDIR(d->attr.st_mode));
  CHECK(S_ISDIR(lstatHost(t.at("d")).st_mode));
  CHECK(p->mkdir(r, "d", 0755, kGuest).error() == EEXIST);
  auto f = p->create(d->node, "f", 0644, O_WRONLY, kGuest);
  REQUIRE(f);
  p->release(f->second);
  CHECK(existsHost(t.at("d/f")));
  CHECK(p->rmdir(r, "d").error() == ENOTEMPTY);

  // Plain rename, then NOREPLACE and EXCHANGE.
  REQUIRE(p->rename(d->node, "f", r, "g", 0));
  CHECK(existsHost(t.at("g")));
  CHECK(lookupOk(*p, r, "g").node == f->first.node);
  writeHost(t.at("h"), "h");
  CHECK(p->rename(r, "g", r, "h", RENAME_NOREPLACE).error() == EEXIST);
  REQUIRE(p->rename(r, "g", r, "h", RENAME_EXCHANGE));
  CHECK(readHost(t.at("g")) == "h");
  CHECK(readHost(t.at("h")).empty());
  CHECK(p->rename(r, "g", r, "h", RENAME_WHITEOUT).error() == EINVAL);
  CHECK(p->rename(r, "g", r, "h", RENAME_NOREPLACE | RENAME_EXCHANGE).error() == EINVAL);
  REQUIRE(p->rename(r, "g", r, "h", 0));
  CHECK(readHost(t.at("h")) == "h");
  CHECK_FALSE(existsHost(t.at("g")));

  CHECK(p->unlink(r, "d").error() == EISDIR);
  REQUIRE(p->unlink(r, "h"));
  CHECK_FALSE(existsHost(t.at("h")));
  CHECK(p->unlink(r, "h").error() == ENOENT);
  CHECK(p->rmdir(r, "missing").error() == ENOENT);
  REQUIRE(p->rmdir(r, "d"));
  CHECK_FALSE(existsHost(t.at("d")));

  // link() never makes a host hard link.
  writeHost(t.at("a"), "a");
  Entry a = lookupOk(*p, r, "a");
  CHECK(p->link(a.node, r, "b").error() == EXDEV);
  CHECK_FALSE(existsHost(t.at("b")));
}

TEST_CASE("host: symlink stores the target verbatim and readlink returns it", "[vfs][host]") {
  Tree t;
  auto p = t.provider();
  const uint64_t r = p->rootNode();
  auto s = p->symlink(r, "abs", "/etc/passwd", kGuest);
  REQUIRE(s);
  CHECK(S_ISLNK(s->attr.st_mode));
  CHECK(fs::read_symlink(t.at("abs")) == "/etc/passwd");
  auto target = p->readlink(s->node);
  REQUIRE(target);
  CHECK(*target == "/etc/passwd");

  auto rel = p->symlink(r, "rel", "../outside/secret", kGuest);
  REQUIRE(rel);
  CHECK(*p->readlink(rel->node) == "../outside/secret");
  CHECK(p->symlink(r, "abs", "x", kGuest).error() == EEXIST);
  CHECK(p->symlink(r, "long", std::string(PATH_MAX, 'a'), kGuest).error() == ENAMETOOLONG);
  CHECK(p->symlink(r, "empty", "", kGuest).error() == ENOENT);
  CHECK(p->symlink(r, "nul", std::string("a\0b", 3), kGuest).error() == EINVAL);
  auto longest = p->symlink(r, "longest", std::string(PATH_MAX - 1, 'a'), kGuest);
  REQUIRE(longest);
  CHECK(p->readlink(longest->node)->size() == PATH_MAX - 1);
  CHECK(p->readlink(r).error() == EINVAL);

  // The link itself, not its target, gets times; chmod of a link is not supported.
  CHECK(p->setattr(s->node, modeAttr(0777), 0).error() == EOPNOTSUPP);
  SetAttr times;
  times.valid = FATTR_MTIME;
  times.mtime = {1000000, 0};
  REQUIRE(p->setattr(s->node, times, 0));
  CHECK(lstatHost(t.at("abs")).st_mtim.tv_sec == 1000000);
  CHECK(lstatHost("/etc/passwd").st_mtim.tv_sec != 1000000);
  t.checkOutsideUntouched();
}

TEST_CASE("host: setattr mode, times, and set-ID bits stripped", "[vfs][host]") {
  Tree t;
  auto p = t.provider();
  const uint64_t r = p->rootNode();

  auto c = p->create(r, "suid", 06755, O_RDWR, kGuest);
  REQUIRE(c);
  p->release(c->second);
  CHECK((lstatHost(t.at("suid")).st_mode & 07777) == 0755);
  CHECK((c->first.attr.st_mode & 07777) == 0755);

  auto st = p->setattr(c->first.node, modeAttr(06777), 0);
  REQUIRE(st);
  CHECK((st->st_mode & 07777) == 0777);
  CHECK((lstatHost(t.at("suid")).st_mode & 07777) == 0777);

  auto d = p->mkdir(r, "sticky", 03777, kGuest);
  REQUIRE(d);
  CHECK((lstatHost(t.at("sticky")).st_mode & 07777) == 01777);
  CHECK((d->attr.st_mode & 07777) == 01777);
  auto n = p->mknod(r, "node", S_IFREG | 04600, 0, kGuest);
  REQUIRE(n);
  CHECK((lstatHost(t.at("node")).st_mode & 07777) == 0600);

  // Set-ID bits on the host are not shown to the guest.
  writeHost(t.at("hostsuid"), "");
  REQUIRE(::chmod(t.at("hostsuid").c_str(), 04755) == 0);
  CHECK((lookupOk(*p, r, "hostsuid").attr.st_mode & 07777) == 0755);

  SetAttr times;
  times.valid = FATTR_ATIME | FATTR_MTIME;
  times.atime = {1111, 5};
  times.mtime = {2222, 7};
  REQUIRE(p->setattr(c->first.node, times, 0));
  struct stat hs = lstatHost(t.at("suid"));
  CHECK(hs.st_atim.tv_sec == 1111);
  CHECK(hs.st_atim.tv_nsec == 5);
  CHECK(hs.st_mtim.tv_sec == 2222);
  CHECK(hs.st_mtim.tv_nsec == 7);
  times.valid = FATTR_MTIME | FATTR_MTIME_NOW;
  times.mtime = {0, UTIME_NOW};
  REQUIRE(p->setattr(c->first.node, times, 0));
  hs = lstatHost(t.at("suid"));
  CHECK(hs.st_atim.tv_sec == 1111);  // omitted
  CHECK(hs.st_mtim.tv_sec > 2222);
  times.valid = FATTR_ATIME;
  times.atime = {3333, 0};
  REQUIRE(p->setattr(d->node, times, 0));
  CHECK(lstatHost(t.at("sticky")).st_atim.tv_sec == 3333);
}

TEST_CASE("host: ownership maps the root's owner to the guest owner", "[vfs][host]") {
  Tree t;
  REQUIRE(::chown(t.root.c_str(), 1234, 1234) == 0);
  writeHost(t.at("rootowned"), "");  // host uid 0
  auto p = t.provider();
  const uint64_t r = p->rootNode();

  auto root = p->getattr(r);
  REQUIRE(root);
  CHECK(root->st_uid == 1000);
  CHECK(root->st_gid == 1000);

  auto c = p->create(r, "file", 0644, O_RDWR, kGuest);
  REQUIRE(c);
  p->release(c->second);
  CHECK(lstatHost(t.at("file")).st_uid == 1234);
  CHECK(lstatHost(t.at("file")).st_gid == 1234);
  CHECK(c->first.attr.st_uid == 1000);
  CHECK(c->first.attr.st_gid == 1000);
  auto d = p->mkdir(r, "dir", 0755, kGuest);
  REQUIRE(d);
  CHECK(lstatHost(t.at("dir")).st_uid == 1234);
  CHECK(d->attr.st_uid == 1000);
  auto s = p->symlink(r, "link", "file", kGuest);
  REQUIRE(s);
  CHECK(lstatHost(t.at("link")).st_uid == 1234);
  CHECK(lstatHost(t.at("link")).st_gid == 1234);
  auto n = p->mknod(r, "fifo", S_IFIFO | 0644, 0, kGuest);
  REQUIRE(n);
  CHECK(lstatHost(t.at("fifo")).st_uid == 1234);

  Entry other = lookupOk(*p, r, "rootowned");
  CHECK(other.attr.st_uid == 0);

  // chown only to the guest owner or the id already shown, and never on the host.
  SetAttr own;
  own.valid = FATTR_UID | FATTR_GID;
  own.uid = 1000;
  own.gid = 1000;
  REQUIRE(p->setattr(c->first.node, own, 0));
  REQUIRE(p->setattr(other.node, own, 0));
  CHECK(lstatHost(t.at("rootowned")).st_uid == 0);
  own.uid = 0;
  own.gid = 0;
  REQUIRE(p->setattr(other.node, own, 0));
  CHECK(p->setattr(c->first.node, own, 0).error() == EPERM);
  own.valid = FATTR_GID;
  own.gid = 5;
  CHECK(p->setattr(c->first.node, own, 0).error() == EPERM);
  own.valid = FATTR_UID;
  own.uid = 1234;  // the host id is not a guest id
  CHECK(p->setattr(c->first.node, own, 0).error() == EPERM);
  CHECK(lstatHost(t.at("file")).st_uid == 1234);
}

TEST_CASE("host: a read-only provider refuses every change", "[vfs][host]") {
  Tree t;
  writeHost(t.at("file"), "data");
  REQUIRE(::mkdir(t.at("dir").c_str(), 0755) == 0);
  REQUIRE(::symlink("file", t.at("link").c_str()) == 0);
  const std::string before = snapshot(t.root);
  auto p = t.provider(true);
  CHECK(p->readOnly());
  const uint64_t r = p->rootNode();
  Entry file = lookupOk(*p, r, "file");
  Entry dir = lookupOk(*p, r, "dir");

  CHECK(p->setattr(file.node, modeAttr(0600), 0).error() == EROFS);
  SetAttr size;
  size.valid = FATTR_SIZE;
  CHECK(p->setattr(file.node, size, 0).error() == EROFS);
  SetAttr times;
  times.valid = FATTR_MTIME_NOW | FATTR_MTIME;
  CHECK(p->setattr(file.node, times, 0).error() == EROFS);
  CHECK(p->mknod(r, "n", S_IFREG | 0644, 0, kGuest).error() == EROFS);
  CHECK(p->mknod(r, "n", S_IFCHR | 0644, makedev(1, 3), kGuest).error() == EROFS);
  CHECK(p->mkdir(r, "m", 0755, kGuest).error() == EROFS);
  CHECK(p->symlink(r, "s", "file", kGuest).error() == EROFS);
  CHECK(p->link(file.node, r, "l").error() == EROFS);
  CHECK(p->unlink(r, "file").error() == EROFS);
  CHECK(p->rmdir(r, "dir").error() == EROFS);
  CHECK(p->rename(r, "file", dir.node, "file", 0).error() == EROFS);
  CHECK(p->create(r, "c", 0644, O_RDONLY, kGuest).error() == EROFS);
  CHECK(p->create(r, "file", 0644, O_RDONLY, kGuest).error() == EROFS);
  CHECK(p->open(file.node, O_WRONLY).error() == EROFS);
  CHECK(p->open(file.node, O_RDWR).error() == EROFS);
  CHECK(p->open(file.node, O_RDONLY | O_TRUNC).error() == EROFS);
  CHECK(p->open(file.node, O_RDONLY | O_APPEND).error() == EROFS);

  // Reads still work.
  auto fh = p->open(file.node, O_RDONLY);
  REQUIRE(fh);
  CHECK(readAll(*p, *fh) == "data");
  CHECK(p->write(*fh, 0, "x").error() == EROFS);
  CHECK(p->fallocate(*fh, 0, 0, 100).error() == EROFS);
  REQUIRE(p->fsync(*fh, false));
  p->release(*fh);
  auto dh = p->opendir(r);
  REQUIRE(dh);
  CHECK(list(*p, *dh).size() == 5);
  p->releasedir(*dh);
  CHECK(*p->readlink(lookupOk(*p, r, "link").node) == "file");
  CHECK(p->statfs());
  SetAttr none;
  CHECK(p->setattr(file.node, none, 0));

  CHECK(snapshot(t.root) == before);
}

TEST_CASE("host: symlinks to outside are never followed", "[vfs][host]") {
  Tree t;
  REQUIRE(::symlink("/etc", t.at("etc").c_str()) == 0);
  REQUIRE(::symlink("../outside", t.at("up").c_str()) == 0);
  REQUIRE(::symlink("../outside/secret", t.at("secret").c_str()) == 0);
  REQUIRE(::symlink("/etc/passwd", t.at("passwd").c_str()) == 0);
  auto p = t.provider();
  const uint64_t r = p->rootNode();
  const std::string probe = "ml-vfs-host-test-must-not-exist";

  for (const char* name : {"etc", "up"}) {
    INFO(name);
    Entry link = lookupOk(*p, r, name);
    CHECK(S_ISLNK(link.attr.st_mode));
    CHECK(link.attr.st_ino == lstatHost(t.at(name)).st_ino);
    CHECK(p->lookup(link.node, "passwd").error() == ENOTDIR);
    CHECK(p->lookup(link.node, "secret").error() == ENOTDIR);
    CHECK(p->opendir(link.node).error() == ENOTDIR);
    CHECK(p->open(link.node, O_RDONLY).error() == EACCES);
    CHECK(p->create(link.node, probe, 0644, O_RDWR, kGuest).error() == ENOTDIR);
    CHECK(p->mkdir(link.node, probe, 0755, kGuest).error() == ENOTDIR);
    CHECK(p->mknod(link.node, probe, S_IFREG | 0644, 0, kGuest).error() == ENOTDIR);
    CHECK(p->symlink(link.node, probe, "x", kGuest).error() == ENOTDIR);
    CHECK(p->unlink(link.node, "secret").error() == ENOTDIR);
    CHECK(p->rename(link.node, "secret", r, "stolen", 0).error() == ENOTDIR);
    CHECK(p->rename(r, "passwd", link.node, probe, 0).error() == ENOTDIR);
    CHECK(p->setattr(link.node, modeAttr(0777), 0).error() == EOPNOTSUPP);
    SetAttr size;
    size.valid = FATTR_SIZE;
    CHECK(p->setattr(link.node, size, 0).error() == EINVAL);
  }
  CHECK_FALSE(existsHost("/etc/" + probe));
  CHECK_FALSE(existsHost(t.outside + "/" + probe));
  CHECK_FALSE(existsHost(t.at("stolen")));

  for (const char* name : {"secret", "passwd"}) {
    INFO(name);
    Entry link = lookupOk(*p, r, name);
    CHECK(S_ISLNK(link.attr.st_mode));
    CHECK(p->open(link.node, O_RDONLY).error() == EACCES);
    CHECK(p->open(link.node, O_WRONLY | O_TRUNC).error() == EACCES);
    // create on the link's name opens nothing through it.
    CHECK(p->create(r, name, 0644, O_RDWR | O_TRUNC, kGuest).error() == ELOOP);
    CHECK(p->create(r, name, 0644, O_RDWR | O_EXCL, kGuest).error() == EEXIST);
    SetAttr times;
    times.valid = FATTR_MTIME;
    times.mtime = {12345, 0};
    REQUIRE(p->setattr(link.node, times, 0));  // the link's own time
  }
  CHECK(readHost(t.outside + "/secret") == kSecret);
  CHECK(lstatHost("/etc/passwd").st_mtim.tv_sec != 12345);
  t.checkOutsideUntouched();
}

TEST_CASE("host: a directory swapped for a symlink after lookup stays contained", "[vfs][host]") {
  Tree t;
  REQUIRE(::mkdir(t.at("d").c_str(), 0755) == 0);
  writeHost(t.at("d/orig"), "orig");
  writeHost(t.at("f"), "inside file");
  auto p = t.provider();
  const uint64_t r = p->rootNode();
  Entry d = lookupOk(*p, r, "d");
  Entry f = lookupOk(*p, r, "f");

  // The host moves the directory and the file away and plants symlinks to outside at the names.
  REQUIRE(::rename(t.at("d").c_str(), t.at("moved").c_str()) == 0);
  REQUIRE(::symlink(t.outside.c_str(), t.at("d").c_str()) == 0);
  REQUIRE(::rename(t.at("f").c_str(), t.at("movedf").c_str()) == 0);
  REQUIRE(::symlink((t.outside + "/secret").c_str(), t.at("f").c_str()) == 0);

  // The old node is the directory itself, wherever it went.
  auto c = p->create(d.node, "x", 0644, O_RDWR, kGuest);
  REQUIRE(c);
  p->release(c->second);
  CHECK(existsHost(t.at("moved/x")));
  CHECK(lookupOk(*p, d.node, "orig").attr.st_size == 4);
  CHECK(p->lookup(d.node, "secret").error() == ENOENT);
  auto m = p->mkdir(d.node, "sub", 0755, kGuest);
  REQUIRE(m);
  CHECK(existsHost(t.at("moved/sub")));
  auto dh = p->opendir(d.node);
  REQUIRE(dh);
  for (const auto& e : list(*p, *dh)) {
    CHECK(e.name != "secret");
    CHECK(e.name != "dir");
  }
  p->releasedir(*dh);

  // The old file node still opens the original file, not the link's target.
  auto fh = p->open(f.node, O_RDWR);
  REQUIRE(fh);
  CHECK(readAll(*p, *fh) == "inside file");
  REQUIRE(p->write(*fh, 0, "INSIDE"));
  p->release(*fh);
  CHECK(readHost(t.at("movedf")) == "INSIDE file");

  // A new lookup of the names finds the symlinks, which lead nowhere.
  Entry now = lookupOk(*p, r, "d");
  CHECK(S_ISLNK(now.attr.st_mode));
  CHECK(now.node != d.node);
  CHECK(p->create(now.node, "y", 0644, O_RDWR, kGuest).error() == ENOTDIR);
  CHECK(p->lookup(now.node, "secret").error() == ENOTDIR);
  Entry nowf = lookupOk(*p, r, "f");
  CHECK(p->open(nowf.node, O_RDWR).error() == EACCES);
  t.checkOutsideUntouched();
}

TEST_CASE("host: a hard link to an outside file is not opened", "[vfs][host]") {
  Tree t;
  REQUIRE(::link((t.outside + "/secret").c_str(), t.at("hl").c_str()) == 0);
  t.outside_before = snapshot(t.outside);  // nlink of secret is now 2
  auto p = t.provider();
  const uint64_t r = p->rootNode();
  Entry hl = lookupOk(*p, r, "hl");
  CHECK(hl.attr.st_nlink == 2);
  CHECK(p->open(hl.node, O_RDONLY).error() == EACCES);
  CHECK(p->open(hl.node, O_WRONLY).error() == EACCES);
  CHECK(p->open(hl.node, O_RDWR | O_TRUNC).error() == EACCES);
  CHECK(p->create(r, "hl", 0644, O_RDWR | O_TRUNC, kGuest).error() == EACCES);
  SetAttr size;
  size.valid = FATTR_SIZE;
  CHECK(p->setattr(hl.node, size, 0).error() == EACCES);
  CHECK(p->setattr(hl.node, modeAttr(0777), 0).error() == EACCES);
  SetAttr times;
  times.valid = FATTR_MTIME_NOW;
  CHECK(p->setattr(hl.node, times, 0).error() == EACCES);
  CHECK(p->link(hl.node, r, "another").error() == EXDEV);
  CHECK(readHost(t.outside + "/secret") == kSecret);
  t.checkOutsideUntouched();

  // Removing the tree's name is fine and leaves the outside file.
  REQUIRE(p->unlink(r, "hl"));
  CHECK(readHost(t.outside + "/secret") == kSecret);
}

TEST_CASE("host: devices, FIFOs and sockets are never opened", "[vfs][host]") {
  Tree t;
  REQUIRE(::mknod(t.at("null").c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0);
  REQUIRE(::mkfifo(t.at("fifo").c_str(), 0666) == 0);
  int sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(sock >= 0);
  Fd sock_fd(sock);
  struct sockaddr_un addr {};
  addr.sun_family = AF_UNIX;
  const std::string sock_path = t.at("sock");
  REQUIRE(sock_path.size() < sizeof addr.sun_path);
  std::memcpy(addr.sun_path, sock_path.c_str(), sock_path.size() + 1);
  REQUIRE(::bind(sock, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);

  auto p = t.provider();
  const uint64_t r = p->rootNode();
  Entry null = lookupOk(*p, r, "null");
  CHECK(S_ISCHR(null.attr.st_mode));
  CHECK(null.attr.st_rdev == 0);
  CHECK(p->open(null.node, O_RDONLY).error() == EACCES);
  CHECK(p->open(null.node, O_WRONLY).error() == EACCES);
  CHECK(p->opendir(null.node).error() == ENOTDIR);
  CHECK(p->create(r, "null", 0644, O_RDWR, kGuest).error() == EACCES);

  // Opening a FIFO would block the server: refused at once, by open and by create.
  Entry fifo = lookupOk(*p, r, "fifo");
  CHECK(S_ISFIFO(fifo.attr.st_mode));
  CHECK(p->open(fifo.node, O_RDONLY).error() == EACCES);
  CHECK(p->open(fifo.node, O_WRONLY).error() == EACCES);
  CHECK(p->create(r, "fifo", 0644, O_WRONLY, kGuest).error() == EACCES);
  auto st = p->setattr(fifo.node, modeAttr(0600), 0);  // chmod reaches it without opening it
  REQUIRE(st);
  CHECK((lstatHost(t.at("fifo")).st_mode & 07777) == 0600);

  Entry s = lookupOk(*p, r, "sock");
  CHECK(S_ISSOCK(s.attr.st_mode));
  CHECK(p->open(s.node, O_RDWR).error() == EACCES);

  // The guest cannot make devices; FIFOs, sockets and regular files are fine.
  CHECK(p->mknod(r, "dev", S_IFCHR | 0666, makedev(1, 3), kGuest).error() == EPERM);
  CHECK(p->mknod(r, "blk", S_IFBLK | 0666, makedev(8, 0), kGuest).error() == EPERM);
  CHECK(p->mknod(r, "sk", S_IFSOCK | 0666, 0, kGuest));  // inert on the host
  CHECK_FALSE(existsHost(t.at("dev")));
  CHECK_FALSE(existsHost(t.at("blk")));
  CHECK(S_ISSOCK(lstatHost(t.at("sk")).st_mode));
  auto nf = p->mknod(r, "newfifo", S_IFIFO | 0644, 0, kGuest);
  REQUIRE(nf);
  CHECK(S_ISFIFO(lstatHost(t.at("newfifo")).st_mode));
  CHECK(p->open(nf->node, O_RDONLY).error() == EACCES);
  auto nr = p->mknod(r, "newreg", S_IFREG | 0644, 0, kGuest);
  REQUIRE(nr);
  CHECK(lstatHost(t.at("newreg")).st_size == 0);
  auto fh = p->open(nr->node, O_RDWR);
  REQUIRE(fh);
  p->release(*fh);
  t.checkOutsideUntouched();
}

TEST_CASE("host: a single regular file as the root", "[vfs][host]") {
  Tree t;
  writeHost(t.at("only"), "single");
  Fd fd(::open(t.at("only").c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  REQUIRE(fd);
  auto made = makeHostProvider(std::move(fd), false, kGuest);
  REQUIRE(made);
  Provider& p = **made;
  auto st = p.getattr(p.rootNode());
  REQUIRE(st);
  CHECK(S_ISREG(st->st_mode));
  CHECK(st->st_size == 6);
  CHECK(p.lookup(p.rootNode(), "x").error() == ENOTDIR);
  CHECK(p.create(p.rootNode(), "x", 0644, O_RDWR, kGuest).error() == ENOTDIR);
  CHECK(p.opendir(p.rootNode()).error() == ENOTDIR);
  auto fh = p.open(p.rootNode(), O_RDWR);
  REQUIRE(fh);
  CHECK(readAll(p, *fh) == "single");
  REQUIRE(p.write(*fh, 6, "!"));
  p.release(*fh);
  CHECK(readHost(t.at("only")) == "single!");

  // A symlink cannot be a root.
  REQUIRE(::symlink("only", t.at("link").c_str()) == 0);
  Fd link(::open(t.at("link").c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  REQUIRE(link);
  CHECK(makeHostProvider(std::move(link), false, kGuest).error() == ELOOP);
}

TEST_CASE("host: node and handle caps, unknown ids", "[vfs][host]") {
  Tree t;
  for (int i = 0; i < 5; ++i) {
    writeHost(t.at("f" + std::to_string(i)), "x");
  }
  auto p = t.provider(false, 3, 2);  // the root and two more nodes; two handles
  const uint64_t r = p->rootNode();
  Entry f0 = lookupOk(*p, r, "f0");
  Entry f1 = lookupOk(*p, r, "f1");
  CHECK(p->lookup(r, "f2").error() == ENFILE);
  CHECK(lookupOk(*p, r, "f0").node == f0.node);  // known objects still resolve
  CHECK(p->mkdir(r, "d", 0755, kGuest).error() == ENFILE);
  CHECK_FALSE(existsHost(t.at("d")));
  p->forget(f1.node);
  CHECK(p->lookup(r, "f2"));

  auto h1 = p->open(f0.node, O_RDONLY);
  auto h2 = p->opendir(r);
  REQUIRE(h1);
  REQUIRE(h2);
  CHECK(*h1 != *h2);
  CHECK(p->open(f0.node, O_RDONLY).error() == EMFILE);
  CHECK(p->opendir(r).error() == EMFILE);
  p->release(*h2);  // a directory handle is not released as a file
  CHECK(p->open(f0.node, O_RDONLY).error() == EMFILE);
  p->releasedir(*h2);
  auto h3 = p->open(f0.node, O_RDONLY);
  REQUIRE(h3);
  CHECK(*h3 != *h2);  // ids are not reused

  // Handles are provider ids, not fds; kinds do not mix.
  std::string out;
  CHECK(p->read(*h2, 0, 1, out).error() == EBADF);
  CHECK(p->read(0, 0, 1, out).error() == EBADF);
  CHECK(p->read(static_cast<uint64_t>(STDIN_FILENO), 0, 1, out).error() == EBADF);
  CHECK(p->readdir(*h1, 0, [](const DirEntry&) { return true; }).error() == EBADF);
  CHECK(p->fsync(777, false).error() == EBADF);
  CHECK(p->flush(777).error() == EBADF);
  CHECK(p->fallocate(777, 0, 0, 1).error() == EBADF);
  CHECK(p->open(4242, O_RDONLY).error() == ESTALE);
  CHECK(p->lookup(4242, "f0").error() == ESTALE);
  CHECK(p->read(*h1, UINT64_MAX, 1, out).error() == EINVAL);
  p->release(*h1);
  p->release(*h3);
}

TEST_CASE("host: statfs reports the root's filesystem", "[vfs][host]") {
  Tree t;
  auto p = t.provider();
  auto s = p->statfs();
  REQUIRE(s);
  struct statvfs host {};
  REQUIRE(::statvfs(t.root.c_str(), &host) == 0);
  CHECK(s->f_bsize == host.f_bsize);
  CHECK(s->f_blocks == host.f_blocks);
}

}  // namespace

TEST_CASE("host: scattered writes and reads go to and from the caller's buffers", "[vfs][host]") {
  Tree t;
  auto p = t.provider();
  auto c = p->create(p->rootNode(), "s", 0644, O_RDWR, kGuest);
  REQUIRE(c);
  const uint64_t fh = c->second;
  std::string a(5000, 'a');
  std::string b(3, 'b');
  std::string d(70000, 'd');
  auto n = p->writeParts(fh, 10, {a, b, d});
  REQUIRE(n);
  CHECK(*n == a.size() + b.size() + d.size());
  std::string host = readHost(t.at("s"));
  CHECK(host == std::string(10, '\0') + a + b + d);
  // Read back into three buffers, the last one past the end of the file.
  std::string x(7, '.');
  std::string y(4096, '.');
  std::string z(100000, '.');
  auto r = p->readParts(
      fh, 3, {Span{x.data(), x.size()}, Span{y.data(), y.size()}, Span{z.data(), z.size()}});
  REQUIRE(r);
  CHECK(*r == host.size() - 3);
  CHECK((x + y + z).substr(0, *r) == host.substr(3));
  CHECK(p->readParts(fh, host.size(), {Span{x.data(), x.size()}}).value() == 0);
  CHECK(p->readParts(999, 0, {Span{x.data(), x.size()}}).error() == EBADF);
  CHECK(p->writeParts(999, 0, {a}).error() == EBADF);
  p->release(fh);
}
