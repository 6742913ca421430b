// SPDX-License-Identifier: Apache-2.0
// Guest protocol frames as the host reads them from the channel: any byte stream, fed in pieces
// of guest-chosen sizes. Every frame that comes out re-encodes to the bytes it was read from.
#include <string>

#include "fuzz_check.h"
#include "guestproto/frame.h"

using matchlock::guestproto::encodeFrame;
using matchlock::guestproto::FrameReader;
using matchlock::guestproto::PayloadReader;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Cursor in(fuzz::asView(data, size));
  size_t piece = in.byte() + 1U;
  std::string_view stream = in.rest();
  FrameReader reader;
  std::string consumed;
  size_t fed = 0;
  while (fed < stream.size()) {
    std::string_view chunk = stream.substr(fed, piece);
    fed += chunk.size();
    if (!reader.feed(chunk)) {
      return 0;  // refused: the reader stays failed, as the host drops the channel
    }
    while (auto frame = reader.next()) {
      std::string again = encodeFrame(*frame);
      consumed += again;
      PayloadReader p(frame->payload);
      (void)p.u16();
      (void)p.u32();
      (void)p.u64();
      (void)p.rest();
    }
  }
  // What came out, re-encoded, is exactly the stream's prefix that the reader consumed.
  FUZZ_CHECK(consumed.size() + reader.buffered() == stream.size());
  FUZZ_CHECK(stream.substr(0, consumed.size()) == consumed);
  return 0;
}
