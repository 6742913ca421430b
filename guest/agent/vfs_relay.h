// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "ev/loop.h"
#include "guestproto/mux.h"
#ifdef ML_HOSTILE_VFS
#include "guest/agent/hostile_vfs.h"
#endif

namespace matchlock::guest {

/// One host-served filesystem in the guest (docs/vfs.md): a FUSE mount whose /dev/fuse
/// connection is relayed, message for message, over a channel stream on port 5001 to the host,
/// which serves the FUSE protocol. The relay never interprets a request: it moves whole messages
/// (a /dev/fuse read returns exactly one) and splits the host's replies at their headers' lengths.
class VfsRelay {
 public:
  struct Spec {
    uint32_t index = 0;  ///< the host's tree index (sent in the stream preamble)
    std::string target;
    bool read_only = false;
    bool file = false;     ///< the tree is a single file: mounted on a file
    std::string virtiofs;  ///< the virtio-fs device's tag: served there, not relayed
  };

  /// Opens /dev/fuse and mounts it at the target (created when missing). The kernel queues its
  /// INIT at once; nothing is answered until attach().
  [[nodiscard]] static Result<std::unique_ptr<VfsRelay>> mount(ev::Loop& loop, const Spec& spec);
  ~VfsRelay();
  VfsRelay(const VfsRelay&) = delete;
  VfsRelay& operator=(const VfsRelay&) = delete;

  /// Starts relaying on `stream` (already opened on port 5001): writes the preamble, then every
  /// request. `wake` asks the agent to flush the mux.
  Status attach(guestproto::Mux& mux, uint32_t stream, std::function<void()> wake);
  uint32_t stream() const { return stream_; }
  bool attached() const { return mux_ != nullptr; }
  const Spec& spec() const { return spec_; }
  /// Replies from the host.
  void onData(std::string_view data);
  /// The host is gone: the FUSE connection is aborted (callers get ENOTCONN).
  void detach();
  /// Reads requests again once the mux has sent what was queued (backpressure).
  void resume();

 private:
  VfsRelay(ev::Loop& loop, Spec spec, Fd fuse)
      : loop_(loop), spec_(std::move(spec)), fuse_(std::move(fuse)) {}
  void onReadable();

  ev::Loop& loop_;
  Spec spec_;
  Fd fuse_;
  ev::Watch watch_;
  guestproto::Mux* mux_ = nullptr;
  uint32_t stream_ = 0;
  std::function<void()> wake_;
  std::string buf_;      ///< one request
  std::string replies_;  ///< host bytes not yet forming a whole reply
  bool paused_ = false;
#ifdef ML_HOSTILE_VFS
  std::unique_ptr<HostileReplies> hostile_;
#endif
};

/// The virtio-fs transport (docs/vfs.md): mounts the host's device `tag` once on a private staging
/// directory, binds tree INDEX (its root's entry "INDEX") onto each target (nosuid, nodev, and
/// read-only where asked), then detaches the staging mount so that only the targets remain.
/// The kernel talks to the host itself: nothing is relayed by the agent.
Status mountVirtioFs(const std::vector<VfsRelay::Spec>& trees);

}  // namespace matchlock::guest
