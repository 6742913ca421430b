// SPDX-License-Identifier: Apache-2.0
#include <dirent.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "vfs/provider.h"

using namespace matchlock::vfs;  // NOLINT(google-build-using-namespace)

namespace {

constexpr uint64_t kMiB = 1 << 20;
const Caller kOwner{1000, 1000, 1};
const Caller kUser{1234, 5678, 2};

struct Fs {
  explicit Fs(uint64_t max_bytes = 16 * kMiB) : p(makeMemoryProvider(max_bytes, kOwner)) {}

  uint64_t root() const { return p->rootNode(); }

  uint64_t mkdir(uint64_t parent, const std::string& name, uint32_t mode = 0755) const {
    auto e = p->mkdir(parent, name, mode, kUser);
    REQUIRE(e);
    return e->node;
  }

  /// Creates `name` with `data` and closes it.
  uint64_t file(uint64_t parent, const std::string& name, const std::string& data = "") const {
    auto c = p->create(parent, name, 0644, O_WRONLY, kUser);
    REQUIRE(c);
    if (!data.empty()) {
      auto w = p->write(c->second, 0, data);
      REQUIRE(w);
      REQUIRE(*w == data.size());
    }
    p->release(c->second);
    return c->first.node;
  }

  uint64_t open(uint64_t node, int flags) const {
    auto fh = p->open(node, flags);
    REQUIRE(fh);
    return *fh;
  }

  std::string read(uint64_t fh, uint64_t offset, size_t size) const {
    std::string out;
    auto r = p->read(fh, offset, size, out);
    REQUIRE(r);
    return out;
  }

  std::string contents(uint64_t node) const {
    const uint64_t fh = open(node, O_RDONLY);
    std::string out = read(fh, 0, 1 << 24);
    p->release(fh);
    return out;
  }

  struct stat attr(uint64_t node) const {
    auto st = p->getattr(node);
    REQUIRE(st);
    return *st;
  }

  uint64_t node(uint64_t parent, const std::string& name) const {
    auto e = p->lookup(parent, name);
    REQUIRE(e);
    return e->node;
  }

  int lookupErr(uint64_t parent, const std::string& name) const {
    auto e = p->lookup(parent, name);
    return e ? 0 : e.error();
  }

  /// Every name of a directory listing, "." and ".." included, in the order given.
  std::vector<std::string> list(uint64_t dir) const {
    auto fh = p->opendir(dir);
    REQUIRE(fh);
    std::vector<std::string> names;
    auto r = p->readdir(*fh, 0, [&](const DirEntry& e) {
      names.emplace_back(e.name);
      return true;
    });
    REQUIRE(r);
    p->releasedir(*fh);
    return names;
  }

  uint64_t usedBytes() const {
    auto st = p->statfs();
    REQUIRE(st);
    return (st->f_blocks - st->f_bfree) * st->f_bsize;
  }

  ProviderPtr p;
};

template <class R>
int err(const R& r) {
  return r ? 0 : r.error();
}

}  // namespace

TEST_CASE("memory: the root belongs to the owner", "[vfs][memory]") {
  Fs fs;
  CHECK_FALSE(fs.p->readOnly());
  const struct stat st = fs.attr(fs.root());
  CHECK(S_ISDIR(st.st_mode));
  CHECK((st.st_mode & 07777) == 0755);
  CHECK(st.st_uid == kOwner.uid);
  CHECK(st.st_gid == kOwner.gid);
  CHECK(st.st_nlink == 2);
  CHECK(st.st_ino == fs.root());
  CHECK(fs.list(fs.root()) == std::vector<std::string>{".", ".."});
  CHECK(err(fs.p->getattr(999)) == ENOENT);
}

TEST_CASE("memory: create, lookup and attributes", "[vfs][memory]") {
  Fs fs;
  auto c = fs.p->create(fs.root(), "f", 0640, O_RDWR, kUser);
  REQUIRE(c);
  const Entry& e = c->first;
  CHECK(e.node != fs.root());
  CHECK(e.attr.st_ino == e.node);
  CHECK(S_ISREG(e.attr.st_mode));
  CHECK((e.attr.st_mode & 07777) == 0640);
  CHECK(e.attr.st_uid == kUser.uid);
  CHECK(e.attr.st_gid == kUser.gid);
  CHECK(e.attr.st_nlink == 1);
  CHECK(e.attr.st_blksize == 4096);
  CHECK(e.attr.st_size == 0);
  fs.p->release(c->second);

  CHECK(fs.node(fs.root(), "f") == e.node);
  CHECK(fs.lookupErr(fs.root(), "g") == ENOENT);
  CHECK(fs.lookupErr(e.node, "x") == ENOTDIR);
  CHECK(fs.lookupErr(fs.root(), std::string(256, 'a')) == ENAMETOOLONG);
  CHECK(fs.lookupErr(fs.root(), ".") == EINVAL);
  CHECK(fs.lookupErr(fs.root(), "a/b") == EINVAL);

  SECTION("create of an existing name") {
    CHECK(err(fs.p->create(fs.root(), "f", 0644, O_RDWR | O_EXCL, kUser)) == EEXIST);
    auto again = fs.p->create(fs.root(), "f", 0644, O_RDWR, kUser);
    REQUIRE(again);
    CHECK(again->first.node == e.node);
    fs.p->release(again->second);
    fs.mkdir(fs.root(), "d");
    CHECK(err(fs.p->create(fs.root(), "d", 0644, O_RDWR, kUser)) == EISDIR);
  }
  SECTION("names too long") {
    const std::string long_name(256, 'x');
    CHECK(err(fs.p->create(fs.root(), long_name, 0644, O_RDWR, kUser)) == ENAMETOOLONG);
    CHECK(err(fs.p->mkdir(fs.root(), long_name, 0755, kUser)) == ENAMETOOLONG);
    CHECK(err(fs.p->symlink(fs.root(), long_name, "t", kUser)) == ENAMETOOLONG);
    CHECK(err(fs.p->link(e.node, fs.root(), long_name)) == ENAMETOOLONG);
    auto ok = fs.p->mkdir(fs.root(), std::string(255, 'x'), 0755, kUser);
    CHECK(ok);
  }
}

TEST_CASE("memory: setuid and setgid are stripped, sticky is kept", "[vfs][memory]") {
  Fs fs;
  auto c = fs.p->create(fs.root(), "f", 06755, O_RDWR, kUser);
  REQUIRE(c);
  CHECK((c->first.attr.st_mode & 07777) == 0755);
  fs.p->release(c->second);
  auto d = fs.p->mkdir(fs.root(), "d", 03777, kUser);
  REQUIRE(d);
  CHECK((d->attr.st_mode & 07777) == 01777);
  auto n = fs.p->mknod(fs.root(), "n", S_IFREG | 04644, 0, kUser);
  REQUIRE(n);
  CHECK((n->attr.st_mode & 07777) == 0644);

  SetAttr in;
  in.valid = FATTR_MODE;
  in.mode = 07711;
  auto st = fs.p->setattr(c->first.node, in, 0);
  REQUIRE(st);
  CHECK(S_ISREG(st->st_mode));
  CHECK((st->st_mode & 07777) == 01711);
}

TEST_CASE("memory: chown to any id", "[vfs][memory]") {
  Fs fs;
  const uint64_t f = fs.file(fs.root(), "f");
  SetAttr in;
  in.valid = FATTR_UID | FATTR_GID;
  in.uid = 0;
  in.gid = 4242;
  auto st = fs.p->setattr(f, in, 0);
  REQUIRE(st);
  CHECK(st->st_uid == 0);
  CHECK(st->st_gid == 4242);
  CHECK(fs.attr(f).st_gid == 4242);
}

TEST_CASE("memory: mknod makes files and FIFOs only", "[vfs][memory]") {
  Fs fs;
  auto fifo = fs.p->mknod(fs.root(), "fifo", S_IFIFO | 0644, 0, kUser);
  REQUIRE(fifo);
  CHECK(S_ISFIFO(fifo->attr.st_mode));
  CHECK(err(fs.p->open(fifo->node, O_RDONLY)) == EACCES);
  CHECK(err(fs.p->mknod(fs.root(), "c", S_IFCHR | 0644, 0x0103, kUser)) == EPERM);
  CHECK(err(fs.p->mknod(fs.root(), "b", S_IFBLK | 0644, 0x0801, kUser)) == EPERM);
  CHECK(fs.p->mknod(fs.root(), "s", S_IFSOCK | 0644, 0, kUser));  // bind(2) in the guest
  CHECK(err(fs.p->mknod(fs.root(), "fifo", S_IFIFO | 0644, 0, kUser)) == EEXIST);
  auto reg = fs.p->mknod(fs.root(), "r", S_IFREG | 0600, 0, kUser);
  REQUIRE(reg);
  CHECK(S_ISREG(reg->attr.st_mode));
  CHECK(fs.lookupErr(fs.root(), "c") == ENOENT);
}

TEST_CASE("memory: symlinks", "[vfs][memory]") {
  Fs fs;
  auto l = fs.p->symlink(fs.root(), "l", "../some/where", kUser);
  REQUIRE(l);
  CHECK(S_ISLNK(l->attr.st_mode));
  CHECK(l->attr.st_size == 13);
  auto t = fs.p->readlink(l->node);
  REQUIRE(t);
  CHECK(*t == "../some/where");
  CHECK(err(fs.p->open(l->node, O_RDONLY)) == EACCES);
  CHECK(err(fs.p->symlink(fs.root(), "long", std::string(4096, 'a'), kUser)) == ENAMETOOLONG);
  CHECK(fs.p->symlink(fs.root(), "max", std::string(4095, 'a'), kUser));
  CHECK(err(fs.p->symlink(fs.root(), "empty", "", kUser)) == ENOENT);
  CHECK(err(fs.p->readlink(fs.file(fs.root(), "f"))) == EINVAL);
  auto h = fs.p->link(l->node, fs.root(), "l2");
  REQUIRE(h);
  CHECK(h->attr.st_nlink == 2);
}

TEST_CASE("memory: link counts", "[vfs][memory]") {
  Fs fs;
  const uint64_t d = fs.mkdir(fs.root(), "d");
  CHECK(fs.attr(fs.root()).st_nlink == 3);
  CHECK(fs.attr(d).st_nlink == 2);
  fs.mkdir(d, "sub1");
  fs.mkdir(d, "sub2");
  CHECK(fs.attr(d).st_nlink == 4);
  const uint64_t f = fs.file(d, "f", "hello");
  CHECK(fs.attr(d).st_nlink == 4);  // files do not count

  auto l = fs.p->link(f, fs.root(), "f2");
  REQUIRE(l);
  CHECK(l->node == f);
  CHECK(l->attr.st_nlink == 2);
  CHECK(fs.node(fs.root(), "f2") == f);
  CHECK(err(fs.p->link(f, fs.root(), "f2")) == EEXIST);
  CHECK(err(fs.p->link(d, fs.root(), "d2")) == EPERM);
  CHECK(err(fs.p->link(f, f, "x")) == ENOTDIR);

  REQUIRE(fs.p->unlink(d, "f"));
  CHECK(fs.attr(f).st_nlink == 1);
  CHECK(fs.contents(f) == "hello");
  REQUIRE(fs.p->unlink(fs.root(), "f2"));
  CHECK(fs.attr(f).st_nlink == 0);  // still referenced by the server
  CHECK(err(fs.p->link(f, fs.root(), "back")) == ENOENT);

  REQUIRE(fs.p->rmdir(d, "sub1"));
  CHECK(fs.attr(d).st_nlink == 3);
}

TEST_CASE("memory: unlink and rmdir errors", "[vfs][memory]") {
  Fs fs;
  const uint64_t d = fs.mkdir(fs.root(), "d");
  fs.file(d, "f");
  fs.file(fs.root(), "g");
  CHECK(err(fs.p->unlink(fs.root(), "d")) == EISDIR);
  CHECK(err(fs.p->rmdir(fs.root(), "g")) == ENOTDIR);
  CHECK(err(fs.p->rmdir(fs.root(), "d")) == ENOTEMPTY);
  CHECK(err(fs.p->unlink(fs.root(), "nope")) == ENOENT);
  CHECK(err(fs.p->rmdir(fs.root(), "nope")) == ENOENT);
  REQUIRE(fs.p->unlink(d, "f"));
  REQUIRE(fs.p->rmdir(fs.root(), "d"));
  CHECK(fs.attr(fs.root()).st_nlink == 2);
  CHECK(fs.lookupErr(fs.root(), "d") == ENOENT);

  // The server still holds the removed directory: nothing can be made in it.
  CHECK(fs.attr(d).st_nlink == 0);
  CHECK(err(fs.p->create(d, "x", 0644, O_RDWR, kUser)) == ENOENT);
  CHECK(err(fs.p->mkdir(d, "x", 0755, kUser)) == ENOENT);
  CHECK(err(fs.p->rename(fs.root(), "g", d, "g", 0)) == ENOENT);
  CHECK(fs.list(d) == std::vector<std::string>{".", ".."});
  fs.p->forget(d);
  CHECK(err(fs.p->getattr(d)) == ENOENT);
}

TEST_CASE("memory: node lifetime and ids", "[vfs][memory]") {
  Fs fs;
  const uint64_t f = fs.file(fs.root(), "f", "x");
  CHECK(fs.node(fs.root(), "f") == f);
  CHECK(fs.node(fs.root(), "f") == f);
  fs.p->forget(f);                // once, whatever the number of lookups
  CHECK(fs.attr(f).st_ino == f);  // still named
  CHECK(fs.node(fs.root(), "f") == f);

  REQUIRE(fs.p->unlink(fs.root(), "f"));
  CHECK(fs.attr(f).st_nlink == 0);
  fs.p->forget(f);
  CHECK(err(fs.p->getattr(f)) == ENOENT);

  const uint64_t g = fs.file(fs.root(), "f");
  CHECK(g > f);             // never reused
  fs.p->forget(fs.root());  // ignored
  fs.p->forget(12345);      // unknown: ignored
  CHECK(fs.attr(fs.root()).st_nlink == 2);
}

TEST_CASE("memory: an unlinked open file lives until release", "[vfs][memory]") {
  Fs fs(1 * kMiB);
  auto c = fs.p->create(fs.root(), "f", 0644, O_RDWR, kUser);
  REQUIRE(c);
  const uint64_t f = c->first.node;
  const uint64_t fh = c->second;
  REQUIRE(fs.p->write(fh, 0, std::string(8192, 'a')));
  REQUIRE(fs.p->unlink(fs.root(), "f"));
  fs.p->forget(f);
  CHECK(fs.lookupErr(fs.root(), "f") == ENOENT);
  CHECK(fs.usedBytes() == 8192);

  CHECK(fs.read(fh, 8190, 10) == "aa");
  auto w = fs.p->write(fh, 8192, "tail");
  REQUIRE(w);
  CHECK(*w == 4);
  CHECK(fs.read(fh, 8190, 10) == "aatail");
  CHECK(fs.attr(f).st_nlink == 0);
  CHECK(fs.attr(f).st_size == 8196);

  // A new file of the same name is another inode.
  const uint64_t g = fs.file(fs.root(), "f", "new");
  CHECK(g != f);
  CHECK(fs.read(fh, 0, 1) == "a");

  fs.p->release(fh);
  CHECK(err(fs.p->getattr(f)) == ENOENT);
  std::string out;
  CHECK(err(fs.p->read(fh, 0, 1, out)) == EBADF);
  CHECK(fs.usedBytes() == 4096);  // "new", rounded to a block
}

TEST_CASE("memory: rename moves whole subtrees", "[vfs][memory]") {
  Fs fs;
  const uint64_t a = fs.mkdir(fs.root(), "a");
  const uint64_t b = fs.mkdir(a, "b");
  const uint64_t f = fs.file(b, "f", "deep");
  const uint64_t c = fs.mkdir(fs.root(), "c");
  CHECK(fs.attr(fs.root()).st_nlink == 4);

  REQUIRE(fs.p->rename(fs.root(), "a", c, "moved", 0));
  CHECK(fs.lookupErr(fs.root(), "a") == ENOENT);
  CHECK(fs.node(c, "moved") == a);
  CHECK(fs.node(a, "b") == b);
  CHECK(fs.node(b, "f") == f);
  CHECK(fs.contents(f) == "deep");
  CHECK(fs.attr(fs.root()).st_nlink == 3);
  CHECK(fs.attr(c).st_nlink == 3);
  CHECK(fs.attr(a).st_nlink == 3);

  // ".." of the moved directory is its new parent.
  auto dh = fs.p->opendir(a);
  REQUIRE(dh);
  uint64_t dotdot = 0;
  REQUIRE(fs.p->readdir(*dh, 0, [&](const DirEntry& e) {
    if (e.name == "..") {
      dotdot = e.ino;
    }
    return true;
  }));
  fs.p->releasedir(*dh);
  CHECK(dotdot == c);

  // Within one directory, a file.
  REQUIRE(fs.p->rename(b, "f", b, "g", 0));
  CHECK(fs.list(b) == std::vector<std::string>{".", "..", "g"});
  CHECK(fs.node(b, "g") == f);
}

TEST_CASE("memory: rename refuses a directory into itself", "[vfs][memory]") {
  Fs fs;
  const uint64_t a = fs.mkdir(fs.root(), "a");
  const uint64_t b = fs.mkdir(a, "b");
  const uint64_t c = fs.mkdir(b, "c");
  CHECK(err(fs.p->rename(fs.root(), "a", a, "x", 0)) == EINVAL);
  CHECK(err(fs.p->rename(fs.root(), "a", c, "x", 0)) == EINVAL);
  CHECK(err(fs.p->rename(fs.root(), "a", c, "x", RENAME_NOREPLACE)) == EINVAL);
  CHECK(err(fs.p->rename(fs.root(), "a", fs.root(), "a", 0)) == 0);  // itself: nothing to do
  CHECK(fs.node(fs.root(), "a") == a);
  // An ancestor is never empty, so replacing it fails first.
  CHECK(err(fs.p->rename(b, "c", fs.root(), "a", 0)) == ENOTEMPTY);
  CHECK(fs.node(b, "c") == c);
}

TEST_CASE("memory: rename replacing", "[vfs][memory]") {
  Fs fs;
  const uint64_t f = fs.file(fs.root(), "f", "one");
  const uint64_t g = fs.file(fs.root(), "g", "two");
  const uint64_t d = fs.mkdir(fs.root(), "d");
  const uint64_t e = fs.mkdir(fs.root(), "e");
  const uint64_t full = fs.mkdir(fs.root(), "full");
  fs.file(full, "x");

  CHECK(err(fs.p->rename(fs.root(), "f", fs.root(), "g", RENAME_NOREPLACE)) == EEXIST);
  CHECK(err(fs.p->rename(fs.root(), "d", fs.root(), "f", 0)) == ENOTDIR);
  CHECK(err(fs.p->rename(fs.root(), "f", fs.root(), "d", 0)) == EISDIR);
  CHECK(err(fs.p->rename(fs.root(), "d", fs.root(), "full", 0)) == ENOTEMPTY);
  CHECK(err(fs.p->rename(fs.root(), "nope", fs.root(), "x", 0)) == ENOENT);
  CHECK(err(fs.p->rename(fs.root(), "f", f, "x", 0)) == ENOTDIR);
  CHECK(err(fs.p->rename(fs.root(), "f", fs.root(), "x", RENAME_NOREPLACE | RENAME_EXCHANGE)) ==
        EINVAL);
  CHECK(err(fs.p->rename(fs.root(), "f", fs.root(), "x", 0x100)) == EINVAL);

  REQUIRE(fs.p->rename(fs.root(), "f", fs.root(), "g", 0));
  CHECK(fs.node(fs.root(), "g") == f);
  CHECK(fs.contents(f) == "one");
  CHECK(fs.lookupErr(fs.root(), "f") == ENOENT);
  CHECK(fs.attr(g).st_nlink == 0);
  fs.p->forget(g);
  CHECK(err(fs.p->getattr(g)) == ENOENT);

  const uint64_t nlink_before = fs.attr(fs.root()).st_nlink;
  REQUIRE(fs.p->rename(fs.root(), "d", fs.root(), "e", 0));
  CHECK(fs.node(fs.root(), "e") == d);
  CHECK(fs.attr(e).st_nlink == 0);
  CHECK(fs.attr(fs.root()).st_nlink == nlink_before - 1);

  // A directory replacing an empty one in another parent.
  const uint64_t empty = fs.mkdir(full, "empty");
  (void)empty;
  REQUIRE(fs.p->rename(fs.root(), "e", full, "empty", 0));
  CHECK(fs.node(full, "empty") == d);
  CHECK(fs.attr(full).st_nlink == 3);
  CHECK(fs.attr(fs.root()).st_nlink == nlink_before - 2);
  CHECK(fs.list(full) == std::vector<std::string>{".", "..", "empty", "x"});
}

TEST_CASE("memory: rename of two names of one inode does nothing", "[vfs][memory]") {
  Fs fs;
  const uint64_t f = fs.file(fs.root(), "f");
  REQUIRE(fs.p->link(f, fs.root(), "g"));
  REQUIRE(fs.p->rename(fs.root(), "f", fs.root(), "g", 0));
  CHECK(fs.node(fs.root(), "f") == f);
  CHECK(fs.node(fs.root(), "g") == f);
  CHECK(fs.attr(f).st_nlink == 2);
}

TEST_CASE("memory: rename exchange", "[vfs][memory]") {
  Fs fs;
  const uint64_t a = fs.mkdir(fs.root(), "a");
  const uint64_t sub = fs.mkdir(a, "sub");
  const uint64_t f = fs.file(fs.root(), "f", "file");
  const uint64_t other = fs.mkdir(fs.root(), "other");

  CHECK(err(fs.p->rename(fs.root(), "f", fs.root(), "none", RENAME_EXCHANGE)) == ENOENT);

  // A file and a directory, across parents: the parents' link counts follow the directory.
  REQUIRE(fs.p->rename(a, "sub", fs.root(), "f", RENAME_EXCHANGE));
  CHECK(fs.node(fs.root(), "f") == sub);
  CHECK(fs.node(a, "sub") == f);
  CHECK(fs.attr(a).st_nlink == 2);
  CHECK(fs.attr(fs.root()).st_nlink == 5);
  CHECK(fs.attr(f).st_nlink == 1);

  // Two directories in one parent.
  REQUIRE(fs.p->rename(fs.root(), "a", fs.root(), "other", RENAME_EXCHANGE));
  CHECK(fs.node(fs.root(), "a") == other);
  CHECK(fs.node(fs.root(), "other") == a);
  CHECK(fs.node(a, "sub") == f);
  CHECK(fs.attr(fs.root()).st_nlink == 5);

  // Files across parents.
  const uint64_t g = fs.file(a, "g", "gee");
  REQUIRE(fs.p->rename(a, "g", fs.root(), "a", RENAME_EXCHANGE));
  CHECK(fs.node(fs.root(), "a") == g);
  CHECK(fs.node(a, "g") == other);
  CHECK(fs.attr(fs.root()).st_nlink == 4);
  CHECK(fs.attr(a).st_nlink == 3);
  CHECK(fs.p->rename(fs.root(), "a", fs.root(), "a", RENAME_EXCHANGE));  // itself: nothing
  CHECK(fs.node(fs.root(), "a") == g);
}

TEST_CASE("memory: rename exchange refuses a directory into itself", "[vfs][memory]") {
  Fs fs;
  const uint64_t x = fs.mkdir(fs.root(), "x");
  const uint64_t y = fs.mkdir(x, "y");
  fs.file(y, "z");
  fs.file(fs.root(), "f");
  CHECK(err(fs.p->rename(fs.root(), "x", y, "z", RENAME_EXCHANGE)) == EINVAL);
  CHECK(err(fs.p->rename(y, "z", fs.root(), "x", RENAME_EXCHANGE)) == EINVAL);
  CHECK(err(fs.p->rename(x, "y", fs.root(), "x", RENAME_EXCHANGE)) == EINVAL);
  CHECK(fs.node(fs.root(), "x") == x);
  CHECK(fs.node(x, "y") == y);
  // A file may go anywhere.
  REQUIRE(fs.p->rename(y, "z", fs.root(), "f", RENAME_EXCHANGE));
  CHECK(fs.list(y) == std::vector<std::string>{".", "..", "z"});
}

TEST_CASE("memory: readdir order and resumption", "[vfs][memory]") {
  Fs fs;
  const uint64_t d = fs.mkdir(fs.root(), "d");
  for (const char* n : {"c", "a", "e", "b", "d"}) {
    fs.file(d, n);
  }
  CHECK(fs.list(d) == std::vector<std::string>{".", "..", "a", "b", "c", "d", "e"});
  CHECK(err(fs.p->opendir(fs.node(d, "a"))) == ENOTDIR);
  CHECK(err(fs.p->readdir(999, 0, [](const DirEntry&) { return true; })) == EBADF);

  auto fh = fs.p->opendir(d);
  REQUIRE(fh);

  // Reads up to `n` entries from `offset`, refusing the next one; returns the names taken and
  // the offset to resume at.
  auto take = [&](uint64_t offset, size_t n) {
    std::vector<std::string> names;
    uint64_t next = offset;
    auto r = fs.p->readdir(*fh, offset, [&](const DirEntry& e) {
      if (names.size() == n) {
        return false;  // not consumed
      }
      names.emplace_back(e.name);
      next = e.next;
      return true;
    });
    REQUIRE(r);
    return std::make_pair(names, next);
  };

  SECTION("the refused entry comes first in the next call") {
    auto [n1, o1] = take(0, 1);
    CHECK(n1 == std::vector<std::string>{"."});
    auto [n2, o2] = take(o1, 2);
    CHECK(n2 == std::vector<std::string>{"..", "a"});
    auto [n3, o3] = take(o2, 2);
    CHECK(n3 == std::vector<std::string>{"b", "c"});
    CHECK(o3 > o2);
    CHECK(o2 > o1);
    auto [n4, o4] = take(o3, 100);
    CHECK(n4 == std::vector<std::string>{"d", "e"});
    auto [n5, o5] = take(o4, 100);
    CHECK(n5.empty());
    CHECK(o5 == o4);
    // Starting over.
    auto [n6, o6] = take(0, 100);
    CHECK(n6.size() == 7);
    (void)o6;
  }
  SECTION("changes between calls neither repeat nor hide entries") {
    auto [n1, o1] = take(0, 4);
    CHECK(n1 == std::vector<std::string>{".", "..", "a", "b"});
    REQUIRE(fs.p->unlink(d, "a"));  // before the cursor
    REQUIRE(fs.p->unlink(d, "b"));  // the cursor itself
    fs.file(d, "aa");               // before the cursor: not listed
    fs.file(d, "bb");               // after it: listed
    REQUIRE(fs.p->unlink(d, "d"));  // after it: gone
    auto [n2, o2] = take(o1, 100);
    CHECK(n2 == std::vector<std::string>{"bb", "c", "e"});
    CHECK(o2 > o1);
  }
  SECTION("an offset from an earlier listing resumes by position") {
    auto [n1, o1] = take(0, 3);
    auto [n2, o2] = take(o1, 2);
    CHECK(n2 == std::vector<std::string>{"b", "c"});
    auto [n3, o3] = take(o1, 100);  // a seekdir back to o1
    CHECK(n3 == std::vector<std::string>{"b", "c", "d", "e"});
    auto [n4, o4] = take(1, 1);
    CHECK(n4 == std::vector<std::string>{".."});
    auto [n5, o5] = take(~uint64_t{0}, 100);
    CHECK(n5.empty());
    (void)o2;
    (void)o3;
    (void)o4;
    (void)o5;
  }
  SECTION("entry fields") {
    const uint64_t sub = fs.mkdir(d, "sub");
    std::vector<DirEntry> seen;
    std::vector<std::string> names;
    REQUIRE(fs.p->readdir(*fh, 0, [&](const DirEntry& e) {
      seen.push_back(e);
      names.emplace_back(e.name);
      return true;
    }));
    REQUIRE(seen.size() == 8);
    CHECK(seen[0].ino == d);
    CHECK(seen[0].type == DT_DIR);
    CHECK(seen[1].ino == fs.root());
    CHECK(seen[2].ino == fs.node(d, "a"));
    CHECK(seen[2].type == DT_REG);
    CHECK(names[7] == "sub");
    CHECK(seen[7].ino == sub);
    CHECK(seen[7].type == DT_DIR);
  }
  fs.p->releasedir(*fh);
  CHECK(err(fs.p->readdir(*fh, 0, [](const DirEntry&) { return true; })) == EBADF);
}

TEST_CASE("memory: handle access modes", "[vfs][memory]") {
  Fs fs;
  const uint64_t f = fs.file(fs.root(), "f", "data");
  const uint64_t ro = fs.open(f, O_RDONLY);
  const uint64_t wo = fs.open(f, O_WRONLY);
  const uint64_t rw = fs.open(f, O_RDWR);
  std::string out;
  CHECK(err(fs.p->read(wo, 0, 4, out)) == EBADF);
  CHECK(err(fs.p->write(ro, 0, "x")) == EBADF);
  CHECK(err(fs.p->fallocate(ro, 0, 0, 10)) == EBADF);
  CHECK(fs.read(ro, 0, 4) == "data");
  CHECK(fs.read(rw, 1, 100) == "ata");
  CHECK(fs.read(rw, 4, 100).empty());
  CHECK(fs.read(rw, 1000, 100).empty());
  REQUIRE(fs.p->write(wo, 0, "D"));
  REQUIRE(fs.p->write(rw, 1, "A"));
  CHECK(fs.read(ro, 0, 4) == "DAta");
  CHECK(fs.p->flush(ro));
  CHECK(fs.p->fsync(rw, true));

  CHECK(err(fs.p->read(777, 0, 4, out)) == EBADF);
  CHECK(err(fs.p->write(777, 0, "x")) == EBADF);
  CHECK(err(fs.p->flush(777)) == EBADF);
  CHECK(err(fs.p->open(f, O_ACCMODE)) == EINVAL);
  CHECK(err(fs.p->open(fs.root(), O_RDONLY)) == EISDIR);
  CHECK(err(fs.p->open(999, O_RDONLY)) == ENOENT);

  // A directory handle is not a file handle, and the other way round.
  auto dh = fs.p->opendir(fs.root());
  REQUIRE(dh);
  CHECK(err(fs.p->read(*dh, 0, 1, out)) == EBADF);
  CHECK(err(fs.p->readdir(ro, 0, [](const DirEntry&) { return true; })) == EBADF);
  fs.p->release(*dh);  // ignored: not a file handle
  CHECK(fs.p->readdir(*dh, 0, [](const DirEntry&) { return true; }));
  fs.p->releasedir(*dh);

  fs.p->release(ro);
  fs.p->release(wo);
  fs.p->release(rw);
  fs.p->release(rw);  // twice: ignored
  CHECK(err(fs.p->read(ro, 0, 4, out)) == EBADF);
}

TEST_CASE("memory: O_APPEND and O_TRUNC", "[vfs][memory]") {
  Fs fs;
  const uint64_t f = fs.file(fs.root(), "f", "start");
  const uint64_t ap = fs.open(f, O_WRONLY | O_APPEND);
  auto w = fs.p->write(ap, 0, "+end");
  REQUIRE(w);
  CHECK(*w == 4);
  REQUIRE(fs.p->write(ap, 2, "!"));
  fs.p->release(ap);
  CHECK(fs.contents(f) == "start+end!");

  SetAttr old;
  old.valid = FATTR_MTIME;
  old.mtime = {1000, 0};
  REQUIRE(fs.p->setattr(f, old, 0));
  const uint64_t tr = fs.open(f, O_RDWR | O_TRUNC);
  CHECK(fs.attr(f).st_size == 0);
  CHECK(fs.attr(f).st_mtim.tv_sec > 1000);
  CHECK(fs.read(tr, 0, 100).empty());
  fs.p->release(tr);
  CHECK(fs.usedBytes() == 0);
}

TEST_CASE("memory: truncate up and down", "[vfs][memory]") {
  Fs fs(1 * kMiB);
  const uint64_t f = fs.file(fs.root(), "f", "abcdefgh");
  SetAttr in;
  in.valid = FATTR_SIZE;

  in.size = 3;
  auto st = fs.p->setattr(f, in, 0);
  REQUIRE(st);
  CHECK(st->st_size == 3);
  CHECK(fs.contents(f) == "abc");

  in.size = 200000;  // across chunks: zeros, never the old bytes
  st = fs.p->setattr(f, in, 0);
  REQUIRE(st);
  CHECK(st->st_size == 200000);
  CHECK(st->st_blocks == (200000 + 511) / 512);
  std::string expect = "abc" + std::string(200000 - 3, '\0');
  CHECK(fs.contents(f) == expect);
  CHECK(fs.usedBytes() == 200704);  // 49 blocks of 4096

  in.size = 2 * kMiB;
  CHECK(err(fs.p->setattr(f, in, 0)) == ENOSPC);
  CHECK(fs.attr(f).st_size == 200000);
  in.size = uint64_t{1} << 63;
  CHECK(err(fs.p->setattr(f, in, 0)) == EFBIG);

  in.size = 0;
  REQUIRE(fs.p->setattr(f, in, 0));
  CHECK(fs.usedBytes() == 0);

  // Through a handle (ftruncate).
  const uint64_t fh = fs.open(f, O_RDWR);
  in.size = 10;
  REQUIRE(fs.p->setattr(f, in, fh));
  CHECK(fs.read(fh, 0, 100) == std::string(10, '\0'));
  CHECK(err(fs.p->setattr(f, in, 4242)) == EBADF);
  CHECK(err(fs.p->setattr(fs.root(), in, fh)) == EBADF);
  fs.p->release(fh);

  CHECK(err(fs.p->setattr(fs.root(), in, 0)) == EISDIR);
  auto l = fs.p->symlink(fs.root(), "l", "t", kUser);
  REQUIRE(l);
  CHECK(err(fs.p->setattr(l->node, in, 0)) == EINVAL);
  CHECK(err(fs.p->setattr(999, in, 0)) == ENOENT);
}

TEST_CASE("memory: max_bytes is enforced", "[vfs][memory]") {
  Fs fs(1 * kMiB);
  auto st = fs.p->statfs();
  REQUIRE(st);
  CHECK(st->f_bsize == 4096);
  CHECK(st->f_blocks == 256);
  CHECK(st->f_bfree == 256);
  CHECK(st->f_bavail == 256);
  CHECK(st->f_files == 1'000'000);
  CHECK(st->f_ffree == 1'000'000 - 1);
  CHECK(st->f_namemax == 255);

  auto c = fs.p->create(fs.root(), "f", 0644, O_RDWR, kUser);
  REQUIRE(c);
  const uint64_t fh = c->second;

  // A write far away would need the hole: refused, and nothing allocated.
  CHECK(err(fs.p->write(fh, uint64_t{1} << 40, "x")) == ENOSPC);
  CHECK(err(fs.p->write(fh, uint64_t{INT64_MAX}, "xy")) == EFBIG);
  CHECK(err(fs.p->write(fh, ~uint64_t{0}, "x")) == EFBIG);
  CHECK(fs.attr(c->first.node).st_size == 0);

  REQUIRE(fs.p->write(fh, 0, std::string(kMiB - 10, 'a')));
  CHECK(err(fs.p->write(fh, kMiB - 10, std::string(11, 'b'))) == ENOSPC);
  auto w = fs.p->write(fh, kMiB - 10, std::string(10, 'b'));
  REQUIRE(w);
  CHECK(*w == 10);
  REQUIRE(fs.p->write(fh, 0, std::string(1000, 'c')));  // overwriting costs nothing
  st = fs.p->statfs();
  REQUIRE(st);
  CHECK(st->f_bfree == 0);
  CHECK(st->f_ffree == 1'000'000 - 2);

  // Another file cannot grow; the space comes back when the first one goes.
  auto g = fs.p->create(fs.root(), "g", 0644, O_RDWR, kUser);
  REQUIRE(g);
  CHECK(err(fs.p->write(g->second, 0, "x")) == ENOSPC);
  fs.p->release(fh);
  REQUIRE(fs.p->unlink(fs.root(), "f"));
  CHECK(fs.usedBytes() == kMiB);  // the server still holds the node
  fs.p->forget(c->first.node);
  CHECK(fs.usedBytes() == 0);
  REQUIRE(fs.p->write(g->second, 0, "x"));
  fs.p->release(g->second);
}

TEST_CASE("memory: data across chunk boundaries", "[vfs][memory]") {
  Fs fs(4 * kMiB);
  auto c = fs.p->create(fs.root(), "f", 0644, O_RDWR, kUser);
  REQUIRE(c);
  const uint64_t fh = c->second;
  std::string data;
  for (int i = 0; i < 300000; ++i) {
    data.push_back(static_cast<char>('a' + i % 26));
  }
  REQUIRE(fs.p->write(fh, 60000, data));
  REQUIRE(fs.p->write(fh, 500000, "end"));  // a hole between
  CHECK(fs.attr(c->first.node).st_size == 500003);
  CHECK(fs.read(fh, 0, 60000) == std::string(60000, '\0'));
  CHECK(fs.read(fh, 60000, 300000) == data);
  CHECK(fs.read(fh, 65530, 20) == data.substr(5530, 20));
  CHECK(fs.read(fh, 360000, 140000) == std::string(140000, '\0'));
  CHECK(fs.read(fh, 499999, 100) == std::string("\0end", 4));
  fs.p->release(fh);
}

TEST_CASE("memory: fallocate", "[vfs][memory]") {
  Fs fs(1 * kMiB);
  auto c = fs.p->create(fs.root(), "f", 0644, O_RDWR, kUser);
  REQUIRE(c);
  const uint64_t f = c->first.node;
  const uint64_t fh = c->second;
  REQUIRE(fs.p->fallocate(fh, 0, 0, 8192));
  CHECK(fs.attr(f).st_size == 8192);
  CHECK(fs.read(fh, 0, 8192) == std::string(8192, '\0'));
  REQUIRE(fs.p->fallocate(fh, FALLOC_FL_KEEP_SIZE, 0, 65536));
  CHECK(fs.attr(f).st_size == 8192);
  CHECK(fs.attr(f).st_blocks == 128);
  CHECK(fs.usedBytes() == 65536);
  CHECK(err(fs.p->fallocate(fh, FALLOC_FL_KEEP_SIZE, 0, 2 * kMiB)) == ENOSPC);
  CHECK(err(fs.p->fallocate(fh, 0, kMiB, 1)) == ENOSPC);
  CHECK(err(fs.p->fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 10)) == EOPNOTSUPP);
  CHECK(err(fs.p->fallocate(fh, 0, 0, 0)) == EINVAL);
  CHECK(err(fs.p->fallocate(fh, 0, ~uint64_t{0}, 2)) == EFBIG);
  CHECK(err(fs.p->fallocate(999, 0, 0, 1)) == EBADF);
  // Writing into the reservation costs nothing more.
  REQUIRE(fs.p->write(fh, 8192, std::string(4096, 'x')));
  CHECK(fs.usedBytes() == 65536);
  // truncate frees the reservation.
  SetAttr in;
  in.valid = FATTR_SIZE;
  in.size = 4096;
  REQUIRE(fs.p->setattr(f, in, fh));
  CHECK(fs.usedBytes() == 4096);
  fs.p->release(fh);
}

TEST_CASE("memory: lseek SEEK_DATA and SEEK_HOLE", "[vfs][memory]") {
  Fs fs;
  const uint64_t f = fs.file(fs.root(), "f", std::string(100, 'x'));
  const uint64_t fh = fs.open(f, O_RDONLY);
  auto r = fs.p->lseek(fh, 10, SEEK_DATA);
  REQUIRE(r);
  CHECK(*r == 10);
  r = fs.p->lseek(fh, 10, SEEK_HOLE);
  REQUIRE(r);
  CHECK(*r == 100);
  CHECK(err(fs.p->lseek(fh, 100, SEEK_DATA)) == ENXIO);
  CHECK(err(fs.p->lseek(fh, 100, SEEK_HOLE)) == ENXIO);
  CHECK(err(fs.p->lseek(fh, 0, SEEK_SET)) == EINVAL);
  CHECK(err(fs.p->lseek(999, 0, SEEK_DATA)) == EBADF);
  fs.p->release(fh);
}

TEST_CASE("memory: times", "[vfs][memory]") {
  Fs fs;
  const uint64_t d = fs.mkdir(fs.root(), "d");
  const uint64_t f = fs.file(d, "f", "x");
  SetAttr old;
  old.valid = FATTR_ATIME | FATTR_MTIME;
  old.atime = {100, 5};
  old.mtime = {200, 7};
  auto st = fs.p->setattr(f, old, 0);
  REQUIRE(st);
  CHECK(st->st_atim.tv_sec == 100);
  CHECK(st->st_atim.tv_nsec == 5);
  CHECK(st->st_mtim.tv_sec == 200);
  CHECK(st->st_mtim.tv_nsec == 7);
  CHECK(st->st_ctim.tv_sec > 200);
  REQUIRE(fs.p->setattr(d, old, 0));

  SECTION("a write moves mtime and ctime") {
    const uint64_t fh = fs.open(f, O_WRONLY);
    REQUIRE(fs.p->write(fh, 0, "y"));
    fs.p->release(fh);
    CHECK(fs.attr(f).st_mtim.tv_sec > 200);
    CHECK(fs.attr(d).st_mtim.tv_sec == 200);
  }
  SECTION("a read moves atime (relatime)") {
    CHECK(fs.contents(f) == "x");
    CHECK(fs.attr(f).st_atim.tv_sec > 200);
  }
  SECTION("directory changes move the directory's mtime") {
    fs.file(d, "g");
    CHECK(fs.attr(d).st_mtim.tv_sec > 200);
    REQUIRE(fs.p->setattr(d, old, 0));
    REQUIRE(fs.p->unlink(d, "g"));
    CHECK(fs.attr(d).st_mtim.tv_sec > 200);
    REQUIRE(fs.p->setattr(d, old, 0));
    REQUIRE(fs.p->rename(d, "f", fs.root(), "f", 0));
    CHECK(fs.attr(d).st_mtim.tv_sec > 200);
  }
  SECTION("UTIME_NOW and UTIME_OMIT") {
    SetAttr in;
    in.valid = FATTR_ATIME | FATTR_MTIME;
    in.atime = {0, UTIME_NOW};
    in.mtime = {0, UTIME_OMIT};
    st = fs.p->setattr(f, in, 0);
    REQUIRE(st);
    CHECK(st->st_atim.tv_sec > 200);
    CHECK(st->st_mtim.tv_sec == 200);
    in.valid = FATTR_MTIME | FATTR_MTIME_NOW;
    in.mtime = {0, 0};
    st = fs.p->setattr(f, in, 0);
    REQUIRE(st);
    CHECK(st->st_mtim.tv_sec > 200);
  }
  SECTION("bad nanoseconds") {
    SetAttr in;
    in.valid = FATTR_MTIME;
    in.mtime = {0, 1'000'000'000};
    CHECK(err(fs.p->setattr(f, in, 0)) == EINVAL);
    CHECK(fs.attr(f).st_mtim.tv_sec == 200);
  }
}

TEST_CASE("memory: open handles are capped", "[vfs][memory]") {
  Fs fs;
  const uint64_t f = fs.file(fs.root(), "f");
  std::vector<uint64_t> fhs;
  for (int i = 0; i < 4096; ++i) {
    auto fh = fs.p->open(f, O_RDONLY);
    REQUIRE(fh);
    fhs.push_back(*fh);
  }
  CHECK(err(fs.p->open(f, O_RDONLY)) == EMFILE);
  CHECK(err(fs.p->opendir(fs.root())) == EMFILE);
  CHECK(err(fs.p->create(fs.root(), "g", 0644, O_RDWR, kUser)) == EMFILE);
  CHECK(fs.lookupErr(fs.root(), "g") == ENOENT);
  fs.p->release(fhs.back());
  CHECK(fs.p->opendir(fs.root()));
}

TEST_CASE("memory: statfs counts inodes", "[vfs][memory]") {
  Fs fs;
  const uint64_t d = fs.mkdir(fs.root(), "d");
  fs.file(d, "f");
  auto st = fs.p->statfs();
  REQUIRE(st);
  CHECK(st->f_ffree == 1'000'000 - 3);
  const uint64_t f = fs.node(d, "f");
  REQUIRE(fs.p->unlink(d, "f"));
  st = fs.p->statfs();
  REQUIRE(st);
  CHECK(st->f_ffree == 1'000'000 - 3);  // the server still holds "f"
  fs.p->forget(f);
  st = fs.p->statfs();
  REQUIRE(st);
  CHECK(st->f_ffree == 1'000'000 - 2);
}
