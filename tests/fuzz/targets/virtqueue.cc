// SPDX-License-Identifier: Apache-2.0
// A split virtqueue as the guest lays it out in its RAM: the descriptor table, the available and
// used rings and the buffers all come from the input, which is the guest's memory. The device
// pops every chain, copies requests out, writes replies in and returns them. Property: every
// buffer of every chain lies inside guest memory (ASan's redzones around that memory catch a
// read or write that strays anyway), and a broken ring stops the queue instead of looping.
#include "vfs/virtio/virtqueue.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include "fuzz_check.h"

namespace virtio = matchlock::vfs::virtio;

namespace {

constexpr uint64_t kGuestBase = 0x10000;
constexpr uint64_t kUserBase = 0x7f0000000000;
constexpr size_t kMemSize = 64U << 10;
constexpr uint64_t kAvail = 0x800;  // the descriptor table is at 0 (64 entries at most)
constexpr uint64_t kUsed = 0xa00;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Cursor in(fuzz::asView(data, size));
  uint32_t qsize = 1U << (in.byte() % 7);
  auto base = static_cast<uint16_t>((in.byte() << 8) | in.byte());
  auto mem = std::make_unique<uint8_t[]>(kMemSize);
  std::string_view image = in.take(kMemSize);
  std::memcpy(mem.get(), image.data(), image.size());

  virtio::GuestMemory memory;
  FUZZ_CHECK(memory.add({kGuestBase, kMemSize, kUserBase, mem.get()}));
  virtio::SplitQueue q;
  FUZZ_CHECK(q.setSize(qsize));
  FUZZ_CHECK(q.setRings(memory.guest(kGuestBase, 16ULL * qsize),
                        memory.guest(kGuestBase + kAvail, 6 + 2ULL * qsize),
                        memory.guest(kGuestBase + kUsed, 6 + 8ULL * qsize)));
  q.setBase(base);
  auto inside = [&](const virtio::Buffer& b) {
    return b.data >= mem.get() && b.data + b.len <= mem.get() + kMemSize;
  };
  for (uint32_t round = 0; round < 2 * qsize + 2; ++round) {
    auto popped = q.pop(memory);
    if (!popped || !popped->has_value()) {
      break;  // a ring error stops the queue; nothing offered ends the round
    }
    const virtio::SplitQueue::Popped& p = **popped;
    if (p.broken) {
      FUZZ_CHECK(!p.why.empty());
      q.push(p.chain.head, 0);
      continue;
    }
    uint64_t readable = 0;
    uint64_t writable = 0;
    for (const auto& b : p.chain.readable) {
      FUZZ_CHECK(inside(b));
      readable += b.len;
    }
    for (const auto& b : p.chain.writable) {
      FUZZ_CHECK(inside(b));
      writable += b.len;
    }
    FUZZ_CHECK(readable == p.chain.readable_len && writable == p.chain.writable_len);
    std::string request;
    bool whole = p.chain.gather(&request, 4096);
    FUZZ_CHECK(!whole || request.size() == readable);
    char header[40];
    FUZZ_CHECK(p.chain.peek(header, sizeof(header)) == (readable >= sizeof(header)));
    std::string_view reply(request.data(), std::min<size_t>(request.size(), 64));
    bool fits = p.chain.scatter({std::string_view(header, 16), reply});
    FUZZ_CHECK(fits == (16 + reply.size() <= writable));
    q.push(p.chain.head, fits ? static_cast<uint32_t>(16 + reply.size()) : 0);
    (void)q.wantsInterrupt();
  }
  return 0;
}
