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
  if (payload.empty() && reading_) {
    // A READ whose data the provider put in place after the header's room: the header counts
    // it (our own header, bounded by the room we handed out).
    fuse_out_header out{};
    std::memcpy(&out, header.data(), std::min(header.size(), sizeof(out)));
    if (out.len >= sizeof(out) && out.len <= chain_->writable_len && chain_->scatter({header})) {
      written_ = out.len;
    }
    return;
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
  // Only our copies are parsed: the header first, then the whole request, or for a large WRITE
  // its header and arguments alone, the data being written to the host file straight from guest
  // memory (it is nobody's business but the file's; it saves a megabyte copy per request).
  constexpr size_t kWriteArgs = sizeof(fuse_in_header) + sizeof(fuse_write_in);
  fuse_in_header h{};
  if (!chain.peek(&h, sizeof(h))) {
    return 0;  // nothing we could answer: completed empty
  }
  chain_ = &chain;
  unique_ = h.unique;
  written_ = 0;
  if (chain.readable_len > conn_->maxRequestSize()) {
    fuse_out_header out{sizeof(out), -EINVAL, h.unique};
    sink(std::string_view(reinterpret_cast<const char*>(&out), sizeof(out)), {});
  } else if (h.opcode == FUSE_WRITE && chain.readable_len >= kScatteredWrite) {
    request_.resize(kWriteArgs);
    (void)chain.peek(request_.data(), kWriteArgs);
    write_parts_.clear();
    size_t skip = kWriteArgs;
    for (const Buffer& b : chain.readable) {
      if (skip >= b.len) {
        skip -= b.len;
        continue;
      }
      write_parts_.emplace_back(reinterpret_cast<const char*>(b.data) + skip, b.len - skip);
      skip = 0;
    }
    (void)conn_->handleMessage(request_, &write_parts_);
  } else if (h.opcode == FUSE_READ && chain.writable_len >= sizeof(fuse_out_header) + 4096) {
    // The data goes straight into the guest's buffers after the reply header's room.
    (void)chain.gather(&request_, conn_->maxRequestSize());  // a READ is small: fits
    read_into_.clear();
    size_t skip = sizeof(fuse_out_header);
    for (const Buffer& b : chain.writable) {
      if (skip >= b.len) {
        skip -= b.len;
        continue;
      }
      read_into_.push_back(Span{reinterpret_cast<char*>(b.data) + skip, b.len - skip});
      skip = 0;
    }
    reading_ = true;
    (void)conn_->handleMessage(request_, nullptr, &read_into_);
    reading_ = false;
  } else {
    (void)chain.gather(&request_, conn_->maxRequestSize());  // fits: checked above
    (void)conn_->handleMessage(request_);  // fails only below a header, checked above
  }
  chain_ = nullptr;
  return written_;
}

}  // namespace matchlock::vfs::virtio
