// SPDX-License-Identifier: Apache-2.0
#include "guestproto/frame.h"

#include <fmt/format.h>

namespace matchlock::guestproto {
namespace {

constexpr uint8_t kKnownFlags = 0x01;

bool knownType(uint8_t t) {
  return t >= static_cast<uint8_t>(FrameType::Hello) &&
         t <= static_cast<uint8_t>(FrameType::GoAway);
}

uint32_t readU32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return (uint32_t{u[0]} << 24) | (uint32_t{u[1]} << 16) | (uint32_t{u[2]} << 8) | uint32_t{u[3]};
}

}  // namespace

void putU16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v & 0xff));
}

void putU32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) {
    out.push_back(static_cast<char>((v >> shift) & 0xff));
  }
}

void putU64(std::string& out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) {
    out.push_back(static_cast<char>((v >> shift) & 0xff));
  }
}

std::string encodeFrame(const Frame& frame) {
  ML_CHECK(frame.payload.size() <= kMaxPayload, "frame payload larger than kMaxPayload");
  std::string out;
  out.reserve(kHeaderSize + frame.payload.size());
  out.push_back(static_cast<char>(frame.type));
  out.push_back(static_cast<char>(frame.flags));
  putU16(out, 0);
  putU32(out, frame.stream);
  putU32(out, static_cast<uint32_t>(frame.payload.size()));
  out += frame.payload;
  return out;
}

Status FrameReader::feed(std::string_view bytes) {
  if (failed_) {
    return makeError(Errc::Protocol, "protocol error earlier on this connection");
  }
  buf_.append(bytes);
  size_t pos = 0;
  while (buf_.size() - pos >= kHeaderSize) {
    const char* h = buf_.data() + pos;
    auto type = static_cast<uint8_t>(h[0]);
    auto flags = static_cast<uint8_t>(h[1]);
    bool reserved = h[2] != 0 || h[3] != 0;
    uint32_t stream = readU32(h + 4);
    uint32_t len = readU32(h + 8);
    if (!knownType(type) || (flags & ~kKnownFlags) != 0 || reserved || len > max_payload_) {
      failed_ = true;
      return makeError(Errc::Protocol,
                       fmt::format("guest protocol: bad frame header (type {}, flags {:#x}, "
                                   "length {})",
                                   type, flags, len));
    }
    if (buf_.size() - pos - kHeaderSize < len) {
      break;
    }
    Frame f;
    f.type = static_cast<FrameType>(type);
    f.flags = flags;
    f.stream = stream;
    f.payload.assign(h + kHeaderSize, len);
    ready_.push_back(std::move(f));
    pos += kHeaderSize + len;
  }
  buf_.erase(0, pos);
  return ok();
}

std::optional<Frame> FrameReader::next() {
  if (ready_.empty()) {
    return std::nullopt;
  }
  Frame f = std::move(ready_.front());
  ready_.pop_front();
  return f;
}

Result<uint16_t> PayloadReader::u16() {
  if (pos_ > data_.size() || data_.size() - pos_ < 2) {
    return makeError(Errc::Protocol, "guest protocol: truncated payload");
  }
  const auto* u = reinterpret_cast<const unsigned char*>(data_.data() + pos_);
  pos_ += 2;
  return static_cast<uint16_t>((u[0] << 8) | u[1]);
}

Result<uint32_t> PayloadReader::u32() {
  if (pos_ > data_.size() || data_.size() - pos_ < 4) {
    return makeError(Errc::Protocol, "guest protocol: truncated payload");
  }
  uint32_t v = readU32(data_.data() + pos_);
  pos_ += 4;
  return v;
}

Result<uint64_t> PayloadReader::u64() {
  ML_ASSIGN_OR_RETURN(uint32_t hi, u32());
  ML_ASSIGN_OR_RETURN(uint32_t lo, u32());
  return (uint64_t{hi} << 32) | lo;
}

std::string_view PayloadReader::rest() {
  std::string_view out = pos_ < data_.size() ? data_.substr(pos_) : std::string_view();
  pos_ = data_.size();
  return out;
}

}  // namespace matchlock::guestproto
