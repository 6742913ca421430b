// SPDX-License-Identifier: Apache-2.0
#include "vfs/virtio/vhost_user.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/log.h"
#include "sys/socket_util.h"

namespace matchlock::vfs::virtio {
namespace {

// docs/interop/vhost-user.rst: the requests a backend without protocol features receives.
enum Request : uint32_t {
  GetFeatures = 1,
  SetFeatures = 2,
  SetOwner = 3,
  ResetOwner = 4,
  SetMemTable = 5,
  SetVringNum = 8,
  SetVringAddr = 9,
  SetVringBase = 10,
  GetVringBase = 11,
  SetVringKick = 12,
  SetVringCall = 13,
  SetVringErr = 14,
  GetProtocolFeatures = 15,
  SetProtocolFeatures = 16,
  GetQueueNum = 17,
  SetVringEnable = 18,
};
constexpr uint32_t kVersion = 0x1;
constexpr uint32_t kReplyFlag = 0x4;
constexpr uint32_t kNeedReply = 0x8;
constexpr size_t kHeaderSize = 12;
constexpr size_t kMaxPayload = 4096;  // the largest message we take (a memory table is 264 bytes)
constexpr size_t kMaxFds = 8;         // VHOST_MEMORY_BASELINE_NREGIONS
constexpr uint64_t kVirtioVersion1 = 1ULL << 32;
// Offered so that QEMU asks for protocol features at all: without them it assumes a backend can
// map no memory region. Of the protocol features we offer only MQ (GET_QUEUE_NUM is answered).
constexpr uint64_t kProtocolFeatures = 1ULL << 30;
constexpr uint64_t kProtocolMq = 1ULL << 0;
constexpr uint64_t kVringNoFd = 1ULL << 8;
constexpr size_t kChainsPerRound = 64;  // then the loop serves others and we come back

struct VringState {
  uint32_t index;
  uint32_t num;
};
struct VringAddr {
  uint32_t index;
  uint32_t flags;
  uint64_t desc;
  uint64_t used;
  uint64_t avail;
  uint64_t log;
};
struct MemRegionMsg {
  uint64_t guest_addr;
  uint64_t size;
  uint64_t user_addr;
  uint64_t mmap_offset;
};

template <class T>
bool payloadAs(const std::string& payload, T* out) {
  if (payload.size() < sizeof(T)) {
    return false;
  }
  std::memcpy(out, payload.data(), sizeof(T));
  return true;
}

Error protocolError(const std::string& what) {
  return Error(Errc::Protocol, "vhost-user: " + what);
}

/// Adds one to an eventfd's counter (a kick or an interrupt). It cannot block meaningfully: the
/// counter saturates only after 2^64-2 unread signals.
void signal(int fd) {
  const uint64_t one = 1;
  if (::write(fd, &one, sizeof(one)) < 0) {
    return;  // EAGAIN on a saturated counter: the other side has a signal pending anyway
  }
}

/// Reads exactly `n` bytes (the socket has a receive timeout: a peer that stops mid-message is
/// an error, not a hang).
Status readFull(int fd, char* buf, size_t n) {
  while (n > 0) {
    ssize_t r = ::recv(fd, buf, n, 0);
    if (r < 0 && errno == EINTR) {
      continue;
    }
    if (r <= 0) {
      return makeError(Errc::Protocol, "vhost-user: the VMM closed or stalled mid-message",
                       r < 0 ? errno : 0);
    }
    buf += r;
    n -= static_cast<size_t>(r);
  }
  return ok();
}

}  // namespace

struct VhostUserBackend::Message {
  uint32_t request = 0;
  uint32_t flags = 0;
  std::string payload;
  std::vector<Fd> fds;
};

VhostUserBackend::VhostUserBackend(ev::Loop& loop, Options options, ServeFn serve)
    : loop_(loop), options_(std::move(options)), serve_(std::move(serve)) {
  queues_.resize(options_.queues);
}

VhostUserBackend::~VhostUserBackend() {
  for (Queue& q : queues_) {
    q.watch.reset();
  }
  conn_watch_.reset();
  listener_watch_.reset();
  if (!path_.empty()) {
    (void)::unlink(path_.c_str());
  }
}

Result<std::unique_ptr<VhostUserBackend>> VhostUserBackend::listen(ev::Loop& loop,
                                                                   const std::string& socket_path,
                                                                   Options options, ServeFn serve) {
  if (options.queues == 0 || options.queues > 256) {
    return makeError(Errc::Internal, "vhost-user: a device needs 1..256 queues");
  }
  std::unique_ptr<VhostUserBackend> b(
      new VhostUserBackend(loop, std::move(options), std::move(serve)));
  ML_ASSIGN_OR_RETURN(b->listener_, sys::listenUnix(socket_path, 1));
  b->path_ = socket_path;
  ML_ASSIGN_OR_RETURN(b->listener_watch_, loop.watch(b->listener_.get(), ev::kRead,
                                                     [p = b.get()](uint32_t) { p->onAccept(); }));
  return b;
}

void VhostUserBackend::onAccept() {
  auto fd = sys::acceptNonBlocking(listener_.get());
  if (!fd || !*fd) {
    return;
  }
  if (conn_) {
    ML_LOG(vfs, warn, "{}: a second VMM connection refused", options_.name);
    return;  // closed as it goes out of scope
  }
  // Messages are read whole and synchronously, bounded by a receive timeout.
  int flags = ::fcntl(fd->get(), F_GETFL);
  (void)::fcntl(fd->get(), F_SETFL, flags & ~O_NONBLOCK);
  timeval tv{2, 0};
  (void)::setsockopt(fd->get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  (void)::setsockopt(fd->get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  auto watch = loop_.watch(fd->get(), ev::kRead, [this](uint32_t) { onReadable(); });
  if (!watch) {
    ML_LOG(vfs, warn, "{}: {}", options_.name, watch.error().toString());
    return;
  }
  conn_ = std::move(*fd);
  conn_watch_ = std::move(*watch);
  stats_.connected = true;
}

void VhostUserBackend::onReadable() {
  // Everything the VMM has sent, in order, before anything else runs: it does not wait for us
  // between messages (no replies without REPLY_ACK), so the guest may kick a ring whose later
  // messages (its call fd) are still in the socket.
  for (int i = 0; i < 256 && conn_; ++i) {
    if (!readMessage()) {
      return;
    }
    pollfd p{conn_ ? conn_.get() : -1, POLLIN, 0};
    if (!conn_ || ::poll(&p, 1, 0) != 1 || (p.revents & POLLIN) == 0) {
      return;
    }
  }
}

bool VhostUserBackend::readMessage() {
  Message m;
  char header[kHeaderSize];
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  iovec iov{header, sizeof(header)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n = 0;
  do {
    n = ::recvmsg(conn_.get(), &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  // Every descriptor that came along is ours now, whatever happens next.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd = -1;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        m.fds.emplace_back(fd);
      }
    }
  }
  if (n == 0) {
    disconnect("the VMM closed the connection");
    return false;
  }
  if (n < 0) {
    disconnect(fmt::format("reading from the VMM: {}", std::strerror(errno)));
    return false;
  }
  if ((msg.msg_flags & MSG_CTRUNC) != 0) {
    disconnect("more descriptors than a message may carry");
    return false;
  }
  if (static_cast<size_t>(n) < kHeaderSize) {
    if (Status st = readFull(conn_.get(), header + n, kHeaderSize - static_cast<size_t>(n)); !st) {
      disconnect(st.error().message());
      return false;
    }
  }
  uint32_t size = 0;
  std::memcpy(&m.request, header, 4);
  std::memcpy(&m.flags, header + 4, 4);
  std::memcpy(&size, header + 8, 4);
  if ((m.flags & 0x3) != kVersion) {
    disconnect(fmt::format("message version {} (we speak 1)", m.flags & 0x3));
    return false;
  }
  if (size > kMaxPayload) {
    disconnect(fmt::format("a message of {} bytes", size));
    return false;
  }
  m.payload.resize(size);
  if (Status st = readFull(conn_.get(), m.payload.data(), size); !st) {
    disconnect(st.error().message());
    return false;
  }
  if (Status st = handle(m); !st) {
    disconnect(st.error().message());
    return false;
  }
  return true;
}

Status VhostUserBackend::reply(uint32_t request, std::string_view payload) {
  std::string out(kHeaderSize, '\0');
  const uint32_t flags = kVersion | kReplyFlag;
  const auto size = static_cast<uint32_t>(payload.size());
  std::memcpy(out.data(), &request, 4);
  std::memcpy(out.data() + 4, &flags, 4);
  std::memcpy(out.data() + 8, &size, 4);
  out.append(payload);
  size_t off = 0;
  while (off < out.size()) {
    ssize_t n = ::send(conn_.get(), out.data() + off, out.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return makeError(Errc::Protocol, "vhost-user: replying to the VMM", errno);
    }
    off += static_cast<size_t>(n);
  }
  return ok();
}

Status VhostUserBackend::handle(Message& m) {
  if ((m.flags & kNeedReply) != 0) {
    // REPLY_ACK is a protocol feature we do not offer: a VMM that asks for it is not ours.
    return makeError(protocolError(
        fmt::format("request {} wants an acknowledgement (not negotiated)", m.request)));
  }
  auto queueOf = [&](uint32_t index) -> Result<size_t> {
    if (index >= queues_.size()) {
      return makeError(
          protocolError(fmt::format("queue {} of a device with {}", index, queues_.size())));
    }
    return static_cast<size_t>(index);
  };
  const uint64_t offered = kVirtioVersion1 | kProtocolFeatures | options_.features;
  switch (m.request) {
    case GetFeatures:
      return reply(m.request, std::string_view(reinterpret_cast<const char*>(&offered), 8));
    case SetFeatures: {
      uint64_t f = 0;
      if (!payloadAs(m.payload, &f)) {
        return makeError(protocolError("SET_FEATURES without its value"));
      }
      if ((f & ~offered) != 0) {
        return makeError(
            protocolError(fmt::format("features {:#x} were never offered", f & ~offered)));
      }
      acked_features_ = f;
      return ok();
    }
    case GetProtocolFeatures:
      return reply(m.request, std::string_view(reinterpret_cast<const char*>(&kProtocolMq), 8));
    case SetProtocolFeatures: {
      uint64_t f = 0;
      if (!payloadAs(m.payload, &f) || (f & ~kProtocolMq) != 0) {
        return makeError(protocolError("protocol features that were never offered"));
      }
      return ok();
    }
    case GetQueueNum: {
      const uint64_t n = queues_.size();
      return reply(m.request, std::string_view(reinterpret_cast<const char*>(&n), 8));
    }
    case SetVringEnable: {
      // Rings are served once started (kick fd, addresses, memory), enabled or not: a disabled
      // virtio-fs ring has nothing to discard, and a VMM that never enables would hang.
      VringState st{};
      if (!payloadAs(m.payload, &st)) {
        return makeError(protocolError("SET_VRING_ENABLE without its state"));
      }
      ML_ASSIGN_OR_RETURN(size_t i, queueOf(st.index));
      (void)i;
      return ok();
    }
    case SetOwner:
      return ok();
    case ResetOwner:
      for (size_t i = 0; i < queues_.size(); ++i) {
        stopQueue(i);
      }
      return ok();
    case SetMemTable: {
      uint32_t count = 0;
      if (!payloadAs(m.payload, &count) || count == 0 || count > kMaxFds ||
          m.payload.size() < 8 + count * sizeof(MemRegionMsg) || m.fds.size() != count) {
        return makeError(protocolError("a malformed memory table"));
      }
      // The rings point into the old table: nothing is served until they are translated again.
      for (Queue& q : queues_) {
        q.watch.reset();
      }
      memory_.clear();
      for (uint32_t i = 0; i < count; ++i) {
        MemRegionMsg r{};
        std::memcpy(&r, m.payload.data() + 8 + i * sizeof(r), sizeof(r));
        if (r.size == 0 || r.mmap_offset + r.size < r.size ||
            r.mmap_offset + r.size > (1ULL << 47)) {
          return makeError(protocolError("a memory region of an impossible size"));
        }
        const size_t len = r.mmap_offset + r.size;
        void* base = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                            m.fds[i].get(), 0);
        if (base == MAP_FAILED) {
          return makeError(Errc::System, "vhost-user: mapping guest memory", errno);
        }
        ML_RETURN_IF_ERROR(
            memory_.add(GuestMemory::Region{r.guest_addr, r.size, r.user_addr,
                                            static_cast<uint8_t*>(base) + r.mmap_offset},
                        base, len));
      }
      for (size_t i = 0; i < queues_.size(); ++i) {
        if (queues_[i].have_addrs) {
          ML_RETURN_IF_ERROR(translateRings(queues_[i]));
        }
        ML_RETURN_IF_ERROR(startIfReady(i));
      }
      return ok();
    }
    case SetVringNum: {
      VringState s{};
      if (!payloadAs(m.payload, &s)) {
        return makeError(protocolError("SET_VRING_NUM without its state"));
      }
      ML_ASSIGN_OR_RETURN(size_t i, queueOf(s.index));
      return queues_[i].ring.setSize(s.num);
    }
    case SetVringAddr: {
      VringAddr a{};
      if (!payloadAs(m.payload, &a)) {
        return makeError(protocolError("SET_VRING_ADDR without its addresses"));
      }
      ML_ASSIGN_OR_RETURN(size_t i, queueOf(a.index));
      Queue& q = queues_[i];
      q.desc_addr = a.desc;
      q.avail_addr = a.avail;
      q.used_addr = a.used;
      q.have_addrs = true;
      ML_RETURN_IF_ERROR(translateRings(q));
      return startIfReady(i);
    }
    case SetVringBase: {
      VringState s{};
      if (!payloadAs(m.payload, &s)) {
        return makeError(protocolError("SET_VRING_BASE without its state"));
      }
      ML_ASSIGN_OR_RETURN(size_t i, queueOf(s.index));
      queues_[i].ring.setBase(static_cast<uint16_t>(s.num));
      return ok();
    }
    case GetVringBase: {
      VringState s{};
      if (!payloadAs(m.payload, &s)) {
        return makeError(protocolError("GET_VRING_BASE without its state"));
      }
      ML_ASSIGN_OR_RETURN(size_t i, queueOf(s.index));
      VringState out{s.index, queues_[i].ring.nextAvail()};
      stopQueue(i);  // the VMM stops the device: the ring is no longer ours
      return reply(m.request, std::string_view(reinterpret_cast<const char*>(&out), sizeof(out)));
    }
    case SetVringKick:
    case SetVringCall:
    case SetVringErr: {
      uint64_t v = 0;
      if (!payloadAs(m.payload, &v)) {
        return makeError(protocolError("a vring fd message without its index"));
      }
      ML_ASSIGN_OR_RETURN(size_t i, queueOf(static_cast<uint32_t>(v & 0xff)));
      const bool no_fd = (v & kVringNoFd) != 0;
      if (m.fds.size() != (no_fd ? 0U : 1U)) {
        return makeError(protocolError("a vring fd message with the wrong number of descriptors"));
      }
      Queue& q = queues_[i];
      if (m.request == SetVringErr) {
        return ok();  // we never report ring errors through it; the fd is closed here
      }
      if (m.request == SetVringCall) {
        q.call = no_fd ? Fd() : std::move(m.fds[0]);
        if (q.call) {
          // Chains may have been completed while there was no fd to signal: a spurious
          // interrupt is harmless (the driver reads the used ring), a lost one hangs it.
          signal(q.call.get());
        }
        return ok();
      }
      if (no_fd) {
        return makeError(protocolError("polling mode (no kick fd) is not supported"));
      }
      q.watch.reset();
      q.kick = std::move(m.fds[0]);
      return startIfReady(i);
    }
    default:
      // A request for a feature we never offered: say so once and carry on (it wants no reply).
      ML_LOG(vfs, warn, "{}: vhost-user request {} ignored", options_.name, m.request);
      return ok();
  }
}

Status VhostUserBackend::translateRings(Queue& q) {
  const uint64_t n = q.ring.size();
  if (n == 0) {
    return makeError(protocolError("ring addresses before the queue size"));
  }
  if (memory_.empty()) {
    return ok();  // translated when the memory table arrives
  }
  uint8_t* desc = memory_.user(q.desc_addr, 16 * n);
  uint8_t* avail = memory_.user(q.avail_addr, 6 + 2 * n);
  uint8_t* used = memory_.user(q.used_addr, 6 + 8 * n);
  return q.ring.setRings(desc, avail, used);
}

Status VhostUserBackend::startIfReady(size_t index) {
  Queue& q = queues_[index];
  if (q.watch || q.stopped || !q.kick || !q.ring.ready() || memory_.empty()) {
    return ok();
  }
  ML_ASSIGN_OR_RETURN(q.watch, loop_.watch(q.kick.get(), ev::kRead, [this, index](uint32_t) {
    uint64_t count = 0;
    if (::read(queues_[index].kick.get(), &count, sizeof(count)) < 0 && errno != EAGAIN) {
      ML_LOG(vfs, warn, "{}: queue {}: reading its kick: {}", options_.name, index,
             std::strerror(errno));
    }
    drain(index);
  }));
  drain(index);  // the driver may have offered buffers before the kick fd arrived
  return ok();
}

void VhostUserBackend::stopQueue(size_t index) {
  Queue& q = queues_[index];
  q.watch.reset();
  q.kick.reset();
  q.ring.reset();
  q.have_addrs = false;
  q.stopped = false;  // a driver that resets the device may start it afresh
}

void VhostUserBackend::drain(size_t index) {
  Queue& q = queues_[index];
  bool used = false;
  size_t served = 0;
  while (served < kChainsPerRound) {
    auto popped = q.ring.pop(memory_);
    if (!popped) {
      ML_LOG(vfs, warn, "{}: queue {} stopped: {}", options_.name, index, popped.error().message());
      ++stats_.stopped_queues;
      q.stopped = true;
      q.watch.reset();
      break;
    }
    if (!*popped) {
      break;
    }
    SplitQueue::Popped& p = **popped;
    uint32_t written = 0;
    if (p.broken) {
      if (++stats_.broken_chains <= 8) {
        ML_LOG(vfs, warn, "{}: queue {}: a malformed chain completed empty: {}", options_.name,
               index, p.why);
      }
    } else {
      written = serve_(index, p.chain);
    }
    ++stats_.chains;
    q.ring.push(p.chain.head, written);
    used = true;
    ++served;
  }
  if (used && q.call && q.ring.wantsInterrupt()) {
    signal(q.call.get());
    ++stats_.interrupts;
  }
  if (served == kChainsPerRound && q.kick) {
    // More may be waiting: kick ourselves, so the loop serves others first and comes back.
    signal(q.kick.get());
  }
}

void VhostUserBackend::disconnect(const std::string& why) {
  ML_LOG(vfs, info, "{}: VMM connection ended: {}", options_.name, why);
  for (size_t i = 0; i < queues_.size(); ++i) {
    stopQueue(i);
    queues_[i].call.reset();
  }
  memory_.clear();
  conn_watch_.reset();
  conn_.reset();
  stats_.connected = false;
}

}  // namespace matchlock::vfs::virtio
