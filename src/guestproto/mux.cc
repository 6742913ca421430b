// SPDX-License-Identifier: Apache-2.0
#include "guestproto/mux.h"

#include <fmt/format.h>

#include <algorithm>

namespace matchlock::guestproto {
namespace {

constexpr uint32_t kGoAwayProtocolError = 1;
constexpr uint32_t kResetRefused = 1;
constexpr uint64_t kMaxCredit = uint64_t{1} << 32;

std::string u32Payload(uint32_t v) {
  std::string p;
  putU32(p, v);
  return p;
}

std::string codeMessage(uint32_t code, std::string_view message) {
  std::string p;
  putU32(p, code);
  p.append(message.substr(0, kMaxPayload - 4));
  return p;
}

}  // namespace

Mux::Mux(Role role, Callbacks callbacks, Options options)
    : role_(role),
      cb_(std::move(callbacks)),
      opts_(std::move(options)),
      next_id_(role == Role::Host ? 1 : 2) {}

void Mux::start() {
  ML_CHECK(!started_, "Mux::start called twice");
  started_ = true;
  std::string p;
  putU16(p, kVersionMajor);
  putU16(p, kVersionMinor);
  putU32(p, kMaxPayload);
  putU32(p, opts_.initial_window);
  p.append(opts_.agent.substr(0, 256));
  queue(FrameType::Hello, 0, std::move(p));
}

bool Mux::peerOwns(uint32_t id) const {
  bool odd = (id % 2) == 1;
  return role_ == Role::Host ? !odd : odd;
}

bool Mux::everOpened(uint32_t id) const {
  return peerOwns(id) ? id <= highest_peer_id_ : id < next_id_;
}

void Mux::queue(FrameType type, uint32_t stream, std::string payload, uint8_t flags) {
  out_ += encodeFrame(Frame{type, flags, stream, std::move(payload)});
}

Status Mux::fail(std::string message) {
  if (!failed_) {
    failed_ = true;
    queue(FrameType::GoAway, 0, codeMessage(kGoAwayProtocolError, message));
  }
  return makeError(Errc::Protocol, "guest protocol: " + message);
}

Status Mux::receive(std::string_view bytes) {
  if (failed_) {
    return makeError(Errc::Protocol, "guest protocol: connection already failed");
  }
  if (Status st = reader_.feed(bytes); !st) {
    return fail(st.error().message());
  }
  while (auto f = reader_.next()) {
    ML_RETURN_IF_ERROR(handle(std::move(*f)));
    if (failed_) {
      return makeError(Errc::Protocol, "guest protocol: connection failed");
    }
  }
  return ok();
}

Status Mux::handleHello(const Frame& f) {
  if (ready_) {
    return fail("second Hello");
  }
  PayloadReader r(f.payload);
  auto major = r.u16();
  auto minor = r.u16();
  auto max_payload = r.u32();
  auto window = r.u32();
  if (!major || !minor || !max_payload || !window) {
    return fail("truncated Hello");
  }
  if (*major != kVersionMajor) {
    return fail(fmt::format("version mismatch: peer speaks {}.{}, we speak {}.{}", *major, *minor,
                            kVersionMajor, kVersionMinor));
  }
  if (*window == 0 || *max_payload == 0) {
    return fail("Hello with a zero window or payload size");
  }
  peer_window_ = *window;
  peer_max_payload_ = std::min(*max_payload, kMaxPayload);
  peer_agent_ = std::string(r.rest());
  ready_ = true;
  if (cb_.on_ready) {
    cb_.on_ready();
  }
  return ok();
}

Status Mux::handle(Frame&& f) {
  if (!ready_ && f.type != FrameType::Hello) {
    return fail("frame before Hello");
  }
  switch (f.type) {
    case FrameType::Hello:
      return handleHello(f);
    case FrameType::Open: {
      uint32_t id = f.stream;
      if (!peerOwns(id) || id <= highest_peer_id_) {
        return fail(fmt::format("Open with invalid stream id {}", id));
      }
      highest_peer_id_ = id;
      PayloadReader r(f.payload);
      auto port = r.u32();
      if (!port) {
        return fail("truncated Open");
      }
      if (streams_.size() >= opts_.max_streams) {
        queue(FrameType::Reset, id, codeMessage(kResetRefused, "too many streams"));
        return ok();
      }
      Stream s;
      s.port = *port;
      s.send_credit = peer_window_;
      s.recv_allowance = opts_.initial_window;
      streams_.emplace(id, std::move(s));
      if (cb_.on_open) {
        cb_.on_open(id, *port);
      }
      return ok();
    }
    case FrameType::Data: {
      auto it = streams_.find(f.stream);
      if (it == streams_.end()) {
        return everOpened(f.stream) ? ok()
                                    : fail(fmt::format("Data on unknown stream {}", f.stream));
      }
      Stream& s = it->second;
      if (s.remote_closed) {
        return fail(fmt::format("Data after Close on stream {}", f.stream));
      }
      if (f.payload.size() > s.recv_allowance) {
        return fail(fmt::format("flow control violated on stream {}", f.stream));
      }
      s.recv_allowance -= f.payload.size();
      // The callback may send, reset or consume on this mux: `s` is not used after it.
      if (cb_.on_data && !f.payload.empty()) {
        cb_.on_data(f.stream, f.payload);
      }
      return ok();
    }
    case FrameType::Window: {
      PayloadReader r(f.payload);
      auto inc = r.u32();
      if (!inc) {
        return fail("truncated Window");
      }
      auto it = streams_.find(f.stream);
      if (it == streams_.end()) {
        return everOpened(f.stream) ? ok()
                                    : fail(fmt::format("Window on unknown stream {}", f.stream));
      }
      if (it->second.send_credit + *inc > kMaxCredit) {
        return fail(fmt::format("Window overflow on stream {}", f.stream));
      }
      it->second.send_credit += *inc;
      flush(it->first, it->second);
      return ok();
    }
    case FrameType::Close: {
      auto it = streams_.find(f.stream);
      if (it == streams_.end()) {
        return everOpened(f.stream) ? ok()
                                    : fail(fmt::format("Close on unknown stream {}", f.stream));
      }
      if (it->second.remote_closed) {
        return fail(fmt::format("second Close on stream {}", f.stream));
      }
      it->second.remote_closed = true;
      uint32_t id = f.stream;
      maybeErase(id);
      if (cb_.on_close) {
        cb_.on_close(id);
      }
      return ok();
    }
    case FrameType::Reset: {
      PayloadReader r(f.payload);
      auto code = r.u32();
      if (!code) {
        return fail("truncated Reset");
      }
      std::string message(r.rest());
      bool existed = streams_.erase(f.stream) > 0;
      if (!existed && !everOpened(f.stream)) {
        return fail(fmt::format("Reset on unknown stream {}", f.stream));
      }
      if (existed && cb_.on_reset) {
        cb_.on_reset(f.stream, *code, message);
      }
      return ok();
    }
    case FrameType::Ping:
      queue(FrameType::Pong, 0, f.payload);
      return ok();
    case FrameType::Pong:
      return ok();
    case FrameType::GoAway: {
      PayloadReader r(f.payload);
      auto code = r.u32();
      std::string message(r.rest());
      if (cb_.on_goaway) {
        cb_.on_goaway(code.value_or(0), message);
      }
      return ok();
    }
  }
  return fail("unknown frame type");
}

Result<uint32_t> Mux::open(uint32_t port) {
  if (failed_) {
    return makeError(Errc::Protocol, "guest protocol: connection failed");
  }
  if (!ready_) {
    return makeError(Errc::Unavailable, "guest protocol: handshake not complete");
  }
  if (next_id_ > 0xfffffff0U) {
    return makeError(Errc::Unavailable, "guest protocol: stream ids exhausted");
  }
  uint32_t id = next_id_;
  next_id_ += 2;
  Stream s;
  s.port = port;
  s.send_credit = peer_window_;
  s.recv_allowance = opts_.initial_window;
  streams_.emplace(id, std::move(s));
  queue(FrameType::Open, id, u32Payload(port));
  return id;
}

Status Mux::send(uint32_t stream, std::string_view data) {
  auto it = streams_.find(stream);
  if (it == streams_.end()) {
    return makeError(Errc::NotFound, fmt::format("guest protocol: no stream {}", stream));
  }
  if (it->second.local_closed) {
    return makeError(Errc::Conflict, fmt::format("guest protocol: stream {} closed", stream));
  }
  it->second.pending.append(data);
  flush(stream, it->second);
  return ok();
}

void Mux::flush(uint32_t id, Stream& s) {
  while (!s.pending.empty() && s.send_credit > 0) {
    size_t n = std::min<uint64_t>({s.pending.size(), s.send_credit, peer_max_payload_});
    queue(FrameType::Data, id, s.pending.substr(0, n));
    s.pending.erase(0, n);
    s.send_credit -= n;
  }
  if (s.pending.empty() && s.local_closed && !s.close_sent) {
    queue(FrameType::Close, id, {});
    s.close_sent = true;
    maybeErase(id);
  }
}

void Mux::maybeErase(uint32_t id) {
  auto it = streams_.find(id);
  if (it != streams_.end() && it->second.close_sent && it->second.remote_closed &&
      it->second.pending.empty()) {
    streams_.erase(it);
  }
}

Status Mux::closeWrite(uint32_t stream) {
  auto it = streams_.find(stream);
  if (it == streams_.end()) {
    return makeError(Errc::NotFound, fmt::format("guest protocol: no stream {}", stream));
  }
  it->second.local_closed = true;
  flush(stream, it->second);
  return ok();
}

void Mux::reset(uint32_t stream, uint32_t code, std::string_view message) {
  if (streams_.erase(stream) > 0) {
    queue(FrameType::Reset, stream, codeMessage(code, message));
  }
}

void Mux::consumed(uint32_t stream, size_t n) {
  auto it = streams_.find(stream);
  if (it == streams_.end() || it->second.remote_closed) {
    return;
  }
  Stream& s = it->second;
  s.unacked += n;
  // Grant in batches of a quarter window: fewer frames, and the peer never stalls for long.
  if (s.unacked >= std::max<uint32_t>(opts_.initial_window / 4, 1)) {
    auto grant = static_cast<uint32_t>(s.unacked);
    s.recv_allowance += grant;
    s.unacked = 0;
    queue(FrameType::Window, stream, u32Payload(grant));
  }
}

void Mux::goAway(uint32_t code, std::string_view message) {
  queue(FrameType::GoAway, 0, codeMessage(code, message));
}

void Mux::ping(uint64_t opaque) {
  std::string p;
  putU64(p, opaque);
  queue(FrameType::Ping, 0, std::move(p));
}

size_t Mux::pendingBytes(uint32_t stream) const {
  auto it = streams_.find(stream);
  return it == streams_.end() ? 0 : it->second.pending.size();
}

size_t Mux::credit(uint32_t stream) const {
  auto it = streams_.find(stream);
  return it == streams_.end() ? 0 : static_cast<size_t>(it->second.send_credit);
}

std::string Mux::takeOutput() {
  std::string out;
  out.swap(out_);
  return out;
}

}  // namespace matchlock::guestproto
