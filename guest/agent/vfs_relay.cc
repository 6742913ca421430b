// SPDX-License-Identifier: Apache-2.0
#include "guest/agent/vfs_relay.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/fuse.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "guest/agent/log.h"
#ifdef ML_HOSTILE_VFS
#include "guest/agent/hostile_vfs.h"
#endif
#include "guestproto/frame.h"

namespace matchlock::guest {
namespace {

// A /dev/fuse read needs room for the largest request: a WRITE of max_write (1 MiB, the host's
// INIT answer) plus its headers.
constexpr size_t kRequestBuffer = (1U << 20) + 8192;
// Stop reading requests while this much is queued towards the host.
constexpr size_t kMaxQueued = 4U << 20;
constexpr uint32_t kMagic = 0x4d4c5646;  // "MLVF": the stream preamble (docs/vfs.md)

}  // namespace

Result<std::unique_ptr<VfsRelay>> VfsRelay::mount(ev::Loop& loop, const Spec& spec) {
#ifdef ML_HOSTILE_VFS
  // The hostile test guest mounts nothing: it speaks for a kernel itself (hostile_vfs.h).
  return std::unique_ptr<VfsRelay>(new VfsRelay(loop, spec, Fd()));
#endif
  std::error_code ec;
  std::filesystem::path target(spec.target);
  std::filesystem::create_directories(spec.file ? target.parent_path() : target, ec);
  if (ec) {
    return makeError(Errc::System, fmt::format("creating {}: {}", spec.target, ec.message()));
  }
  if (spec.file) {
    Fd placeholder(::open(spec.target.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    if (!placeholder) {
      return makeError(Errc::System, fmt::format("creating {}", spec.target), errno);
    }
  }
  Fd fd(::open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK));
  if (!fd) {
    return makeError(Errc::System, "opening /dev/fuse", errno);
  }
  std::string opts = fmt::format("fd={},rootmode={},user_id=0,group_id=0,allow_other", fd.get(),
                                 spec.file ? "100000" : "40000");
  unsigned long flags = MS_NOSUID | MS_NODEV;  // NOLINT(google-runtime-int)
  if (spec.read_only) {
    flags |= MS_RDONLY;
  }
  if (::mount("matchlock", spec.target.c_str(), "fuse.matchlock", flags, opts.c_str()) != 0) {
    return makeError(Errc::System, fmt::format("mounting {}", spec.target), errno);
  }
  return std::unique_ptr<VfsRelay>(new VfsRelay(loop, spec, std::move(fd)));
}

Status mountVirtioFs(const std::vector<VfsRelay::Spec>& trees) {
  if (trees.empty()) {
    return ok();
  }
  const std::string staging = "/run/matchlock-vfs";
  const std::string& tag = trees.front().virtiofs;
  if (::mkdir(staging.c_str(), 0700) != 0 && errno != EEXIST) {
    return makeError(Errc::System, "creating " + staging, errno);
  }
  if (::mount(tag.c_str(), staging.c_str(), "virtiofs", MS_NOSUID | MS_NODEV, nullptr) != 0) {
    return makeError(Errc::System, fmt::format("mounting virtio-fs device '{}'", tag), errno);
  }
  Status result = ok();
  for (const VfsRelay::Spec& spec : trees) {
    std::error_code ec;
    std::filesystem::path target(spec.target);
    std::filesystem::create_directories(spec.file ? target.parent_path() : target, ec);
    if (ec) {
      result = makeError(Errc::System,
                         fmt::format("mount {}: creating it: {}", spec.target, ec.message()));
      break;
    }
    if (spec.file) {
      Fd placeholder(::open(spec.target.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
      if (!placeholder) {
        result = makeError(Errc::System, fmt::format("mount {}: creating it", spec.target), errno);
        break;
      }
    }
    const std::string source = fmt::format("{}/{}", staging, spec.index);
    unsigned long flags =
        MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV;  // NOLINT(google-runtime-int)
    if (spec.read_only) {
      flags |= MS_RDONLY;
    }
    if (::mount(source.c_str(), spec.target.c_str(), nullptr, MS_BIND, nullptr) != 0 ||
        ::mount(nullptr, spec.target.c_str(), nullptr, flags, nullptr) != 0) {
      result = makeError(Errc::System, fmt::format("mount {}", spec.target), errno);
      break;
    }
  }
  // The binds keep the filesystem; the staging view of it goes.
  (void)::umount2(staging.c_str(), MNT_DETACH);
  (void)::rmdir(staging.c_str());
  return result;
}

VfsRelay::~VfsRelay() {
  watch_.reset();
}

Status VfsRelay::attach(guestproto::Mux& mux, uint32_t stream, std::function<void()> wake) {
  mux_ = &mux;
  stream_ = stream;
  wake_ = std::move(wake);
  std::string preamble;
  guestproto::putU32(preamble, kMagic);
  guestproto::putU16(preamble, 1);  // version
  guestproto::putU16(preamble, 0);  // flags
  guestproto::putU32(preamble, spec_.index);
  ML_RETURN_IF_ERROR(mux.send(stream, preamble));
#ifdef ML_HOSTILE_VFS
  hostile_ = std::make_unique<HostileReplies>();
  std::string attack = hostileVfsRequests(spec_.index + 20261202);
  logLine("hostile vfs {}: sending {} bytes of hostile requests", spec_.target, attack.size());
  return mux.send(stream, attack);
#endif
  buf_.resize(kRequestBuffer);
  ML_ASSIGN_OR_RETURN(watch_,
                      loop_.watch(fuse_.get(), ev::kRead, [this](uint32_t) { onReadable(); }));
  return ok();
}

void VfsRelay::onReadable() {
  if (mux_ == nullptr) {
    return;
  }
  for (int rounds = 0; rounds < 64; ++rounds) {
    if (mux_->pendingBytes(stream_) > kMaxQueued) {
      paused_ = true;
      (void)watch_.setEvents(0);
      break;
    }
    ssize_t n = ::read(fuse_.get(), buf_.data(), buf_.size());
    if (n > 0) {
      (void)mux_->send(stream_, std::string_view(buf_.data(), static_cast<size_t>(n)));
      continue;
    }
    if (n < 0 && (errno == EINTR || errno == ENOENT)) {
      continue;  // ENOENT: the request was interrupted before we read it
    }
    if (n < 0 && errno == EAGAIN) {
      break;
    }
    // ENODEV: unmounted; anything else: the connection is unusable.
    logLine("vfs {}: /dev/fuse read: {}", spec_.target, n < 0 ? std::strerror(errno) : "EOF");
    watch_.reset();
    break;
  }
  if (wake_) {
    wake_();
  }
}

void VfsRelay::resume() {
  if (paused_ && mux_ != nullptr && mux_->pendingBytes(stream_) <= kMaxQueued / 2) {
    paused_ = false;
    (void)watch_.setEvents(ev::kRead);
  }
}

void VfsRelay::onData(std::string_view data) {
  if (mux_ != nullptr) {
    mux_->consumed(stream_, data.size());
  }
#ifdef ML_HOSTILE_VFS
  if (!hostile_->feed(std::string(data))) {
    logLine("hostile vfs {}: MALFORMED reply after {} replies", spec_.target, hostile_->replies());
  }
  return;
#endif
  replies_.append(data);
  size_t pos = 0;
  while (replies_.size() - pos >= sizeof(fuse_out_header)) {
    fuse_out_header h{};
    std::memcpy(&h, replies_.data() + pos, sizeof(h));
    if (h.len < sizeof(h) || h.len > kRequestBuffer + 4096) {
      logLine("vfs {}: the host sent a reply of {} bytes; closing the filesystem", spec_.target,
              h.len);
      detach();
      return;
    }
    if (replies_.size() - pos < h.len) {
      break;
    }
    // One write per reply. ENOENT: the request was interrupted meanwhile; nothing to do.
    ssize_t n = ::write(fuse_.get(), replies_.data() + pos, h.len);
    if (n < 0 && errno != ENOENT) {
      logLine("vfs {}: /dev/fuse write: {}", spec_.target, std::strerror(errno));
    }
    pos += h.len;
  }
  replies_.erase(0, pos);
}

void VfsRelay::detach() {
#ifdef ML_HOSTILE_VFS
  if (hostile_ && mux_ != nullptr) {
    logLine("hostile vfs {}: stream ended after {} replies ({} errors)", spec_.target,
            hostile_->replies(), hostile_->errors());
  }
#endif
  // Closing the device aborts the connection: pending and later requests fail with ENOTCONN
  // instead of hanging on a host that will not answer.
  watch_.reset();
  fuse_.reset();
  mux_ = nullptr;
}

}  // namespace matchlock::guest
