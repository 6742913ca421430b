// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>

#include "common/result.h"

namespace matchlock::guestproto {

// Wire format of the host<->guest channel, version 1: schema/guest-protocol.v1.md.

inline constexpr uint16_t kVersionMajor = 1;
inline constexpr uint16_t kVersionMinor = 0;

/// Logical ports (upstream's vsock ports, kept as channel ids).
inline constexpr uint32_t kPortExec = 5000;
inline constexpr uint32_t kPortVfs = 5001;
inline constexpr uint32_t kPortReady = 5002;
/// Guest services run by the agent itself (file write/read/list, TCP forwards): exec framing
/// whose Start names the service (schema/guest-protocol.v1.md).
inline constexpr uint32_t kPortService = 5003;

inline constexpr size_t kHeaderSize = 12;
/// Largest payload either side may send or accept.
inline constexpr uint32_t kMaxPayload = 64 * 1024;

enum class FrameType : uint8_t {
  Hello = 1,   ///< u16 major, u16 minor, u32 max_payload, u32 initial_window, agent name
  Open = 2,    ///< u32 port; the frame's stream id is the new stream
  Data = 3,    ///< bytes, counted against the receiver's window
  Window = 4,  ///< u32 increment of the sender's receive window for the stream
  Close = 5,   ///< half-close: the sender sends no more data on the stream
  Reset = 6,   ///< u32 code, message: the stream is gone in both directions
  Ping = 7,    ///< u64 opaque
  Pong = 8,    ///< u64 opaque echoed
  GoAway = 9,  ///< u32 code, message: the connection is closing
};

struct Frame {
  FrameType type = FrameType::Data;
  uint8_t flags = 0;
  uint32_t stream = 0;
  std::string payload;
};

/// Serializes a frame (header + payload). The payload must be at most kMaxPayload.
std::string encodeFrame(const Frame& frame);

/// Incremental decoder: feed arbitrary chunks of the byte stream, take whole frames out.
/// A malformed header (unknown type, oversized payload, reserved bits set) is a protocol error
/// after which the reader refuses further input.
class FrameReader {
 public:
  explicit FrameReader(uint32_t max_payload = kMaxPayload) : max_payload_(max_payload) {}
  Status feed(std::string_view bytes);
  std::optional<Frame> next();
  /// Bytes buffered that do not form a whole frame yet.
  size_t buffered() const { return buf_.size(); }

 private:
  uint32_t max_payload_;
  std::string buf_;
  std::deque<Frame> ready_;
  bool failed_ = false;
};

// Big-endian helpers shared by the payload codecs.
void putU16(std::string& out, uint16_t v);
void putU32(std::string& out, uint32_t v);
void putU64(std::string& out, uint64_t v);

/// Reads big-endian integers from a payload; every read is bounds-checked.
class PayloadReader {
 public:
  explicit PayloadReader(std::string_view data) : data_(data) {}
  Result<uint16_t> u16();
  Result<uint32_t> u32();
  Result<uint64_t> u64();
  std::string_view rest();
  bool empty() const { return pos_ >= data_.size(); }

 private:
  std::string_view data_;
  size_t pos_ = 0;
};

}  // namespace matchlock::guestproto
