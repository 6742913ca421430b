// SPDX-License-Identifier: Apache-2.0
#include "guest/agent/hostile_vfs.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/stat.h>

#include <cstring>
#include <random>
#include <string_view>

namespace matchlock::guest {
namespace {

template <class T>
std::string raw(const T& v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}

class Script {
 public:
  void req(uint32_t opcode, uint64_t node, const std::string& body) {
    fuse_in_header h{};
    h.len = static_cast<uint32_t>(sizeof(h) + body.size());
    h.opcode = opcode;
    h.unique = ++unique_;
    h.nodeid = node;
    out += raw(h) + body;
  }
  static std::string name(std::string_view n) { return std::string(n) + '\0'; }
  std::string out;

 private:
  uint64_t unique_ = 0;
};

}  // namespace

std::string hostileVfsRequests(uint32_t seed) {
  Script s;
  fuse_init_in init{};
  init.major = 7;
  init.minor = 36;
  init.max_readahead = 1 << 20;
  init.flags = 0xffffffff;
  s.req(FUSE_INIT, 0, raw(init));
  // Names the providers must never see, and escapes through the tree's own traps.
  for (const char* n : {"..", ".", "/etc", "a/../../b", "", "abs_link", "rel_link", "dir_link",
                        "hard_link", "null_dev", "fifo", "suid"}) {
    s.req(FUSE_LOOKUP, FUSE_ROOT_ID, Script::name(n));
  }
  fuse_open_in open_in{};
  open_in.flags = O_RDWR;
  fuse_read_in read_in{};
  read_in.size = 4096;
  fuse_write_in write_in{};
  write_in.size = 5;
  // Forged node ids (the server numbers its nodes from 2) and forged handles on each.
  for (uint64_t node = 1; node < 64; ++node) {
    s.req(FUSE_OPEN, node, raw(open_in));
    s.req(FUSE_GETATTR, node, std::string(16, '\0'));
    s.req(FUSE_LOOKUP, node, Script::name("secret.txt"));
    for (uint64_t fh = 0; fh < 8; ++fh) {
      read_in.fh = fh;
      s.req(FUSE_READ, node, raw(read_in));
      write_in.fh = fh;
      s.req(FUSE_WRITE, node, raw(write_in) + "PWNED");
    }
  }
  // Creation with bad names, symlinks out, a device, a hard link of an outside file.
  fuse_create_in create_in{};
  create_in.flags = O_RDWR;
  create_in.mode = S_IFREG | 06777;
  for (const char* n : {"../escape", "x/y", "..", "/tmp/escape"}) {
    s.req(FUSE_CREATE, FUSE_ROOT_ID, raw(create_in) + Script::name(n));
  }
  s.req(FUSE_SYMLINK, FUSE_ROOT_ID, Script::name("evil") + Script::name("/etc/shadow"));
  s.req(FUSE_LOOKUP, FUSE_ROOT_ID, Script::name("evil"));
  fuse_mknod_in mknod_in{};
  mknod_in.mode = S_IFCHR | 0666;
  mknod_in.rdev = (1 << 8) | 3;
  s.req(FUSE_MKNOD, FUSE_ROOT_ID, raw(mknod_in) + Script::name("hostile_dev"));
  fuse_link_in link_in{};
  for (uint64_t old = 2; old < 20; ++old) {
    link_in.oldnodeid = old;
    s.req(FUSE_LINK, FUSE_ROOT_ID, raw(link_in) + Script::name("hostile_link"));
  }
  fuse_rename_in rename_in{};
  rename_in.newdir = 999999;
  s.req(FUSE_RENAME, FUSE_ROOT_ID,
        raw(rename_in) + Script::name("hello.txt") + Script::name("moved"));
  // A WRITE claiming a megabyte with five bytes behind it; a name without its terminator.
  write_in.size = 1 << 20;
  s.req(FUSE_WRITE, 2, raw(write_in) + "short");
  s.req(FUSE_LOOKUP, FUSE_ROOT_ID, "no-terminator");
  // Random well-framed requests.
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 20000; ++i) {
    std::string body(rng() % 256, '\0');
    for (char& c : body) {
      c = static_cast<char>(rng() % 3 == 0 ? 0 : rng());
    }
    uint32_t opcode = static_cast<uint32_t>(1 + rng() % 52);
    if (opcode == FUSE_INIT) {
      opcode = FUSE_LOOKUP;
    }
    s.req(opcode, rng() % 4 == 0 ? rng() : 1 + rng() % 40, body);
  }
  // Finally bytes that cannot be framed: the host must reset this stream and nothing else.
  uint32_t bad_len = 7;
  s.out += raw(bad_len) + "garbage";
  return s.out;
}

bool HostileReplies::feed(const std::string& data) {
  buf_ += data;
  size_t pos = 0;
  while (buf_.size() - pos >= sizeof(fuse_out_header)) {
    fuse_out_header h{};
    std::memcpy(&h, buf_.data() + pos, sizeof(h));
    if (h.len < sizeof(h) || h.len > (2U << 20) || h.error > 0 || h.error < -4095) {
      bad_ = true;
      break;
    }
    if (buf_.size() - pos < h.len) {
      break;
    }
    ++replies_;
    errors_ += h.error != 0 ? 1 : 0;
    pos += h.len;
  }
  buf_.erase(0, pos);
  return !bad_;
}

}  // namespace matchlock::guest
