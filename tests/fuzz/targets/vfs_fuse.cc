// SPDX-License-Identifier: Apache-2.0
// The FUSE protocol server as a hostile guest drives it: a sequence of requests (opcode, node
// and handle picked from what earlier replies handed out, and a body of any bytes), or a raw byte
// stream through the framing. The connection's tree is a memory mount at the root, a read-only
// host mount at /ro and a writable one at /rw, both holding symlinks that point outside.
// Properties: every reply is a well-formed FUSE reply to the request it answers, no reply ever
// carries the bytes of the file outside the mounts, and that file and its directory are never
// changed, whatever the guest does.
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/fd.h"
#include "fuzz_check.h"
#include "vfs/fuse/server.h"
#include "vfs/provider.h"

namespace fs = std::filesystem;
namespace vfs = matchlock::vfs;

namespace {

constexpr std::string_view kMarker = "OUTSIDE-THE-MOUNTS-6d1f0a";

struct Fixture {
  fs::path base;
  fs::path ro, rw, outside;

  Fixture() {
    std::string tmpl = (fs::temp_directory_path() / "ml-fuzz-vfs.XXXXXX").string();
    FUZZ_CHECK(::mkdtemp(tmpl.data()) != nullptr);
    base = tmpl;
    ro = base / "ro";
    rw = base / "rw";
    outside = base / "outside";
    fs::create_directories(ro / "dir");
    fs::create_directories(rw);
    fs::create_directories(outside);
    std::ofstream(outside / "secret") << kMarker;
    std::ofstream(ro / "hello") << "hello from the read-only mount\n";
    fs::create_symlink("../outside", ro / "up");
    fs::create_symlink(outside, ro / "abs");
    fs::create_symlink("../outside/secret", ro / "dir" / "s");
    ::atexit([] { fs::remove_all(instance().base); });
  }

  static Fixture& instance() {
    static Fixture f;
    return f;
  }

  /// Restores the writable mount and checks that nothing outside the mounts moved.
  void resetAndCheck() const {
    for (const auto& e : fs::directory_iterator(rw)) {
      fs::remove_all(e.path());
    }
    fs::create_symlink("../outside", rw / "up");
    fs::create_symlink(outside / "secret", rw / "abs");
    size_t n = 0;
    for (const auto& e : fs::directory_iterator(outside)) {
      FUZZ_CHECK(e.path().filename() == "secret");
      ++n;
    }
    FUZZ_CHECK(n == 1);
    struct stat st {};
    FUZZ_CHECK(::lstat((outside / "secret").c_str(), &st) == 0);
    FUZZ_CHECK(S_ISREG(st.st_mode) && st.st_size == static_cast<off_t>(kMarker.size()));
    FUZZ_CHECK((st.st_mode & 07777) == 0644 || (st.st_mode & 07777) == 0664);
    FUZZ_CHECK(st.st_nlink == 1);
  }
};

template <class T>
std::string bytesOf(const T& v) {
  return {reinterpret_cast<const char*>(&v), sizeof(T)};
}

vfs::ProviderPtr hostProvider(const fs::path& root, bool read_only) {
  matchlock::Fd fd(::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  FUZZ_CHECK(static_cast<bool>(fd));
  auto p = vfs::makeHostProvider(std::move(fd), read_only, vfs::Caller{});
  FUZZ_CHECK(p.has_value());
  return std::move(*p);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Fixture& fx = Fixture::instance();
  fx.resetAndCheck();
  auto memory = vfs::makeMemoryProvider(1U << 20, vfs::Caller{});
  auto ro = hostProvider(fx.ro, true);
  auto rw = hostProvider(fx.rw, false);

  std::vector<uint64_t> nodes{FUSE_ROOT_ID};
  std::vector<uint64_t> handles{0};  // [0]: an id never handed out
  uint32_t last_opcode = 0;
  uint64_t last_unique = 0;
  auto onReply = [&](std::string&& b) {
    FUZZ_CHECK(b.size() >= sizeof(fuse_out_header));
    FUZZ_CHECK(b.find(kMarker) == std::string::npos);
    fuse_out_header h{};
    std::memcpy(&h, b.data(), sizeof(h));
    FUZZ_CHECK(h.len == b.size());
    FUZZ_CHECK(h.error <= 0 && h.error > -4096);
    FUZZ_CHECK(h.error == 0 || b.size() == sizeof(h));
    if (last_unique != 0) {
      FUZZ_CHECK(h.unique == last_unique);
    }
    std::string_view body(b.data() + sizeof(h), b.size() - sizeof(h));
    if (h.error != 0) {
      return;
    }
    switch (last_opcode) {
      case FUSE_LOOKUP:
      case FUSE_MKDIR:
      case FUSE_MKNOD:
      case FUSE_SYMLINK:
      case FUSE_LINK:
      case FUSE_CREATE:
        if (body.size() >= sizeof(fuse_entry_out)) {
          fuse_entry_out e{};
          std::memcpy(&e, body.data(), sizeof(e));
          nodes.push_back(e.nodeid);
        }
        if (last_opcode == FUSE_CREATE && body.size() >= sizeof(fuse_entry_out) + 8) {
          uint64_t fh = 0;
          std::memcpy(&fh, body.data() + sizeof(fuse_entry_out), sizeof(fh));
          handles.push_back(fh);
        }
        break;
      case FUSE_OPEN:
      case FUSE_OPENDIR:
        if (body.size() >= sizeof(fuse_open_out)) {
          fuse_open_out o{};
          std::memcpy(&o, body.data(), sizeof(o));
          handles.push_back(o.fh);
        }
        break;
      default:
        break;
    }
  };
  vfs::fuse::Limits limits;
  limits.max_write = 64 * 1024;
  vfs::fuse::Connection conn({vfs::fuse::MountPoint{"", "/", memory.get(), nullptr},
                              vfs::fuse::MountPoint{"ro", "/ro", ro.get(), nullptr},
                              vfs::fuse::MountPoint{"rw", "/rw", rw.get(), nullptr}},
                             onReply, nullptr, limits);

  fuzz::Cursor in(fuzz::asView(data, size));
  uint8_t mode = in.byte();
  uint64_t unique = 0;
  auto request = [&](uint32_t opcode, uint64_t nodeid, const std::string& body) {
    fuse_in_header h{};
    h.len = static_cast<uint32_t>(sizeof(h) + body.size());
    h.opcode = opcode;
    h.unique = ++unique;
    h.nodeid = nodeid;
    last_opcode = opcode;
    last_unique = unique;
    (void)conn.receive(bytesOf(h) + body);
  };
  fuse_init_in init{};
  init.major = 7;
  init.minor = 36;
  init.max_readahead = 128 * 1024;
  init.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES;
  request(FUSE_INIT, 0, bytesOf(init));

  if ((mode & 1) != 0) {
    // Raw stream: the framing itself is under test; replies are checked for shape only.
    last_unique = 0;
    last_opcode = 0;
    (void)conn.receive(in.rest());
  } else {
    // Records: opcode, node pick, handle pick (0: none; else the body's first 8 bytes become
    // a handle a reply handed out), body length, body.
    while (!in.empty()) {
      uint8_t opcode = in.byte();
      uint8_t node = in.byte();
      uint8_t fh_pick = in.byte();
      size_t len = in.byte();
      std::string body(in.take(len));
      if (fh_pick != 0 && body.size() >= 8) {
        uint64_t fh = handles[(fh_pick - 1U) % handles.size()];
        std::memcpy(body.data(), &fh, sizeof(fh));
      }
      request(opcode % 64, nodes[node % nodes.size()], body);
    }
  }
  return 0;
}
