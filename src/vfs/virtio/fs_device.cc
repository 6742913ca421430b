// SPDX-License-Identifier: Apache-2.0
#include "vfs/virtio/fs_device.h"

#include <linux/fuse.h>

#include <cerrno>
#include <cstring>

namespace matchlock::vfs::virtio {

Result<std::unique_ptr<FsDevice>> FsDevice::listen(ev::Loop& loop, const std::string& socket_path,
                                                   const std::string& name,
                                                   std::vector<fuse::MountPoint> mounts,
                                                   fuse::EventFn events, fuse::Limits limits) {
  std::unique_ptr<FsDevice> d(new FsDevice());
  d->conn_ = std::make_unique<fuse::Connection>(
      std::move(mounts), [](std::string&&) {}, std::move(events), limits);
  d->conn_->setSink([p = d.get()](std::string_view header, std::string_view payload) {
    p->sink(header, payload);
  });
  VhostUserBackend::Options opts;
  opts.name = name;
  opts.queues = kQueues;
  ML_ASSIGN_OR_RETURN(d->backend_, VhostUserBackend::listen(loop, socket_path, std::move(opts),
                                                            [p = d.get()](size_t, const Chain& c) {
                                                              return p->serve(c);
                                                            }));
  return d;
}

void FsDevice::sink(std::string_view header, std::string_view payload) {
  if (chain_ == nullptr || written_ != 0) {
    return;  // one reply per request; a second one would be a server bug, never a guest's
  }
  const uint64_t len = header.size() + payload.size();
  if (len > chain_->writable_len) {
    // Less room than the reply needs: the guest learns EIO, and nothing past its room is written.
    fuse_out_header out{sizeof(out), -EIO, unique_};
    if (chain_->scatter({std::string_view(reinterpret_cast<const char*>(&out), sizeof(out))})) {
      written_ = sizeof(out);
    }
    return;
  }
  (void)chain_->scatter({header, payload});
  written_ = static_cast<uint32_t>(len);
}

uint32_t FsDevice::serve(const Chain& chain) {
  if (chain.readable_len < sizeof(fuse_in_header)) {
    return 0;  // nothing we could answer: completed empty
  }
  // The header is read from our copy of the request; when the request is longer than any we
  // accept, from a copy of its first bytes alone.
  fuse_in_header h{};
  const bool whole = chain.gather(&request_, conn_->maxRequestSize());
  if (!whole) {
    char head[sizeof(h)] = {};
    size_t have = 0;
    for (const Buffer& b : chain.readable) {
      const size_t n = std::min<size_t>(b.len, sizeof(head) - have);
      std::memcpy(head + have, b.data, n);
      have += n;
      if (have == sizeof(head)) {
        break;
      }
    }
    std::memcpy(&h, head, sizeof(h));
  } else {
    std::memcpy(&h, request_.data(), sizeof(h));
  }
  chain_ = &chain;
  unique_ = h.unique;
  written_ = 0;
  if (whole) {
    (void)conn_->handleMessage(request_);  // fails only below a header, checked above
  } else {
    fuse_out_header out{sizeof(out), -EINVAL, h.unique};
    sink(std::string_view(reinterpret_cast<const char*>(&out), sizeof(out)), {});
  }
  chain_ = nullptr;
  return written_;
}

}  // namespace matchlock::vfs::virtio
