// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"
#include "vfs/virtio/virtqueue.h"

namespace matchlock::vfs::virtio {

/// A vhost-user backend (the device half of a virtio device whose rings the VMM hands to another
/// process; QEMU's docs/interop/vhost-user.rst) on the caller's ev::Loop: it listens on a Unix
/// socket, takes one VMM connection, maps the guest memory the VMM shares (memfd regions), and
/// serves each chain the driver offers on a queue through `serve`. Device-agnostic: the virtio-fs
/// device is SandboxVfs's use of it.
///
/// Offered: VIRTIO_F_VERSION_1 plus the device's own bits, and of the protocol features only MQ;
/// not offered: REPLY_ACK, shared-memory logs, indirect descriptors, event index, packed rings
/// (so every ring is a plain split ring, served once its kick fd, addresses and memory are in).
/// Everything the VMM and the guest send is checked: message sizes, region bounds, ring placement,
/// queue indices; a malformed message ends the VMM connection, a malformed ring stops that queue, a
/// malformed chain is completed empty. Nothing the guest writes is parsed in place: chains are
/// copied out first.
class VhostUserBackend {
 public:
  /// Serves one chain of queue `queue`; returns the bytes written into its writable part.
  using ServeFn = std::function<uint32_t(size_t queue, const Chain& chain)>;
  struct Options {
    std::string name;       ///< for log lines ("sandbox vm-…: vfs")
    size_t queues = 1;      ///< how many virtqueues the device has
    uint64_t features = 0;  ///< device feature bits besides VIRTIO_F_VERSION_1
  };
  struct Stats {
    bool connected = false;
    uint64_t chains = 0;
    uint64_t broken_chains = 0;
    uint64_t stopped_queues = 0;
    uint64_t interrupts = 0;
  };

  /// Binds `socket_path` (mode 0600; a stale socket file is replaced) and waits for the VMM.
  [[nodiscard]] static Result<std::unique_ptr<VhostUserBackend>> listen(
      ev::Loop& loop, const std::string& socket_path, Options options, ServeFn serve);
  ~VhostUserBackend();
  VhostUserBackend(const VhostUserBackend&) = delete;
  VhostUserBackend& operator=(const VhostUserBackend&) = delete;
  VhostUserBackend(VhostUserBackend&&) = delete;
  VhostUserBackend& operator=(VhostUserBackend&&) = delete;

  const Stats& stats() const { return stats_; }
  const std::string& socketPath() const { return path_; }

 private:
  struct Queue {
    SplitQueue ring;
    uint64_t desc_addr = 0;  ///< VMM user addresses, kept to re-translate on a new memory table
    uint64_t avail_addr = 0;
    uint64_t used_addr = 0;
    bool have_addrs = false;
    bool stopped = false;  ///< a ring-level error: never served again
    Fd kick;
    Fd call;
    ev::Watch watch;
  };
  struct Message;

  VhostUserBackend(ev::Loop& loop, Options options, ServeFn serve);
  void onAccept();
  void onReadable();
  bool readMessage();  ///< false: the connection ended
  Status handle(Message& m);
  Status reply(uint32_t request, std::string_view payload);
  Status translateRings(Queue& q);
  Status startIfReady(size_t index);
  void stopQueue(size_t index);
  void drain(size_t index);
  void disconnect(const std::string& why);

  ev::Loop& loop_;
  Options options_;
  ServeFn serve_;
  std::string path_;
  Fd listener_;
  ev::Watch listener_watch_;
  Fd conn_;
  ev::Watch conn_watch_;
  GuestMemory memory_;
  std::vector<Queue> queues_;
  uint64_t acked_features_ = 0;
  Stats stats_;
};

}  // namespace matchlock::vfs::virtio
