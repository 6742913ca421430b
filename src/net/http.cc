// SPDX-License-Identifier: Apache-2.0
#include "net/http.h"

#include <fmt/format.h>
#include <strings.h>

#include <algorithm>
#include <cctype>
#include <charconv>

namespace matchlock::net::http {

namespace {

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && ::strncasecmp(a.data(), b.data(), a.size()) == 0;
}

bool isTokenChar(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) {
    return true;
  }
  switch (c) {
    case '!':
    case '#':
    case '$':
    case '%':
    case '&':
    case '\'':
    case '*':
    case '+':
    case '-':
    case '.':
    case '^':
    case '_':
    case '`':
    case '|':
    case '~':
      return true;
    default:
      return false;
  }
}

bool isToken(std::string_view s) {
  if (s.empty()) {
    return false;
  }
  for (char c : s) {
    if (!isTokenChar(c)) {
      return false;
    }
  }
  return true;
}

// Field values: visible characters, SP, HTAB and obs-text; no CR, LF or NUL.
bool isValidValue(std::string_view s) {
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\t') || u == 0x7f) {
      return false;
    }
  }
  return true;
}

std::string_view trimOws(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

ParseResult fail(int status, std::string why) {
  ParseResult r;
  r.state = ParseResult::State::Error;
  r.error_status = status;
  r.error = std::move(why);
  return r;
}

bool parseVersion(std::string_view v, int* minor) {
  if (v == "HTTP/1.1") {
    *minor = 1;
    return true;
  }
  if (v == "HTTP/1.0") {
    *minor = 0;
    return true;
  }
  return false;
}

// Shared: finds the end of the head within limits, parses header lines after the first line.
ParseResult parseHead(std::string_view buf, Head* out, const Limits& limits, bool request) {
  size_t end = buf.find("\r\n\r\n");
  size_t line_end = buf.find("\r\n");
  if (end == std::string_view::npos) {
    if (buf.size() > limits.max_head_bytes) {
      if (request && line_end == std::string_view::npos) {
        return fail(414, "request line too long");
      }
      return fail(431, "request header fields too large");
    }
    // Reject garbage early instead of waiting for a blank line that never comes.
    if (line_end == std::string_view::npos && buf.find('\n') != std::string_view::npos) {
      return fail(400, "bare LF in start line");
    }
    return {};
  }
  if (end + 4 > limits.max_head_bytes) {
    if (request && line_end > limits.max_head_bytes) {
      return fail(414, "request line too long");
    }
    return fail(431, "request header fields too large");
  }
  Head head;
  std::string_view first = buf.substr(0, line_end);
  if (request) {
    size_t sp1 = first.find(' ');
    size_t sp2 = first.rfind(' ');
    if (sp1 == std::string_view::npos || sp2 == sp1) {
      return fail(400, "malformed request line");
    }
    std::string_view method = first.substr(0, sp1);
    std::string_view target = first.substr(sp1 + 1, sp2 - sp1 - 1);
    std::string_view version = first.substr(sp2 + 1);
    if (!isToken(method)) {
      return fail(400, "malformed method");
    }
    if (target.empty() || target.find(' ') != std::string_view::npos) {
      return fail(400, "malformed request target");
    }
    for (char c : target) {
      auto u = static_cast<unsigned char>(c);
      if (u <= 0x20 || u == 0x7f) {
        return fail(400, "control character in request target");
      }
    }
    if (!version.starts_with("HTTP/")) {
      return fail(400, "malformed HTTP version");
    }
    if (!parseVersion(version, &head.minor_version)) {
      return fail(505, "HTTP version not supported");
    }
    head.method = method;
    head.target = target;
  } else {
    // "HTTP/1.1 200 OK" (reason may be empty).
    if (first.size() < 12 || first[8] != ' ') {
      return fail(502, "malformed status line");
    }
    if (!parseVersion(first.substr(0, 8), &head.minor_version)) {
      return fail(502, "malformed status line");
    }
    std::string_view code = first.substr(9, 3);
    int status = 0;
    auto [ptr, ec] = std::from_chars(code.data(), code.data() + code.size(), status);
    if (ec != std::errc() || ptr != code.data() + 3 || status < 100 || status > 999) {
      return fail(502, "malformed status code");
    }
    if (first.size() > 12 && first[12] != ' ') {
      return fail(502, "malformed status line");
    }
    head.status = status;
    head.reason = first.size() > 13 ? first.substr(13) : std::string_view();
  }
  size_t pos = line_end + 2;
  while (pos < end + 2) {
    size_t eol = buf.find("\r\n", pos);
    std::string_view line = buf.substr(pos, eol - pos);
    pos = eol + 2;
    if (line.empty()) {
      break;
    }
    if (line.front() == ' ' || line.front() == '\t') {
      return fail(400, "obsolete line folding");
    }
    if (line.find('\n') != std::string_view::npos || line.find('\r') != std::string_view::npos) {
      return fail(400, "bare CR or LF in header");
    }
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) {
      return fail(400, "header line without ':'");
    }
    std::string_view name = line.substr(0, colon);
    if (!isToken(name)) {
      return fail(400, "malformed header name");
    }
    std::string_view value = trimOws(line.substr(colon + 1));
    if (!isValidValue(value)) {
      return fail(400, "invalid character in header value");
    }
    if (head.headers.size() >= limits.max_headers) {
      return fail(431, "too many header fields");
    }
    head.headers.push_back(Header{std::string(name), std::string(value)});
  }
  *out = std::move(head);
  ParseResult r;
  r.state = ParseResult::State::Complete;
  r.consumed = end + 4;
  return r;
}

bool hexDigit(char c, unsigned* v) {
  if (c >= '0' && c <= '9') {
    *v = static_cast<unsigned>(c - '0');
  } else if (c >= 'a' && c <= 'f') {
    *v = static_cast<unsigned>(c - 'a' + 10);
  } else if (c >= 'A' && c <= 'F') {
    *v = static_cast<unsigned>(c - 'A' + 10);
  } else {
    return false;
  }
  return true;
}

// Is the final transfer coding "chunked"? Sets *other when any coding is present at all.
bool lastCodingIsChunked(const Head& head, bool* present) {
  std::string all;
  for (const Header& h : head.headers) {
    if (iequals(h.name, "transfer-encoding")) {
      *present = true;
      if (!all.empty()) {
        all += ',';
      }
      all += h.value;
    }
  }
  std::string_view v = all;
  size_t comma = v.rfind(',');
  std::string_view last = trimOws(comma == std::string_view::npos ? v : v.substr(comma + 1));
  return iequals(last, "chunked");
}

bool contentLength(const Head& head, uint64_t* out, bool* present) {
  std::optional<uint64_t> seen;
  for (const Header& h : head.headers) {
    if (!iequals(h.name, "content-length")) {
      continue;
    }
    *present = true;
    // "5, 5" is tolerated by RFC 9110 when all values agree.
    std::string_view rest = h.value;
    while (!rest.empty()) {
      size_t comma = rest.find(',');
      std::string_view item = trimOws(rest.substr(0, comma));
      rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
      uint64_t n = 0;
      auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), n);
      if (item.empty() || ec != std::errc() || ptr != item.data() + item.size()) {
        return false;
      }
      if (seen && *seen != n) {
        return false;
      }
      seen = n;
    }
  }
  *out = seen.value_or(0);
  return true;
}

}  // namespace

std::optional<std::string_view> Head::find(std::string_view name) const {
  for (const Header& h : headers) {
    if (iequals(h.name, name)) {
      return std::string_view{h.value};
    }
  }
  return std::nullopt;
}

size_t Head::count(std::string_view name) const {
  return static_cast<size_t>(std::count_if(headers.begin(), headers.end(),
                                           [&](const Header& h) { return iequals(h.name, name); }));
}

std::optional<std::string_view> Head::targetAuthority() const {
  std::string_view t = target;
  size_t scheme = t.find("://");
  if (scheme == std::string_view::npos || scheme == 0 || t.front() == '/') {
    return std::nullopt;
  }
  for (char c : t.substr(0, scheme)) {
    if (std::isalnum(static_cast<unsigned char>(c)) == 0 && c != '+' && c != '-' && c != '.') {
      return std::nullopt;
    }
  }
  std::string_view rest = t.substr(scheme + 3);
  return rest.substr(0, rest.find_first_of("/?#"));
}

void Head::set(std::string_view name, std::string value) {
  remove(name);
  headers.push_back(Header{std::string(name), std::move(value)});
}

void Head::remove(std::string_view name) {
  std::erase_if(headers, [&](const Header& h) { return iequals(h.name, name); });
}

std::string_view Head::path() const {
  std::string_view t = target;
  return t.substr(0, t.find('?'));
}

std::string_view Head::query() const {
  std::string_view t = target;
  size_t q = t.find('?');
  return q == std::string_view::npos ? std::string_view() : t.substr(q + 1);
}

ParseResult parseRequestHead(std::string_view buf, Head* out, const Limits& limits) {
  return parseHead(buf, out, limits, true);
}

ParseResult parseResponseHead(std::string_view buf, Head* out, const Limits& limits) {
  return parseHead(buf, out, limits, false);
}

std::string serializeRequestHead(const Head& head) {
  std::string out;
  out.reserve(256);
  out += head.method;
  out += ' ';
  out += head.target;
  out += head.minor_version == 0 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n";
  for (const Header& h : head.headers) {
    out += h.name;
    out += ": ";
    out += h.value;
    out += "\r\n";
  }
  out += "\r\n";
  return out;
}

std::string serializeResponseHead(const Head& head) {
  std::string out =
      fmt::format("HTTP/1.{} {} {}\r\n", head.minor_version == 0 ? 0 : 1, head.status, head.reason);
  for (const Header& h : head.headers) {
    out += h.name;
    out += ": ";
    out += h.value;
    out += "\r\n";
  }
  out += "\r\n";
  return out;
}

size_t BodyFramer::consume(std::string_view data) {
  if (done_ || failed_) {
    return 0;
  }
  switch (mode_) {
    case Mode::None:
      done_ = true;
      return 0;
    case Mode::UntilClose:
      return data.size();
    case Mode::Length: {
      uint64_t take = std::min<uint64_t>(remaining_, data.size());
      remaining_ -= take;
      done_ = remaining_ == 0;
      return static_cast<size_t>(take);
    }
    case Mode::Chunked:
      break;
  }
  size_t i = 0;
  while (i < data.size() && !done_) {
    char c = data[i];
    switch (chunk_state_) {
      case ChunkState::Size: {
        unsigned v = 0;
        if (hexDigit(c, &v)) {
          if (remaining_ > (UINT64_MAX >> 4)) {
            failed_ = true;
            return 0;
          }
          remaining_ = (remaining_ << 4) | v;
          size_seen_ = true;
          ++i;
        } else if (c == ';' || c == ' ' || c == '\t') {
          if (!size_seen_) {
            failed_ = true;
            return 0;
          }
          chunk_state_ = ChunkState::SizeExt;
          ++i;
        } else if (c == '\r' && size_seen_) {
          chunk_state_ = ChunkState::SizeLf;
          ++i;
        } else {
          failed_ = true;
          return 0;
        }
        break;
      }
      case ChunkState::SizeExt:
        if (c == '\r') {
          chunk_state_ = ChunkState::SizeLf;
        } else if (c == '\n' || ++line_bytes_ > 4096) {
          failed_ = true;
          return 0;
        }
        ++i;
        break;
      case ChunkState::SizeLf:
        if (c != '\n') {
          failed_ = true;
          return 0;
        }
        ++i;
        line_bytes_ = 0;
        size_seen_ = false;
        if (remaining_ == 0) {
          chunk_state_ = ChunkState::Trailer;
          trailer_line_len_ = 0;
        } else {
          chunk_state_ = ChunkState::Data;
        }
        break;
      case ChunkState::Data: {
        uint64_t take = std::min<uint64_t>(remaining_, data.size() - i);
        remaining_ -= take;
        i += static_cast<size_t>(take);
        if (remaining_ == 0) {
          chunk_state_ = ChunkState::DataCr;
        }
        break;
      }
      case ChunkState::DataCr:
        if (c != '\r') {
          failed_ = true;
          return 0;
        }
        chunk_state_ = ChunkState::DataLf;
        ++i;
        break;
      case ChunkState::DataLf:
        if (c != '\n') {
          failed_ = true;
          return 0;
        }
        chunk_state_ = ChunkState::Size;
        ++i;
        break;
      case ChunkState::Trailer:
        if (c == '\r') {
          chunk_state_ = ChunkState::TrailerLf;
        } else if (c == '\n' || ++trailer_line_len_ > 8192) {
          failed_ = true;
          return 0;
        }
        ++i;
        break;
      case ChunkState::TrailerLf:
        if (c != '\n') {
          failed_ = true;
          return 0;
        }
        ++i;
        if (trailer_line_len_ == 0) {
          done_ = true;
        } else {
          trailer_line_len_ = 0;
          chunk_state_ = ChunkState::Trailer;
        }
        break;
    }
  }
  return i;
}

BodyFramer requestFraming(const Head& head, int* error_status) {
  *error_status = 0;
  bool te_present = false;
  bool chunked = lastCodingIsChunked(head, &te_present);
  bool cl_present = false;
  uint64_t length = 0;
  bool cl_ok = contentLength(head, &length, &cl_present);
  if (te_present) {
    // Both headers is the classic smuggling vector: refuse rather than pick one.
    if (cl_present || head.minor_version == 0) {
      *error_status = 400;
      return BodyFramer::none();
    }
    if (!chunked) {
      *error_status = 501;
      return BodyFramer::none();
    }
    return BodyFramer::chunked();
  }
  if (!cl_ok) {
    *error_status = 400;
    return BodyFramer::none();
  }
  return BodyFramer::length(length);
}

BodyFramer responseFraming(const Head& head, std::string_view request_method, int* error_status) {
  *error_status = 0;
  if (request_method == "HEAD" || (head.status >= 100 && head.status < 200) || head.status == 204 ||
      head.status == 304) {
    return BodyFramer::none();
  }
  if (request_method == "CONNECT" && head.status >= 200 && head.status < 300) {
    return BodyFramer::untilClose();
  }
  bool te_present = false;
  bool chunked = lastCodingIsChunked(head, &te_present);
  if (te_present) {
    return chunked ? BodyFramer::chunked() : BodyFramer::untilClose();
  }
  bool cl_present = false;
  uint64_t length = 0;
  if (!contentLength(head, &length, &cl_present)) {
    *error_status = 502;
    return BodyFramer::none();
  }
  return cl_present ? BodyFramer::length(length) : BodyFramer::untilClose();
}

std::string simpleResponse(int status, std::string_view reason, std::string_view body,
                           std::string_view extra_headers) {
  return fmt::format(
      "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n"
      "Connection: close\r\n{}\r\n{}",
      status, reason, body.size(), extra_headers, body);
}

}  // namespace matchlock::net::http
