// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace matchlock::vfs::virtio {

/// The guest's RAM as the VMM shares it with a vhost-user backend: regions of guest-physical
/// space, each mapped here and known to the VMM at a user address of its own. Every address the
/// guest or the VMM hands us is translated here, and only a range lying wholly inside one region
/// translates: anything else is refused, never clamped.
class GuestMemory {
 public:
  struct Region {
    uint64_t guest_addr = 0;  ///< guest-physical start
    uint64_t size = 0;
    uint64_t user_addr = 0;   ///< where the VMM has it mapped (ring addresses use these)
    uint8_t* host = nullptr;  ///< where we have it
  };

  GuestMemory() = default;
  ~GuestMemory() { clear(); }
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;
  GuestMemory(GuestMemory&&) = delete;
  GuestMemory& operator=(GuestMemory&&) = delete;

  /// Adds a region at `host`; when `map_base` is set, it is munmap()ed (map_len bytes) with us.
  Status add(const Region& region, void* map_base = nullptr, size_t map_len = 0);
  void clear();
  bool empty() const { return regions_.empty(); }

  /// Host pointer for guest-physical [addr, addr+len), or nullptr.
  uint8_t* guest(uint64_t addr, uint64_t len) const;
  /// Host pointer for VMM user address [addr, addr+len), or nullptr.
  uint8_t* user(uint64_t addr, uint64_t len) const;

 private:
  struct Mapped {
    Region region;
    void* base = nullptr;
    size_t len = 0;
  };
  std::vector<Mapped> regions_;
};

/// One buffer of a descriptor chain, in our address space (guest memory: the guest may change
/// it at any time, so readers copy before they parse).
struct Buffer {
  uint8_t* data = nullptr;
  uint32_t len = 0;
};

/// A descriptor chain: the device-readable buffers (the request) and then the device-writable
/// ones (room for the reply).
struct Chain {
  uint16_t head = 0;
  std::vector<Buffer> readable;
  std::vector<Buffer> writable;
  uint64_t readable_len = 0;
  uint64_t writable_len = 0;

  /// Copies the readable part out (at most `max` bytes; false when it is longer).
  bool gather(std::string* out, size_t max) const;
  /// Copies the first `n` readable bytes to `out`; false (nothing promised) when there are fewer.
  bool peek(void* out, size_t n) const;
  /// Copies `parts`, one after the other, into the writable part; false (nothing written) when
  /// they do not fit.
  bool scatter(std::initializer_list<std::string_view> parts) const;
};

/// A split virtqueue (virtio 1.x, 2.7) as a device sees it, without indirect descriptors or
/// event-index notifications (neither is offered to the driver). The rings live in guest memory
/// that the guest writes concurrently: every descriptor is copied before it is checked, indices
/// are read with acquire and published with release ordering, and a malformed ring never makes us
/// touch memory outside the guest's regions.
class SplitQueue {
 public:
  static constexpr uint32_t kMaxSize = 32768;

  /// Queue size: a power of two, 1..32768.
  Status setSize(uint32_t size);
  uint32_t size() const { return size_; }
  /// The rings, translated by the caller; checked for size and alignment.
  Status setRings(uint8_t* desc, uint8_t* avail, uint8_t* used);
  /// The index to resume from (SET_VRING_BASE); GET_VRING_BASE reports nextAvail().
  void setBase(uint16_t index) {
    next_avail_ = index;
    next_used_ = index;
  }
  uint16_t nextAvail() const { return next_avail_; }
  bool ready() const { return desc_ != nullptr && size_ != 0; }
  void reset();

  /// The next available chain; nullopt when the driver has offered nothing new. A ring-level
  /// error (an available index that ran ahead by more than the queue size, a head out of range)
  /// is an Error: the queue cannot be trusted any more. A chain whose body is malformed (a loop,
  /// a buffer outside guest memory, a readable buffer after a writable one, an indirect table)
  /// comes back with `broken` set: complete it with 0 bytes and go on.
  struct Popped {
    Chain chain;
    bool broken = false;
    std::string why;
  };
  Result<std::optional<Popped>> pop(const GuestMemory& memory);
  /// Returns a chain to the driver with `written` bytes in its writable part.
  void push(uint16_t head, uint32_t written);
  /// Whether the driver wants an interrupt now (it has not set VRING_AVAIL_F_NO_INTERRUPT).
  bool wantsInterrupt() const;

 private:
  uint32_t size_ = 0;
  uint8_t* desc_ = nullptr;
  uint8_t* avail_ = nullptr;
  uint8_t* used_ = nullptr;
  uint16_t next_avail_ = 0;
  uint16_t next_used_ = 0;
};

}  // namespace matchlock::vfs::virtio
