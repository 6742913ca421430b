// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/result.h"
#include "ev/loop.h"
#include "vfs/fuse/server.h"
#include "vfs/virtio/vhost_user.h"

namespace matchlock::vfs::virtio {

/// A virtio-fs device (virtio 1.2, 5.11) served from the host over vhost-user: the guest kernel's
/// virtiofs driver puts each FUSE request on a virtqueue as one descriptor chain (the request in
/// its readable buffers, room for the reply in its writable ones), and this device answers it with
/// the same fuse::Connection the byte-stream transport uses. Queue 0 is the high-priority queue
/// (FORGETs, no reply), queue 1 the request queue. Each chain is copied out of guest memory before
/// it is parsed; a reply that does not fit the room the guest gave is replaced by EIO.
class FsDevice {
 public:
  static constexpr size_t kQueues = 2;  ///< hiprio + one request queue (num-request-queues=1)

  [[nodiscard]] static Result<std::unique_ptr<FsDevice>> listen(
      ev::Loop& loop, const std::string& socket_path, const std::string& name,
      std::vector<fuse::MountPoint> mounts, fuse::EventFn events, fuse::Limits limits);

  const fuse::Connection& connection() const { return *conn_; }
  const VhostUserBackend::Stats& stats() const { return backend_->stats(); }
  const std::string& socketPath() const { return backend_->socketPath(); }

 private:
  FsDevice() = default;
  uint32_t serve(const Chain& chain);

  std::unique_ptr<fuse::Connection> conn_;
  std::unique_ptr<VhostUserBackend> backend_;
  void sink(std::string_view header, std::string_view payload);

  /// Writes at least this long go to the provider from guest memory, not from our copy.
  static constexpr size_t kScatteredWrite = 64U << 10;
  std::string request_;
  std::vector<std::string_view> write_parts_;
  std::vector<Span> read_into_;
  bool reading_ = false;          ///< a READ is served in place: its reply is the header alone
  const Chain* chain_ = nullptr;  ///< the chain being served (replies go straight into it)
  uint64_t unique_ = 0;
  uint32_t written_ = 0;
};

}  // namespace matchlock::vfs::virtio
