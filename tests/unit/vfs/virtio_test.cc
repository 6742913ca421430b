// SPDX-License-Identifier: Apache-2.0
// The virtio-fs device over vhost-user, driven the way QEMU and a guest kernel drive it: this test
// is the VMM (a real Unix socket, a real memfd as guest RAM, real eventfds for kicks and calls)
// and the guest driver (descriptor tables and rings written into that memory). Then it turns
// hostile: chains outside guest memory, loops, forged indices, lying FUSE lengths, random rings,
// malformed vhost-user messages. The device must answer what is well-formed, complete or stop
// what is not, and never touch memory outside the guest's.
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "vfs/provider.h"
#include "vfs/virtio/fs_device.h"
#include "vfs/virtio/virtqueue.h"

namespace {

using matchlock::Fd;
using matchlock::vfs::Caller;
using matchlock::vfs::makeMemoryProvider;
using matchlock::vfs::ProviderPtr;
using matchlock::vfs::fuse::MountPoint;
using matchlock::vfs::virtio::FsDevice;
using matchlock::vfs::virtio::GuestMemory;
using matchlock::vfs::virtio::SplitQueue;

constexpr uint64_t kMemSize = 8U << 20;
constexpr uint64_t kGuestBase = 0x100000;       // guest-physical address of the region
constexpr uint64_t kUserBase = 0x7f0000000000;  // where "QEMU" has it mapped
constexpr uint32_t kQueueSize = 64;
// Guest-physical layout: two rings, then a heap for buffers.
constexpr uint64_t kRingBytes = 0x4000;
constexpr uint64_t kHeap = 0x10000;

struct Desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};

template <class T>
std::string bytesOf(const T& v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}

/// The VMM and the guest driver, in one.
class FakeVmm {
 public:
  explicit FakeVmm(const std::string& socket) {
    mem_fd_ = Fd(::memfd_create("guest-ram", MFD_CLOEXEC));
    REQUIRE(mem_fd_);
    REQUIRE(::ftruncate(mem_fd_.get(), static_cast<off_t>(kMemSize)) == 0);
    void* p = ::mmap(nullptr, kMemSize, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd_.get(), 0);
    REQUIRE(p != MAP_FAILED);
    mem_ = static_cast<uint8_t*>(p);
    sock_ = Fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket.c_str(), sizeof(addr.sun_path) - 1);
    REQUIRE(::connect(sock_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    for (auto& q : queues_) {
      q.kick = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      q.call = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    }
  }
  ~FakeVmm() { ::munmap(mem_, kMemSize); }

  void send(uint32_t request, const std::string& payload, std::vector<int> fds = {},
            uint32_t flags = 1) {
    std::string msg = bytesOf(request) + bytesOf(flags) +
                      bytesOf(static_cast<uint32_t>(payload.size())) + payload;
    iovec iov{msg.data(), msg.size()};
    msghdr m{};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)] = {};
    if (!fds.empty()) {
      m.msg_control = control;
      m.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&m);
      REQUIRE(c != nullptr);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    REQUIRE(::sendmsg(sock_.get(), &m, MSG_NOSIGNAL) == static_cast<ssize_t>(msg.size()));
  }
  /// Reads one reply (the socket is blocking; the device answers from the loop `pump` runs).
  std::string replyPayload(const std::function<void()>& pump) {
    std::string buf;
    for (int i = 0; i < 200 && buf.size() < 12; ++i) {
      pump();
      char tmp[256];
      ssize_t n = ::recv(sock_.get(), tmp, sizeof(tmp), MSG_DONTWAIT);
      if (n > 0) {
        buf.append(tmp, static_cast<size_t>(n));
      }
    }
    REQUIRE(buf.size() >= 12);
    uint32_t size = 0;
    std::memcpy(&size, buf.data() + 8, 4);
    return buf.substr(12, size);
  }
  bool connectionClosed(const std::function<void()>& pump) {
    for (int i = 0; i < 50; ++i) {
      pump();
      char c = 0;
      ssize_t n = ::recv(sock_.get(), &c, 1, MSG_DONTWAIT);
      if (n == 0) {
        return true;
      }
    }
    return false;
  }

  /// The start-up QEMU performs, then the rings of both queues.
  void start(const std::function<void()>& pump) {
    send(1, "");  // GET_FEATURES
    std::string f = replyPayload(pump);
    REQUIRE(f.size() == 8);
    uint64_t features = 0;
    std::memcpy(&features, f.data(), 8);
    REQUIRE((features & (1ULL << 32)) != 0);
    send(3, "");                 // SET_OWNER
    send(2, bytesOf(features));  // SET_FEATURES
    std::string table = bytesOf(uint32_t{1}) + bytesOf(uint32_t{0}) + bytesOf(kGuestBase) +
                        bytesOf(kMemSize) + bytesOf(kUserBase) + bytesOf(uint64_t{0});
    send(5, table, {mem_fd_.get()});
    for (uint32_t q = 0; q < 2; ++q) {
      send(8, bytesOf(q) + bytesOf(kQueueSize));    // SET_VRING_NUM
      send(10, bytesOf(q) + bytesOf(uint32_t{0}));  // SET_VRING_BASE
      const uint64_t desc = kRingBytes * q;
      const uint64_t avail = desc + 16 * kQueueSize;
      const uint64_t used = avail + 0x1000;
      send(9, bytesOf(q) + bytesOf(uint32_t{0}) + bytesOf(kUserBase + desc) +
                  bytesOf(kUserBase + used) + bytesOf(kUserBase + avail) + bytesOf(uint64_t{0}));
      send(12, bytesOf(uint64_t{q}), {queues_[q].kick.get()});
      send(13, bytesOf(uint64_t{q}), {queues_[q].call.get()});
    }
    pump();
  }

  uint8_t* at(uint64_t gpa) { return mem_ + (gpa - kGuestBase); }
  Desc* descs(uint32_t q) { return reinterpret_cast<Desc*>(at(kGuestBase + kRingBytes * q)); }
  uint16_t* avail(uint32_t q) {
    return reinterpret_cast<uint16_t*>(at(kGuestBase + kRingBytes * q + 16 * kQueueSize));
  }
  uint8_t* used(uint32_t q) { return at(kGuestBase + kRingBytes * q + 16 * kQueueSize + 0x1000); }
  uint16_t usedIdx(uint32_t q) {
    uint16_t v = 0;
    std::memcpy(&v, used(q) + 2, 2);
    return v;
  }

  /// Places `request` and room for `room` reply bytes as a chain at descriptor `head`; returns
  /// the reply's guest address.
  uint64_t placeChain(uint32_t q, uint16_t head, const std::string& request, uint32_t room) {
    uint64_t req = heap_;
    std::memcpy(at(req), request.data(), request.size());
    heap_ += (request.size() + 4095) & ~uint64_t{4095};
    uint64_t rep = heap_;
    heap_ += (room + 4095) & ~uint64_t{4095};
    if (heap_ > kGuestBase + kMemSize - (2U << 20)) {
      heap_ = kGuestBase + kHeap;
    }
    Desc* d = descs(q);
    const auto next = static_cast<uint16_t>((head + 1) % kQueueSize);
    d[head] = Desc{req, static_cast<uint32_t>(request.size()), 1, next};
    d[next] = Desc{rep, room, 2, 0};
    return rep;
  }
  void offer(uint32_t q, uint16_t head) {
    uint16_t* a = avail(q);
    a[2 + (a[1] % kQueueSize)] = head;
    __atomic_store_n(&a[1], static_cast<uint16_t>(a[1] + 1), __ATOMIC_RELEASE);
  }
  void kick(uint32_t q) {
    uint64_t one = 1;
    REQUIRE(::write(queues_[q].kick.get(), &one, 8) == 8);
  }
  bool called(uint32_t q) {
    uint64_t v = 0;
    return ::read(queues_[q].call.get(), &v, 8) == 8;
  }

  /// One FUSE request on the request queue; returns the reply bytes (empty when none).
  std::string call(const std::function<void()>& pump, uint32_t opcode, uint64_t node,
                   const std::string& body, uint32_t room = 8192) {
    fuse_in_header h{};
    h.len = static_cast<uint32_t>(sizeof(h) + body.size());
    h.opcode = opcode;
    h.unique = ++unique_;
    h.nodeid = node;
    return callRaw(pump, bytesOf(h) + body, room);
  }
  /// Any bytes as one request chain on the request queue; returns what the device wrote back.
  std::string callRaw(const std::function<void()>& pump, const std::string& request,
                      uint32_t room) {
    const uint16_t head = next_head_;
    next_head_ = static_cast<uint16_t>((next_head_ + 2) % kQueueSize);
    uint64_t rep = placeChain(1, head, request, room);
    const uint16_t before = usedIdx(1);
    offer(1, head);
    kick(1);
    for (int i = 0; i < 100 && usedIdx(1) == before; ++i) {
      pump();
    }
    REQUIRE(usedIdx(1) == static_cast<uint16_t>(before + 1));
    uint32_t elem[2];
    std::memcpy(elem, used(1) + 4 + 8 * (before % kQueueSize), 8);
    REQUIRE(elem[0] == head);
    return std::string(reinterpret_cast<const char*>(at(rep)), elem[1]);
  }

  Fd mem_fd_;
  uint8_t* mem_ = nullptr;
  Fd sock_;
  struct Q {
    Fd kick;
    Fd call;
  };
  Q queues_[2];
  uint64_t heap_ = kGuestBase + kHeap;
  uint64_t unique_ = 0;
  uint16_t next_head_ = 0;
};

fuse_out_header headerOf(const std::string& reply) {
  fuse_out_header h{};
  REQUIRE(reply.size() >= sizeof(h));
  std::memcpy(&h, reply.data(), sizeof(h));
  return h;
}

struct Rig {
  Rig() {
    dir = std::filesystem::temp_directory_path() /
          ("ml-virtio-" + std::to_string(::getpid()) + "-" + std::to_string(++count));
    std::filesystem::create_directories(dir);
    loop = std::move(*matchlock::ev::Loop::create());
    provider = makeMemoryProvider(1U << 20, Caller{});
    std::vector<MountPoint> points = {MountPoint{"0", "/data", provider.get(), nullptr}};
    auto d = FsDevice::listen(*loop, (dir / "vfs.sock").string(), "test", std::move(points),
                              nullptr, matchlock::vfs::fuse::Limits{});
    REQUIRE(d);
    device = std::move(*d);
    vmm = std::make_unique<FakeVmm>((dir / "vfs.sock").string());
    pump = [this] { REQUIRE(loop->runOnce(5)); };
    pump();  // accept
    vmm->start(pump);
  }
  ~Rig() {
    vmm.reset();
    device.reset();
    std::filesystem::remove_all(dir);
  }
  void init() {
    fuse_init_in in{};
    in.major = 7;
    in.minor = 36;
    in.max_readahead = 1U << 20;
    in.flags = FUSE_ASYNC_READ | FUSE_MAX_PAGES;
    auto r = vmm->call(pump, FUSE_INIT, 0, bytesOf(in));
    REQUIRE(headerOf(r).error == 0);
  }

  static inline int count = 0;
  std::filesystem::path dir;
  std::unique_ptr<matchlock::ev::Loop> loop;
  ProviderPtr provider;
  std::unique_ptr<FsDevice> device;
  std::unique_ptr<FakeVmm> vmm;
  std::function<void()> pump;
};

}  // namespace

TEST_CASE("guest memory translates only ranges wholly inside one region") {
  std::vector<uint8_t> ram(4096);
  GuestMemory mem;
  REQUIRE(mem.add(GuestMemory::Region{0x1000, 4096, 0x9000, ram.data()}));
  CHECK(mem.guest(0x1000, 4096) == ram.data());
  CHECK(mem.guest(0x1ff0, 16) == ram.data() + 0xff0);
  CHECK(mem.guest(0x1ff0, 17) == nullptr);
  CHECK(mem.guest(0xfff, 2) == nullptr);
  CHECK(mem.guest(0x1000, ~uint64_t{0}) == nullptr);
  CHECK(mem.guest(~uint64_t{0}, 2) == nullptr);
  CHECK(mem.user(0x9000, 1) == ram.data());
  CHECK(mem.user(0x1000, 1) == nullptr);
  CHECK_FALSE(mem.add(GuestMemory::Region{~uint64_t{0} - 10, 4096, 0, ram.data()}));
}

TEST_CASE("a split queue refuses bad sizes and misplaced rings") {
  SplitQueue q;
  CHECK_FALSE(q.setSize(0));
  CHECK_FALSE(q.setSize(3));
  CHECK_FALSE(q.setSize(65536));
  REQUIRE(q.setSize(8));
  alignas(16) uint8_t rings[512] = {};
  CHECK_FALSE(q.setRings(nullptr, rings, rings));
  CHECK_FALSE(q.setRings(rings + 8, rings + 256, rings + 384));
  CHECK(q.setRings(rings, rings + 256, rings + 384));
}

TEST_CASE("the device serves FUSE requests the way a guest kernel sends them") {
  Rig rig;
  rig.init();
  CHECK(rig.vmm->called(1));
  // mkdir inside tree 0, then look it up: the router and the provider behind the virtqueue.
  fuse_entry_out root{};
  {
    auto r = rig.vmm->call(rig.pump, FUSE_LOOKUP, FUSE_ROOT_ID, std::string("0") + '\0');
    REQUIRE(headerOf(r).error == 0);
    std::memcpy(&root, r.data() + sizeof(fuse_out_header), sizeof(root));
  }
  fuse_mkdir_in mk{};
  mk.mode = 0755;
  auto r = rig.vmm->call(rig.pump, FUSE_MKDIR, root.nodeid, bytesOf(mk) + "sub" + '\0');
  CHECK(headerOf(r).error == 0);
  r = rig.vmm->call(rig.pump, FUSE_LOOKUP, root.nodeid, std::string("sub") + '\0');
  CHECK(headerOf(r).error == 0);
  // The synthetic root is read-only.
  r = rig.vmm->call(rig.pump, FUSE_MKDIR, FUSE_ROOT_ID, bytesOf(mk) + "x" + '\0');
  CHECK(headerOf(r).error == -EROFS);
  // A FORGET on the high-priority queue: completed with nothing written.
  fuse_in_header h{};
  fuse_forget_in fi{1};
  h.len = sizeof(h) + sizeof(fi);
  h.opcode = FUSE_FORGET;
  h.nodeid = root.nodeid;
  rig.vmm->placeChain(0, 0, bytesOf(h) + bytesOf(fi), 0);
  rig.vmm->descs(0)[0].flags = 0;  // a single readable buffer
  rig.vmm->offer(0, 0);
  rig.vmm->kick(0);
  for (int i = 0; i < 50 && rig.vmm->usedIdx(0) == 0; ++i) {
    rig.pump();
  }
  CHECK(rig.vmm->usedIdx(0) == 1);
  CHECK(rig.device->stats().broken_chains == 0);
}

TEST_CASE("a write of a MiB and its read back travel through guest memory") {
  Rig rig;
  rig.init();
  auto r = rig.vmm->call(rig.pump, FUSE_LOOKUP, FUSE_ROOT_ID, std::string("0") + '\0');
  fuse_entry_out root{};
  std::memcpy(&root, r.data() + sizeof(fuse_out_header), sizeof(root));
  fuse_create_in ci{};
  ci.mode = 0644;
  ci.flags = O_RDWR;
  r = rig.vmm->call(rig.pump, FUSE_CREATE, root.nodeid, bytesOf(ci) + "big" + '\0');
  REQUIRE(headerOf(r).error == 0);
  fuse_entry_out e{};
  fuse_open_out o{};
  std::memcpy(&e, r.data() + sizeof(fuse_out_header), sizeof(e));
  std::memcpy(&o, r.data() + sizeof(fuse_out_header) + sizeof(e), sizeof(o));
  std::string data(1U << 19, '\0');
  std::mt19937 rng(7);
  for (char& c : data) {
    c = static_cast<char>(rng());
  }
  fuse_write_in wi{};
  wi.fh = o.fh;
  wi.size = static_cast<uint32_t>(data.size());
  r = rig.vmm->call(rig.pump, FUSE_WRITE, e.nodeid, bytesOf(wi) + data);
  REQUIRE(headerOf(r).error == 0);
  fuse_read_in ri{};
  ri.fh = o.fh;
  ri.size = wi.size;
  r = rig.vmm->call(rig.pump, FUSE_READ, e.nodeid, bytesOf(ri), wi.size + 4096);
  REQUIRE(headerOf(r).error == 0);
  CHECK(r.substr(sizeof(fuse_out_header)) == data);
  // Too little room for the reply: EIO in the header, nothing written past the room.
  r = rig.vmm->call(rig.pump, FUSE_READ, e.nodeid, bytesOf(ri), 4096);
  CHECK(headerOf(r).error == -EIO);
}

TEST_CASE("hostile chains are completed empty or stop their queue, never escape guest memory") {
  Rig rig;
  rig.init();
  auto& vmm = *rig.vmm;
  fuse_in_header h{};
  h.len = sizeof(h);
  h.opcode = FUSE_STATFS;
  h.nodeid = FUSE_ROOT_ID;
  auto hostileChain = [&](uint16_t head, auto&& mutate) {
    vmm.placeChain(1, head, bytesOf(h), 4096);
    mutate(vmm.descs(1));
    const uint16_t before = vmm.usedIdx(1);
    vmm.offer(1, head);
    vmm.kick(1);
    for (int i = 0; i < 50 && vmm.usedIdx(1) == before; ++i) {
      rig.pump();
    }
    REQUIRE(vmm.usedIdx(1) == static_cast<uint16_t>(before + 1));
    uint32_t elem[2];
    std::memcpy(elem, vmm.used(1) + 4 + 8 * (before % kQueueSize), 8);
    return elem[1];
  };
  vmm.next_head_ = 40;
  // A buffer beyond guest memory, one straddling its end, one wrapping the address space.
  CHECK(hostileChain(10, [](Desc* d) { d[11].addr = kGuestBase + kMemSize; }) == 0);
  CHECK(hostileChain(12, [](Desc* d) { d[13].addr = kGuestBase + kMemSize - 100; }) == 0);
  CHECK(hostileChain(14, [](Desc* d) { d[14].addr = ~uint64_t{0} - 4; }) == 0);
  // A loop, a next index out of range, an indirect table, readable after writable.
  CHECK(hostileChain(16, [](Desc* d) { d[17] = Desc{d[17].addr, 64, 1 | 2, 16}; }) == 0);
  CHECK(hostileChain(18, [](Desc* d) { d[19] = Desc{d[19].addr, 64, 1 | 2, 999}; }) == 0);
  CHECK(hostileChain(20, [](Desc* d) { d[20].flags |= 4; }) == 0);
  CHECK(hostileChain(22, [](Desc* d) {
          d[23].flags = 2 | 1;
          d[23].next = 24;
          d[24] = Desc{d[22].addr, 16, 0, 0};
        }) == 0);
  CHECK(rig.device->stats().broken_chains == 7);
  // FUSE headers whose length lies, either way: answered EINVAL for their own unique.
  for (uint32_t len : {1U << 30, 8U, static_cast<uint32_t>(sizeof(h) + 1)}) {
    fuse_in_header lying = h;
    lying.len = len;
    lying.unique = 99;
    auto r = vmm.callRaw(rig.pump, bytesOf(lying), 4096);
    CHECK(headerOf(r).error == -EINVAL);
    CHECK(headerOf(r).unique == 99);
  }
  // Shorter than a FUSE header: completed empty.
  CHECK(vmm.callRaw(rig.pump, "short", 4096).empty());
  // The queue still serves well-formed requests.
  auto r = vmm.call(rig.pump, FUSE_STATFS, FUSE_ROOT_ID, "");
  CHECK(headerOf(r).error == 0);
  // A head out of range stops the queue (ring-level damage); the other queue is unaffected.
  vmm.offer(1, 500);
  vmm.kick(1);
  for (int i = 0; i < 20 && rig.device->stats().stopped_queues == 0; ++i) {
    rig.pump();
  }
  CHECK(rig.device->stats().stopped_queues == 1);
}

TEST_CASE("random rings and random chains never crash the device") {
  Rig rig;
  rig.init();
  auto& vmm = *rig.vmm;
  std::mt19937_64 rng(20261206);
  for (int round = 0; round < 3000; ++round) {
    // Garbage descriptors pointing anywhere (often into guest memory, so some chains carry
    // random FUSE bytes that the server must parse).
    Desc* d = vmm.descs(1);
    for (uint32_t i = 0; i < kQueueSize; ++i) {
      uint64_t addr = (rng() % 4 == 0) ? rng() : kGuestBase + kHeap + rng() % (kMemSize - kHeap);
      d[i] = Desc{addr, static_cast<uint32_t>(rng() % 8192), static_cast<uint16_t>(rng() % 8),
                  static_cast<uint16_t>(rng() % (kQueueSize + 4))};
    }
    for (int k = 0; k < 64; ++k) {
      vmm.at(kGuestBase + kHeap + rng() % (kMemSize - kHeap - 8))[0] = static_cast<uint8_t>(rng());
    }
    vmm.offer(1, static_cast<uint16_t>(rng() % kQueueSize));
    vmm.kick(1);
    rig.pump();
  }
  CHECK(rig.device->stats().stopped_queues == 0);
  CHECK(rig.device->stats().chains >= 3000);
}

TEST_CASE("malformed vhost-user messages end the VMM connection") {
  SECTION("features that were never offered") {
    Rig rig;
    rig.vmm->send(2, bytesOf(~uint64_t{0}));
    CHECK(rig.vmm->connectionClosed(rig.pump));
  }
  SECTION("a memory table whose descriptors do not match its regions") {
    Rig rig;
    std::string table = bytesOf(uint32_t{2}) + bytesOf(uint32_t{0}) + std::string(64, '\0');
    rig.vmm->send(5, table, {rig.vmm->mem_fd_.get()});
    CHECK(rig.vmm->connectionClosed(rig.pump));
  }
  SECTION("a queue index the device does not have") {
    Rig rig;
    rig.vmm->send(8, bytesOf(uint32_t{7}) + bytesOf(uint32_t{64}));
    CHECK(rig.vmm->connectionClosed(rig.pump));
  }
  SECTION("a ring placed outside guest memory") {
    Rig rig;
    rig.vmm->send(9, bytesOf(uint32_t{1}) + bytesOf(uint32_t{0}) + bytesOf(uint64_t{1}) +
                         bytesOf(uint64_t{2}) + bytesOf(uint64_t{3}) + bytesOf(uint64_t{0}));
    CHECK(rig.vmm->connectionClosed(rig.pump));
  }
  SECTION("an oversized message") {
    Rig rig;
    rig.vmm->send(5, std::string(5000, 'x'));
    CHECK(rig.vmm->connectionClosed(rig.pump));
  }
}
