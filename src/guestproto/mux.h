// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "common/result.h"
#include "guestproto/frame.h"

namespace matchlock::guestproto {

/// Multiplexes streams over one byte transport (virtio-serial here, vsock elsewhere) with
/// per-stream credit-based flow control. Sans-I/O: bytes go in through receive(), bytes to write
/// come out of takeOutput(); the owner does the reading and writing (an ev::Loop on the host, the
/// agent's loop in the guest). Not thread-safe: one owner thread.
///
/// Streams: the host opens odd ids, the guest even ids, never reused. Each side may have at most
/// `initial_window` unconsumed bytes in flight per stream towards the other; the receiver grants
/// more with Window frames as its application consumes data (consumed()). A peer that sends beyond
/// its credit, on an unknown stream, or after closing, breaks the protocol: receive() fails and
/// the connection must be torn down.
class Mux {
 public:
  enum class Role { Host, Guest };

  struct Options {
    uint32_t initial_window = 256 * 1024;  ///< our per-stream receive window
    uint32_t max_streams = 1024;           ///< concurrent streams the peer may open
    std::string agent = "matchlock";       ///< sent in Hello, for logs
  };

  struct Callbacks {
    std::function<void()> on_ready;                               ///< handshake completed
    std::function<void(uint32_t stream, uint32_t port)> on_open;  ///< peer opened a stream
    std::function<void(uint32_t stream, std::string_view data)> on_data;
    std::function<void(uint32_t stream)> on_close;  ///< peer half-closed
    std::function<void(uint32_t stream, uint32_t code, std::string_view message)> on_reset;
    std::function<void(uint32_t code, std::string_view message)> on_goaway;
  };

  Mux(Role role, Callbacks callbacks, Options options);
  Mux(Role role, Callbacks callbacks) : Mux(role, std::move(callbacks), Options{}) {}

  /// Queues our Hello. Call once before anything else.
  void start();
  bool ready() const { return ready_; }
  const std::string& peerAgent() const { return peer_agent_; }

  /// Feeds bytes read from the transport and dispatches the frames in them.
  Status receive(std::string_view bytes);

  /// Opens a stream to `port` on the peer; Unavailable until the handshake completed. Data may
  /// be sent at once (the peer's initial window applies even before it has seen the Open).
  Result<uint32_t> open(uint32_t port);
  /// Queues data; what exceeds the peer's credit waits in the stream's pending buffer and goes out
  /// as Window frames arrive. Check pendingBytes() for backpressure.
  Status send(uint32_t stream, std::string_view data);
  /// Half-closes our direction after pending data has been sent.
  Status closeWrite(uint32_t stream);
  /// Aborts a stream in both directions.
  void reset(uint32_t stream, uint32_t code, std::string_view message);
  /// The application has processed `n` bytes of the stream's data: grants the peer more credit.
  void consumed(uint32_t stream, size_t n);
  /// Tells the peer the connection is closing.
  void goAway(uint32_t code, std::string_view message);
  void ping(uint64_t opaque);

  size_t pendingBytes(uint32_t stream) const;
  size_t credit(uint32_t stream) const;
  size_t openStreams() const { return streams_.size(); }

  /// Bytes to write to the transport (and forget).
  std::string takeOutput();
  bool hasOutput() const { return !out_.empty(); }

 private:
  struct Stream {
    uint32_t port = 0;
    uint64_t send_credit = 0;     // bytes we may still send
    uint64_t recv_allowance = 0;  // bytes the peer may still send
    uint64_t unacked = 0;         // consumed but not yet granted back
    std::string pending;          // queued beyond credit
    bool local_closed = false;    // we sent (or queued) Close
    bool close_sent = false;
    bool remote_closed = false;
  };

  void queue(FrameType type, uint32_t stream, std::string payload, uint8_t flags = 0);
  void flush(uint32_t id, Stream& s);
  void maybeErase(uint32_t id);
  Status fail(std::string message);
  Status handle(Frame&& f);
  Status handleHello(const Frame& f);
  bool peerOwns(uint32_t id) const;
  /// True for ids that were opened at some point (by either side), so a frame on a stream that is
  /// gone is stale rather than a protocol error.
  bool everOpened(uint32_t id) const;

  Role role_;
  Callbacks cb_;
  Options opts_;
  bool started_ = false;
  bool ready_ = false;
  bool failed_ = false;
  uint32_t peer_window_ = 0;
  uint32_t peer_max_payload_ = kMaxPayload;
  std::string peer_agent_;
  uint32_t next_id_;
  uint32_t highest_peer_id_ = 0;
  std::map<uint32_t, Stream> streams_;
  FrameReader reader_;
  std::string out_;
};

}  // namespace matchlock::guestproto
