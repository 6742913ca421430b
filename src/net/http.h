// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace matchlock::net::http {

struct Header {
  std::string name;
  std::string value;
};

/// A parsed HTTP/1.x request or response head.
struct Head {
  // Request line.
  std::string method;
  std::string target;
  // Status line.
  int status = 0;
  std::string reason;
  int minor_version = 1;  ///< HTTP/1.<minor>
  std::vector<Header> headers;

  /// First value of header `name` (case-insensitive), if present.
  std::optional<std::string_view> find(std::string_view name) const;
  /// How many times header `name` occurs (case-insensitive).
  size_t count(std::string_view name) const;
  /// The authority of an absolute-form target (`http://a.example:8080/x?q` → `a.example:8080`,
  /// userinfo included so that callers can refuse it); nullopt for any other form.
  std::optional<std::string_view> targetAuthority() const;
  /// Replaces all values of `name` with one value (appends when absent).
  void set(std::string_view name, std::string value);
  void remove(std::string_view name);
  /// The target's path (before '?').
  std::string_view path() const;
  /// The target's query (after '?', without it), "" when absent.
  std::string_view query() const;
};

/// Outcome of parsing a head from the front of a buffer.
struct ParseResult {
  enum class State { Incomplete, Complete, Error };
  State state = State::Incomplete;
  size_t consumed = 0;   ///< bytes of the head (incl. the blank line) when Complete
  int error_status = 0;  ///< suggested HTTP status when Error: 400, 414, 431, 501, 505
  std::string error;     ///< human-readable reason
};

/// Parse limits.
struct Limits {
  size_t max_head_bytes =
      size_t{32} * 1024;     ///< request line + headers; more → 431 (414 for the line)
  size_t max_headers = 128;  ///< more → 431
};

/// Parses a request head (strict RFC 9112: CRLF line ends, token methods, no obs-fold, no space
/// before ':'). Pipelined bytes after the head are left for the caller.
ParseResult parseRequestHead(std::string_view buf, Head* out, const Limits& limits = {});

/// Parses a response head (status line + headers) with the same strictness.
ParseResult parseResponseHead(std::string_view buf, Head* out, const Limits& limits = {});

/// Serializes a request head (request line, headers, blank line).
std::string serializeRequestHead(const Head& head);
/// Serializes a response head (status line, headers, blank line).
std::string serializeResponseHead(const Head& head);

/// Tracks where a message body ends in a byte stream without buffering it: bytes are passed
/// through unchanged and consume() reports how many belong to the body.
class BodyFramer {
 public:
  enum class Mode { None, Length, Chunked, UntilClose };
  BodyFramer() = default;
  static BodyFramer none() { return {Mode::None, 0}; }
  static BodyFramer length(uint64_t n) { return {n == 0 ? Mode::None : Mode::Length, n}; }
  static BodyFramer chunked() { return {Mode::Chunked, 0}; }
  static BodyFramer untilClose() { return {Mode::UntilClose, 0}; }

  /// Consumes body bytes from the front of `data`; returns how many belong to the body. After
  /// done() the rest of `data` belongs to the next message. Returns 0 and sets failed() on a
  /// malformed chunked encoding.
  size_t consume(std::string_view data);
  bool done() const { return done_; }
  bool failed() const { return failed_; }
  Mode mode() const { return mode_; }

 private:
  BodyFramer(Mode mode, uint64_t n) : mode_(mode), remaining_(n), done_(mode == Mode::None) {}
  enum class ChunkState { Size, SizeExt, SizeLf, Data, DataCr, DataLf, Trailer, TrailerLf };
  Mode mode_ = Mode::None;
  uint64_t remaining_ = 0;
  bool done_ = true;
  bool failed_ = false;
  ChunkState chunk_state_ = ChunkState::Size;
  bool size_seen_ = false;
  size_t trailer_line_len_ = 0;
  size_t line_bytes_ = 0;
};

/// Body framing of a request (RFC 9112 §6.3). Sets `error_status` (400/501) when the framing is
/// ambiguous or unsupported (Content-Length with Transfer-Encoding, differing lengths...).
BodyFramer requestFraming(const Head& head, int* error_status);

/// Body framing of a response to a request with method `request_method`.
BodyFramer responseFraming(const Head& head, std::string_view request_method, int* error_status);

/// A minimal complete response ("HTTP/1.1 403 Forbidden", text body, Connection: close).
std::string simpleResponse(int status, std::string_view reason, std::string_view body,
                           std::string_view extra_headers = "");

}  // namespace matchlock::net::http
