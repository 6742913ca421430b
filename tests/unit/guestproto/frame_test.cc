// SPDX-License-Identifier: Apache-2.0
#include "guestproto/frame.h"

#include <catch2/catch.hpp>

using namespace matchlock::guestproto;  // NOLINT(google-build-using-namespace)

TEST_CASE("frames round-trip, fed whole or byte by byte") {
  Frame a{FrameType::Open, 0, 7, std::string("\x00\x00\x13\x88", 4)};
  Frame b{FrameType::Data, 0, 7, std::string(70000 - 12, 'x').substr(0, kMaxPayload)};
  Frame c{FrameType::Close, 0, 7, ""};
  std::string wire = encodeFrame(a) + encodeFrame(b) + encodeFrame(c);
  CHECK(wire.size() == 3 * kHeaderSize + 4 + b.payload.size());

  for (size_t chunk : {wire.size(), size_t{1}, size_t{7}, size_t{4096}}) {
    FrameReader reader;
    for (size_t i = 0; i < wire.size(); i += chunk) {
      REQUIRE(reader.feed(std::string_view(wire).substr(i, chunk)).has_value());
    }
    auto f1 = reader.next();
    auto f2 = reader.next();
    auto f3 = reader.next();
    REQUIRE(f1);
    REQUIRE(f2);
    REQUIRE(f3);
    CHECK_FALSE(reader.next());
    CHECK(f1->type == FrameType::Open);
    CHECK(f1->stream == 7);
    CHECK(PayloadReader(f1->payload).u32().value() == 5000);
    CHECK(f2->payload == b.payload);
    CHECK(f3->type == FrameType::Close);
    CHECK(reader.buffered() == 0);
  }
}

TEST_CASE("a truncated frame waits for the rest") {
  std::string wire = encodeFrame(Frame{FrameType::Data, 0, 1, "hello"});
  FrameReader reader;
  REQUIRE(reader.feed(wire.substr(0, wire.size() - 1)).has_value());
  CHECK_FALSE(reader.next());
  CHECK(reader.buffered() == wire.size() - 1);
  REQUIRE(reader.feed(wire.substr(wire.size() - 1)).has_value());
  CHECK(reader.next()->payload == "hello");
}

TEST_CASE("malformed headers are protocol errors and poison the reader") {
  auto header = [](uint8_t type, uint8_t flags, uint32_t len) {
    std::string h;
    h.push_back(static_cast<char>(type));
    h.push_back(static_cast<char>(flags));
    putU16(h, 0);
    putU32(h, 1);
    putU32(h, len);
    return h;
  };
  for (const std::string& bad :
       {header(0, 0, 0), header(10, 0, 0), header(3, 0x80, 0), header(3, 0, kMaxPayload + 1)}) {
    FrameReader reader;
    auto st = reader.feed(bad);
    REQUIRE_FALSE(st.has_value());
    CHECK(st.error().code() == matchlock::Errc::Protocol);
    CHECK_FALSE(reader.feed(encodeFrame(Frame{FrameType::Ping, 0, 0, "12345678"})).has_value());
  }
}

TEST_CASE("payload reader bounds") {
  std::string p;
  putU16(p, 0xbeef);
  putU32(p, 0xdeadbeef);
  putU64(p, 0x0123456789abcdefULL);
  p += "tail";
  PayloadReader r(p);
  CHECK(r.u16().value() == 0xbeef);
  CHECK(r.u32().value() == 0xdeadbeef);
  CHECK(r.u64().value() == 0x0123456789abcdefULL);
  CHECK(r.rest() == "tail");
  CHECK(r.empty());
  CHECK_FALSE(r.u16().has_value());
  CHECK_FALSE(PayloadReader("abc").u32().has_value());
}
