// SPDX-License-Identifier: Apache-2.0
// The FUSE server against hand-built requests: the router, the node and handle tables, and the
// strict decoding a hostile guest meets (malformed, truncated and random messages).
#include "vfs/fuse/server.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/stat.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "vfs/provider.h"

namespace {

using matchlock::vfs::Caller;
using matchlock::vfs::HookRule;
using matchlock::vfs::Hooks;
using matchlock::vfs::makeMemoryProvider;
using matchlock::vfs::Op;
using matchlock::vfs::ProviderPtr;
using matchlock::vfs::fuse::Connection;
using matchlock::vfs::fuse::MountPoint;

template <class T>
std::string bytesOf(const T& v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}

struct Reply {
  fuse_out_header h{};
  std::string body;
};

class Harness {
 public:
  explicit Harness(std::vector<MountPoint> mounts, const Hooks* hooks = nullptr) {
    for (auto& m : mounts) {
      m.hooks = hooks;
    }
    conn_ = std::make_unique<Connection>(
        std::move(mounts),
        [this](std::string&& b) {
          Reply r;
          std::memcpy(&r.h, b.data(), sizeof(r.h));
          r.body = b.substr(sizeof(r.h));
          REQUIRE(r.h.len == b.size());
          replies.push_back(std::move(r));
        },
        [this](const matchlock::vfs::FileEvent& e) { events.push_back(e); },
        matchlock::vfs::fuse::Limits{});
  }

  /// Sends one request and returns its reply (or an empty reply when none came).
  Reply call(uint32_t opcode, uint64_t nodeid, const std::string& body) {
    fuse_in_header h{};
    h.len = static_cast<uint32_t>(sizeof(h) + body.size());
    h.opcode = opcode;
    h.unique = ++unique_;
    h.nodeid = nodeid;
    size_t before = replies.size();
    REQUIRE(conn_->receive(bytesOf(h) + body));
    if (replies.size() == before) {
      return Reply{};
    }
    REQUIRE(replies.back().h.unique == h.unique);
    return replies.back();
  }

  void init() {
    fuse_init_in in{};
    in.major = 7;
    in.minor = 36;
    in.max_readahead = 128 * 1024;
    in.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES;
    Reply r = call(FUSE_INIT, 0, bytesOf(in));
    REQUIRE(r.h.error == 0);
    fuse_init_out out{};
    REQUIRE(r.body.size() == sizeof(out));
    std::memcpy(&out, r.body.data(), sizeof(out));
    CHECK(out.major == 7);
    CHECK(out.max_write == 1U << 20);
    CHECK((out.flags & FUSE_DO_READDIRPLUS) != 0);
  }

  fuse_entry_out lookup(uint64_t parent, const std::string& name, int* error = nullptr) {
    Reply r = call(FUSE_LOOKUP, parent, name + '\0');
    fuse_entry_out e{};
    if (error != nullptr) {
      *error = r.h.error;
    }
    if (r.h.error == 0 && r.body.size() >= sizeof(e)) {
      std::memcpy(&e, r.body.data(), sizeof(e));
    }
    return e;
  }

  uint64_t mkdir(uint64_t parent, const std::string& name) {
    fuse_mkdir_in in{};
    in.mode = 0755;
    Reply r = call(FUSE_MKDIR, parent, bytesOf(in) + name + '\0');
    REQUIRE(r.h.error == 0);
    fuse_entry_out e{};
    std::memcpy(&e, r.body.data(), sizeof(e));
    return e.nodeid;
  }

  /// Creates `name` in `parent`, writes `data`, returns {node, fh}.
  std::pair<uint64_t, uint64_t> create(uint64_t parent, const std::string& name,
                                       const std::string& data) {
    fuse_create_in in{};
    in.flags = O_RDWR;
    in.mode = S_IFREG | 0644;
    Reply r = call(FUSE_CREATE, parent, bytesOf(in) + name + '\0');
    REQUIRE(r.h.error == 0);
    fuse_entry_out e{};
    fuse_open_out o{};
    REQUIRE(r.body.size() == sizeof(e) + sizeof(o));
    std::memcpy(&e, r.body.data(), sizeof(e));
    std::memcpy(&o, r.body.data() + sizeof(e), sizeof(o));
    fuse_write_in w{};
    w.fh = o.fh;
    w.size = static_cast<uint32_t>(data.size());
    Reply wr = call(FUSE_WRITE, e.nodeid, bytesOf(w) + data);
    REQUIRE(wr.h.error == 0);
    return {e.nodeid, o.fh};
  }

  /// Writes one byte at `offset - 1`: the file is then `offset` bytes long (sparse).
  void grow(uint64_t node, uint64_t fh, uint64_t offset) {
    fuse_write_in w{};
    w.fh = fh;
    w.offset = offset - 1;
    w.size = 1;
    REQUIRE(call(FUSE_WRITE, node, bytesOf(w) + "y").h.error == 0);
  }

  /// FUSE_OPEN with `flags`; returns the reply's open_flags.
  uint32_t openFlags(uint64_t node, uint32_t flags) {
    fuse_open_in oi{};
    oi.flags = flags;
    Reply o = call(FUSE_OPEN, node, bytesOf(oi));
    REQUIRE(o.h.error == 0);
    fuse_open_out oo{};
    std::memcpy(&oo, o.body.data(), sizeof(oo));
    return oo.open_flags;
  }

  std::vector<std::string> list(uint64_t dir, uint32_t opcode = FUSE_READDIR) {
    fuse_open_in oi{};
    Reply o = call(FUSE_OPENDIR, dir, bytesOf(oi));
    REQUIRE(o.h.error == 0);
    fuse_open_out oo{};
    std::memcpy(&oo, o.body.data(), sizeof(oo));
    std::vector<std::string> names;
    uint64_t off = 0;
    for (;;) {
      fuse_read_in ri{};
      ri.fh = oo.fh;
      ri.offset = off;
      ri.size = 4096;
      Reply r = call(opcode, dir, bytesOf(ri));
      REQUIRE(r.h.error == 0);
      if (r.body.empty()) {
        break;
      }
      size_t pos = 0;
      while (pos < r.body.size()) {
        if (opcode == FUSE_READDIRPLUS) {
          pos += sizeof(fuse_entry_out);
        }
        fuse_dirent d{};
        std::memcpy(&d, r.body.data() + pos, FUSE_NAME_OFFSET);
        names.emplace_back(r.body.substr(pos + FUSE_NAME_OFFSET, d.namelen));
        off = d.off;
        pos += FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + d.namelen);
      }
    }
    fuse_release_in rel{};
    rel.fh = oo.fh;
    REQUIRE(call(FUSE_RELEASEDIR, dir, bytesOf(rel)).h.error == 0);
    return names;
  }

  std::vector<Reply> replies;
  std::vector<matchlock::vfs::FileEvent> events;
  std::unique_ptr<Connection> conn_;

 private:
  uint64_t unique_ = 0;
};

ProviderPtr memory() {
  return makeMemoryProvider(64ULL << 20, Caller{});
}

}  // namespace

TEST_CASE("requests before INIT fail, INIT negotiates our limits") {
  ProviderPtr mem = memory();
  Harness h({MountPoint{"", "/workspace", mem.get(), nullptr}});
  Reply r = h.call(FUSE_LOOKUP, FUSE_ROOT_ID, std::string("a\0", 2));
  CHECK(r.h.error == -EIO);
  h.init();
}

TEST_CASE("create, write, read back, list and remove through one mount") {
  ProviderPtr mem = memory();
  Harness h({MountPoint{"", "/workspace", mem.get(), nullptr}});
  h.init();
  uint64_t dir = h.mkdir(FUSE_ROOT_ID, "src");
  auto [node, fh] = h.create(dir, "a.txt", "hello vfs");
  fuse_read_in ri{};
  ri.fh = fh;
  ri.size = 100;
  Reply rd = h.call(FUSE_READ, node, bytesOf(ri));
  REQUIRE(rd.h.error == 0);
  CHECK(rd.body == "hello vfs");
  auto names = h.list(dir);
  CHECK(names == std::vector<std::string>{".", "..", "a.txt"});
  auto plus = h.list(dir, FUSE_READDIRPLUS);
  CHECK(plus == names);
  int err = 0;
  fuse_entry_out e = h.lookup(dir, "a.txt", &err);
  CHECK(err == 0);
  CHECK(e.nodeid == node);
  CHECK(e.attr.size == 9);
  // A handle is bound to its node: using it on another node is EBADF.
  Reply wrong = h.call(FUSE_READ, dir, bytesOf(ri));
  CHECK(wrong.h.error == -EBADF);
  fuse_release_in rel{};
  rel.fh = fh;
  CHECK(h.call(FUSE_RELEASE, node, bytesOf(rel)).h.error == 0);
  CHECK(h.call(FUSE_READ, node, bytesOf(ri)).h.error == -EBADF);
  CHECK(h.call(FUSE_UNLINK, dir, std::string("a.txt\0", 6)).h.error == 0);
  h.lookup(dir, "a.txt", &err);
  CHECK(err == 0);  // a negative entry: success with node id 0
  CHECK(h.lookup(dir, "a.txt").nodeid == 0);
}

TEST_CASE("names the providers must never see are refused by the server") {
  ProviderPtr mem = memory();
  Harness h({MountPoint{"", "/workspace", mem.get(), nullptr}});
  h.init();
  for (std::string bad : {std::string("..\0", 3), std::string(".\0", 2), std::string("a/b\0", 4),
                          std::string("\0", 1), std::string(300, 'x') + '\0'}) {
    CHECK(h.call(FUSE_LOOKUP, FUSE_ROOT_ID, bad).h.error != 0);
    fuse_mkdir_in in{};
    in.mode = 0755;
    CHECK(h.call(FUSE_MKDIR, FUSE_ROOT_ID, bytesOf(in) + bad).h.error != 0);
  }
  // No terminator inside the body.
  CHECK(h.call(FUSE_LOOKUP, FUSE_ROOT_ID, "abc").h.error == -EINVAL);
  // Unknown nodes and handles.
  CHECK(h.call(FUSE_GETATTR, 999999, std::string(16, '\0')).h.error == -ESTALE);
  fuse_read_in ri{};
  ri.fh = 12345;
  ri.size = 10;
  CHECK(h.call(FUSE_READ, FUSE_ROOT_ID, bytesOf(ri)).h.error == -EBADF);
  // A WRITE whose size claims more than arrived.
  auto [node, fh] = h.create(FUSE_ROOT_ID, "f", "x");
  fuse_write_in w{};
  w.fh = fh;
  w.size = 1000;
  CHECK(h.call(FUSE_WRITE, node, bytesOf(w) + "short").h.error == -EINVAL);
  w.size = 2U << 20;
  CHECK(h.call(FUSE_WRITE, node, bytesOf(w)).h.error == -EINVAL);
  // Truncated fixed arguments.
  CHECK(h.call(FUSE_SETATTR, node, "x").h.error == -EINVAL);
  CHECK(h.call(FUSE_READ, node, "").h.error == -EINVAL);
  CHECK(h.call(4242, node, "").h.error == -ENOSYS);
}

TEST_CASE("a length that cannot be framed breaks the stream") {
  ProviderPtr mem = memory();
  Connection c({MountPoint{"", "/w", mem.get(), nullptr}}, [](std::string&&) {});
  fuse_in_header h{};
  h.len = 10;  // below a header
  CHECK(!c.receive(bytesOf(h)));
  CHECK(!c.receive("more"));
  Connection c2({MountPoint{"", "/w", mem.get(), nullptr}}, [](std::string&&) {});
  h.len = 64U << 20;  // above the largest request
  CHECK(!c2.receive(bytesOf(h)));
}

TEST_CASE("nested mounts: synthetic parents, shadowing, EXDEV and EBUSY") {
  ProviderPtr top = memory();
  ProviderPtr inner = memory();
  Harness h({MountPoint{"", "/workspace", top.get(), nullptr},
             MountPoint{".host/example", "/workspace/.host/example", inner.get(), nullptr}});
  h.init();
  h.create(FUSE_ROOT_ID, "top.txt", "t");
  auto names = h.list(FUSE_ROOT_ID);
  CHECK(std::find(names.begin(), names.end(), ".host") != names.end());
  CHECK(std::find(names.begin(), names.end(), "top.txt") != names.end());
  int err = 0;
  fuse_entry_out host = h.lookup(FUSE_ROOT_ID, ".host", &err);
  REQUIRE(err == 0);
  CHECK((host.attr.mode & S_IFMT) == S_IFDIR);
  CHECK(h.list(host.nodeid) == std::vector<std::string>{".", "..", "example"});
  fuse_entry_out ex = h.lookup(host.nodeid, "example", &err);
  REQUIRE(err == 0);
  auto [f, fh] = h.create(ex.nodeid, "inner.txt", "i");
  (void)fh;
  // Creating in a synthetic directory is refused; the mount point cannot be removed.
  fuse_mkdir_in mi{};
  mi.mode = 0755;
  CHECK(h.call(FUSE_MKDIR, host.nodeid, bytesOf(mi) + std::string("x\0", 2)).h.error == -EROFS);
  CHECK(h.call(FUSE_RMDIR, host.nodeid, std::string("example\0", 8)).h.error == -EBUSY);
  CHECK(h.call(FUSE_RMDIR, FUSE_ROOT_ID, std::string(".host\0", 6)).h.error == -EBUSY);
  // Rename across mounts.
  fuse_rename_in rn{};
  rn.newdir = FUSE_ROOT_ID;
  CHECK(
      h.call(FUSE_RENAME, ex.nodeid, bytesOf(rn) + std::string("inner.txt\0moved\0", 16)).h.error ==
      -EXDEV);
  // Inode numbers do not collide across the two memory trees.
  fuse_entry_out a = h.lookup(FUSE_ROOT_ID, "top.txt");
  fuse_entry_out b = h.lookup(ex.nodeid, "inner.txt");
  CHECK(a.attr.ino != b.attr.ino);
}

TEST_CASE("forget drops nodes; the connection hands everything back when it goes") {
  ProviderPtr mem = memory();
  auto h = std::make_unique<Harness>(std::vector<MountPoint>{{"", "/w", mem.get(), nullptr}});
  h->init();
  auto [node, fh] = h->create(FUSE_ROOT_ID, "f", "data");
  (void)fh;
  size_t live = h->conn_->liveNodes();
  h->lookup(FUSE_ROOT_ID, "f");  // a second reference
  fuse_forget_in fi{};
  fi.nlookup = 1;
  CHECK(h->call(FUSE_FORGET, node, bytesOf(fi)).h.len == 0);  // no reply
  CHECK(h->conn_->liveNodes() == live);
  CHECK(h->call(FUSE_FORGET, node, bytesOf(fi)).h.len == 0);
  CHECK(h->conn_->liveNodes() == live - 1);
  CHECK(h->conn_->openHandles() == 1);
  h.reset();  // releases the handle and nodes without crashing the provider
}

TEST_CASE("hooks block with an errno and report file events") {
  ProviderPtr mem = memory();
  Hooks hooks;
  HookRule block;
  block.name = "no-secrets";
  block.ops = {Op::Create};
  block.path = "/w/*.key";
  block.error = EACCES;
  hooks.rules.push_back(block);
  HookRule watch;
  watch.name = "watch";
  watch.ops = {Op::Write};
  watch.block = false;
  hooks.rules.push_back(watch);
  Harness h({MountPoint{"", "/w", mem.get(), nullptr}}, &hooks);
  h.init();
  fuse_create_in in{};
  in.flags = O_RDWR;
  in.mode = S_IFREG | 0644;
  CHECK(h.call(FUSE_CREATE, FUSE_ROOT_ID, bytesOf(in) + std::string("id.key\0", 7)).h.error ==
        -EACCES);
  h.create(FUSE_ROOT_ID, "ok.txt", "12345");
  bool blocked = false;
  bool wrote = false;
  for (const auto& e : h.events) {
    blocked |=
        e.op == Op::Create && e.path == "/w/id.key" && e.error == EACCES && e.rule == "no-secrets";
    wrote |= e.op == Op::Write && e.path == "/w/ok.txt" && e.size == 5;
  }
  CHECK(blocked);
  CHECK(wrote);
  CHECK(matchlock::vfs::toJsonLine(h.events.back()).find(R"("type":"file")") != std::string::npos);
}

TEST_CASE("random and mutated requests never break the server (fuzz smoke)") {
  ProviderPtr mem = memory();
  ProviderPtr inner = memory();
  std::mt19937_64 rng(20261202);
  // Seeds: well-formed requests of every opcode, then mutated field by field.
  for (int round = 0; round < 3000; ++round) {
    Harness h({MountPoint{"", "/w", mem.get(), nullptr},
               MountPoint{"n/m", "/w/n/m", inner.get(), nullptr}});
    h.init();
    h.create(FUSE_ROOT_ID, "seed" + std::to_string(round % 7), "abc");
    for (int i = 0; i < 20; ++i) {
      fuse_in_header hd{};
      std::string body(rng() % 200, '\0');
      for (char& c : body) {
        c = static_cast<char>(rng() % 4 == 0 ? rng() : (rng() % 3 == 0 ? 0 : 'a' + rng() % 3));
      }
      hd.len = static_cast<uint32_t>(sizeof(hd) + body.size());
      hd.opcode = static_cast<uint32_t>(1 + rng() % 52);
      hd.unique = rng();
      hd.nodeid = rng() % 3 == 0 ? rng() : 1 + rng() % 6;
      if (hd.opcode == FUSE_INIT) {
        hd.opcode = FUSE_GETATTR;
      }
      REQUIRE(h.conn_->receive(bytesOf(hd) + body));
    }
  }
}

TEST_CASE("credit follows processing: a closed gate holds requests back") {
  ProviderPtr mem = memory();
  Harness h({MountPoint{"", "/w", mem.get(), nullptr}});
  h.init();
  REQUIRE(h.conn_->takeConsumed() > 0);  // INIT
  bool open = false;
  h.conn_->setGate([&] { return open; });
  fuse_in_header hd{};
  hd.len = sizeof(hd) + 16;
  hd.opcode = FUSE_GETATTR;
  hd.nodeid = FUSE_ROOT_ID;
  std::string many;
  const int n = 60000;  // 3.4 MiB of requests, more than one largest request
  for (int i = 0; i < n; ++i) {
    hd.unique = 1000 + static_cast<uint64_t>(i);
    many += bytesOf(hd) + std::string(16, '\0');
  }
  size_t before = h.replies.size();
  REQUIRE(h.conn_->receive(many));
  CHECK(h.replies.size() == before);
  // Credit for one largest request at most while nothing is served.
  size_t credit = h.conn_->takeConsumed();
  CHECK(credit > 0);
  CHECK(credit <= (1U << 20) + 8192);
  CHECK(h.conn_->takeConsumed() == 0);
  open = true;
  REQUIRE(h.conn_->process());
  CHECK(h.replies.size() == before + n);
  CHECK(credit + h.conn_->takeConsumed() == many.size());
}

TEST_CASE("a request larger than the stream window gets credit to arrive whole") {
  ProviderPtr mem = memory();
  Harness h({MountPoint{"", "/w", mem.get(), nullptr}});
  h.init();
  (void)h.conn_->takeConsumed();
  auto [node, fh] = h.create(FUSE_ROOT_ID, "big", "");
  (void)h.conn_->takeConsumed();
  fuse_in_header hd{};
  fuse_write_in w{};
  w.fh = fh;
  w.size = 1U << 20;
  hd.len = static_cast<uint32_t>(sizeof(hd) + sizeof(w) + w.size);
  hd.opcode = FUSE_WRITE;
  hd.unique = 5;
  hd.nodeid = node;
  std::string msg = bytesOf(hd) + bytesOf(w) + std::string(w.size, 'x');
  // The first 256 KiB (a window) arrive: all of it is credited although nothing was served.
  REQUIRE(h.conn_->receive(msg.substr(0, 256 * 1024)));
  CHECK(h.conn_->takeConsumed() == 256 * 1024);
  size_t before = h.replies.size();
  REQUIRE(h.conn_->receive(msg.substr(256 * 1024)));
  CHECK(h.replies.size() == before + 1);
  CHECK(h.replies.back().h.error == 0);
}

TEST_CASE("write-only and large read-only opens bypass the guest page cache") {
  ProviderPtr mem = memory();
  Harness h({MountPoint{"", "/workspace", mem.get(), nullptr}});
  // INIT from a kernel that offers FUSE_DIRECT_IO_ALLOW_MMAP in its second flag word.
  fuse_init_in in{};
  in.major = 7;
  in.minor = 38;
  in.max_readahead = 128 * 1024;
  in.flags = FUSE_ASYNC_READ | FUSE_MAX_PAGES | FUSE_INIT_EXT;
  in.flags2 = 1U << 4;
  Reply r = h.call(FUSE_INIT, 0, bytesOf(in));
  REQUIRE(r.h.error == 0);
  fuse_init_out out{};
  std::memcpy(&out, r.body.data(), sizeof(out));
  CHECK((out.flags & FUSE_INIT_EXT) != 0);
  CHECK(out.flags2 == (1U << 4));
  auto [small, small_fh] = h.create(FUSE_ROOT_ID, "small", "tiny");
  auto [big, big_fh] = h.create(FUSE_ROOT_ID, "big", std::string(1U << 20, 'x'));
  h.grow(big, big_fh, 8U << 20);  // the threshold: 8 MiB
  CHECK(h.openFlags(small, O_WRONLY) == FOPEN_DIRECT_IO);
  CHECK(h.openFlags(small, O_RDONLY) == 0);
  CHECK(h.openFlags(small, O_RDWR) == 0);
  CHECK(h.openFlags(big, O_RDONLY) == FOPEN_DIRECT_IO);
  CHECK(h.openFlags(big, O_RDWR) == 0);
}

TEST_CASE("without the kernel's mmap allowance large reads keep the page cache") {
  ProviderPtr mem = memory();
  Harness h({MountPoint{"", "/workspace", mem.get(), nullptr}});
  h.init();  // no FUSE_INIT_EXT
  auto [big, fh] = h.create(FUSE_ROOT_ID, "big", "x");
  h.grow(big, fh, 9U << 20);
  CHECK(h.openFlags(big, O_RDONLY) == 0);
}
