// SPDX-License-Identifier: Apache-2.0
#include "vfs/virtio/virtqueue.h"

#include <fmt/format.h>
#include <sys/mman.h>

#include <atomic>
#include <cstring>

namespace matchlock::vfs::virtio {
namespace {

// virtio 1.x split ring layout (2.7): little-endian, which is the host's order on x86-64.
constexpr uint16_t kDescNext = 1;
constexpr uint16_t kDescWrite = 2;
constexpr uint16_t kDescIndirect = 4;
constexpr uint16_t kAvailNoInterrupt = 1;

struct Desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(Desc) == 16);

uint16_t loadAcquire16(const uint8_t* p) {
  return __atomic_load_n(reinterpret_cast<const uint16_t*>(p), __ATOMIC_ACQUIRE);
}

bool inRegion(uint64_t start, uint64_t size, uint64_t addr, uint64_t len) {
  return addr >= start && addr - start <= size && len <= size - (addr - start);
}

}  // namespace

Status GuestMemory::add(const Region& region, void* map_base, size_t map_len) {
  if (region.size == 0 || region.host == nullptr ||
      region.guest_addr + region.size < region.guest_addr ||
      region.user_addr + region.size < region.user_addr) {
    if (map_base != nullptr) {
      ::munmap(map_base, map_len);
    }
    return makeError(Errc::Protocol, "vhost-user: a memory region that wraps or is empty");
  }
  regions_.push_back(Mapped{region, map_base, map_len});
  return ok();
}

void GuestMemory::clear() {
  for (Mapped& m : regions_) {
    if (m.base != nullptr) {
      ::munmap(m.base, m.len);
    }
  }
  regions_.clear();
}

uint8_t* GuestMemory::guest(uint64_t addr, uint64_t len) const {
  for (const Mapped& m : regions_) {
    if (inRegion(m.region.guest_addr, m.region.size, addr, len)) {
      return m.region.host + (addr - m.region.guest_addr);
    }
  }
  return nullptr;
}

uint8_t* GuestMemory::user(uint64_t addr, uint64_t len) const {
  for (const Mapped& m : regions_) {
    if (inRegion(m.region.user_addr, m.region.size, addr, len)) {
      return m.region.host + (addr - m.region.user_addr);
    }
  }
  return nullptr;
}

bool Chain::gather(std::string* out, size_t max) const {
  if (readable_len > max) {
    return false;
  }
  out->resize(static_cast<size_t>(readable_len));
  size_t at = 0;
  for (const Buffer& b : readable) {
    std::memcpy(out->data() + at, b.data, b.len);
    at += b.len;
  }
  return true;
}

bool Chain::peek(void* out, size_t n) const {
  if (readable_len < n) {
    return false;
  }
  auto* dst = static_cast<uint8_t*>(out);
  for (const Buffer& b : readable) {
    if (n == 0) {
      break;
    }
    const size_t take = std::min<size_t>(b.len, n);
    std::memcpy(dst, b.data, take);
    dst += take;
    n -= take;
  }
  return true;
}

bool Chain::scatter(std::initializer_list<std::string_view> parts) const {
  uint64_t total = 0;
  for (std::string_view part : parts) {
    total += part.size();
  }
  if (total > writable_len) {
    return false;
  }
  size_t buf = 0;
  size_t off = 0;
  for (std::string_view part : parts) {
    while (!part.empty()) {  // fits: a buffer is always left while bytes are
      const Buffer& b = writable[buf];
      const size_t n = std::min<size_t>(b.len - off, part.size());
      std::memcpy(b.data + off, part.data(), n);
      part.remove_prefix(n);
      off += n;
      if (off == b.len) {
        ++buf;
        off = 0;
      }
    }
  }
  return true;
}

Status SplitQueue::setSize(uint32_t size) {
  if (size == 0 || size > kMaxSize || (size & (size - 1)) != 0) {
    return makeError(Errc::Protocol, fmt::format("vhost-user: queue size {} is invalid", size));
  }
  size_ = size;
  return ok();
}

Status SplitQueue::setRings(uint8_t* desc, uint8_t* avail, uint8_t* used) {
  if (size_ == 0) {
    return makeError(Errc::Protocol, "vhost-user: ring addresses before the queue size");
  }
  auto misaligned = [](const uint8_t* p, uintptr_t align) {
    return p == nullptr || (reinterpret_cast<uintptr_t>(p) & (align - 1)) != 0;
  };
  if (misaligned(desc, 16) || misaligned(avail, 2) || misaligned(used, 4)) {
    return makeError(Errc::Protocol, "vhost-user: a ring is outside guest memory or misaligned");
  }
  desc_ = desc;
  avail_ = avail;
  used_ = used;
  return ok();
}

void SplitQueue::reset() {
  desc_ = avail_ = used_ = nullptr;
  next_avail_ = next_used_ = 0;
}

Result<std::optional<SplitQueue::Popped>> SplitQueue::pop(const GuestMemory& memory) {
  if (!ready()) {
    return std::optional<Popped>();
  }
  const uint16_t avail_idx = loadAcquire16(avail_ + 2);
  const uint16_t pending = static_cast<uint16_t>(avail_idx - next_avail_);
  if (pending == 0) {
    return std::optional<Popped>();
  }
  if (pending > size_) {
    return makeError(
        Errc::Protocol,
        fmt::format("virtqueue: the driver offered {} buffers on a queue of {}", pending, size_));
  }
  uint16_t head = 0;
  std::memcpy(&head, avail_ + 4 + 2 * (next_avail_ % size_), sizeof(head));
  if (head >= size_) {
    return makeError(Errc::Protocol,
                     fmt::format("virtqueue: chain head {} on a queue of {}", head, size_));
  }
  ++next_avail_;
  Popped p;
  p.chain.head = head;
  auto broken = [&](std::string why) {
    p.broken = true;
    p.why = std::move(why);
    p.chain.readable.clear();
    p.chain.writable.clear();
    p.chain.readable_len = p.chain.writable_len = 0;
    return std::optional<Popped>(std::move(p));
  };
  uint16_t index = head;
  bool seen_writable = false;
  for (uint32_t count = 0;; ++count) {
    if (count >= size_) {
      return broken("a descriptor chain loops");
    }
    Desc d{};
    std::memcpy(&d, desc_ + sizeof(Desc) * index, sizeof(d));  // one copy: then it is ours
    if ((d.flags & kDescIndirect) != 0) {
      return broken("an indirect descriptor (not negotiated)");
    }
    uint8_t* data = d.len == 0 ? nullptr : memory.guest(d.addr, d.len);
    if (d.len != 0 && data == nullptr) {
      return broken(fmt::format("a buffer outside guest memory ({:#x}+{})", d.addr, d.len));
    }
    // An empty buffer carries nothing and has no address to copy from: it only counts for
    // the order (readable before writable).
    if ((d.flags & kDescWrite) != 0) {
      seen_writable = true;
      if (d.len != 0) {
        p.chain.writable.push_back(Buffer{data, d.len});
        p.chain.writable_len += d.len;
      }
    } else {
      if (seen_writable) {
        return broken("a device-readable buffer after a writable one");
      }
      if (d.len != 0) {
        p.chain.readable.push_back(Buffer{data, d.len});
        p.chain.readable_len += d.len;
      }
    }
    if ((d.flags & kDescNext) == 0) {
      break;
    }
    if (d.next >= size_) {
      return broken(fmt::format("descriptor {} chains to {}", index, d.next));
    }
    index = d.next;
  }
  return std::optional<Popped>(std::move(p));
}

void SplitQueue::push(uint16_t head, uint32_t written) {
  if (!ready()) {
    return;
  }
  const uint32_t elem[2] = {head, written};
  std::memcpy(used_ + 4 + 8 * (next_used_ % size_), elem, sizeof(elem));
  ++next_used_;
  __atomic_store_n(reinterpret_cast<uint16_t*>(used_ + 2), next_used_, __ATOMIC_RELEASE);
}

bool SplitQueue::wantsInterrupt() const {
  if (!ready()) {
    return false;
  }
  // The used index must be visible before we read the driver's flags (2.7.7.2).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return (loadAcquire16(avail_) & kAvailNoInterrupt) == 0;
}

}  // namespace matchlock::vfs::virtio
