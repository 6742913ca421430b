// SPDX-License-Identifier: Apache-2.0
// The channel multiplexer fed by a hostile peer: the input is the peer's byte stream (after a
// valid Hello, so that the fuzzer spends its time past the handshake), interleaved with our own
// actions on the streams the peer opened (send, consume, close, reset), chosen by input bytes.
#include <string>
#include <vector>

#include "fuzz_check.h"
#include "guestproto/frame.h"
#include "guestproto/mux.h"

using matchlock::guestproto::encodeFrame;
using matchlock::guestproto::Frame;
using matchlock::guestproto::FrameType;
using matchlock::guestproto::Mux;
using matchlock::guestproto::putU16;
using matchlock::guestproto::putU32;

namespace {

std::string hello() {
  Frame f;
  f.type = FrameType::Hello;
  putU16(f.payload, 1);
  putU16(f.payload, 0);
  putU32(f.payload, matchlock::guestproto::kMaxPayload);
  putU32(f.payload, 64 * 1024);
  f.payload += "fuzz";
  return encodeFrame(f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Cursor in(fuzz::asView(data, size));
  uint8_t mode = in.byte();
  std::vector<uint32_t> streams;
  size_t ours = 0;  // streams we opened: the peer's limit does not count them
  size_t received = 0;
  Mux::Callbacks cb;
  cb.on_open = [&](uint32_t stream, uint32_t) { streams.push_back(stream); };
  cb.on_data = [&](uint32_t, std::string_view d) { received += d.size(); };
  Mux::Options options;
  options.initial_window = 4096;
  options.max_streams = 16;
  Mux mux((mode & 1) != 0 ? Mux::Role::Guest : Mux::Role::Host, cb, options);
  mux.start();
  (void)mux.takeOutput();
  if ((mode & 2) == 0 && !mux.receive(hello())) {
    return 0;
  }
  while (!in.empty()) {
    uint8_t op = in.byte();
    size_t n = in.byte();
    uint32_t pick = streams.empty() ? 0 : streams[n % streams.size()];
    switch (op % 8) {
      case 0:
        (void)mux.send(pick, in.take(n));
        break;
      case 1:
        mux.consumed(pick, n * 64);
        break;
      case 2:
        (void)mux.closeWrite(pick);
        break;
      case 3:
        mux.reset(pick, 1, "fuzz");
        break;
      case 4:
        if (mux.open(5000 + (n & 3))) {
          ++ours;
        }
        break;
      default:
        // Peer bytes: the bulk of the input.
        if (!mux.receive(in.take(n * ((op >> 3) + 1)))) {
          return 0;  // protocol error: the host tears the channel down
        }
        break;
    }
    std::string out = mux.takeOutput();
    // Whatever we emit is well-formed for the peer.
    matchlock::guestproto::FrameReader check;
    FUZZ_CHECK(check.feed(out));
    while (check.next()) {
    }
    FUZZ_CHECK(check.buffered() == 0);
    // The peer cannot open streams beyond the limit.
    FUZZ_CHECK(mux.openStreams() <= options.max_streams + ours);
  }
  return 0;
}
