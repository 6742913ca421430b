// SPDX-License-Identifier: Apache-2.0
#include "guestproto/exec.h"

#include <fmt/format.h>

#include <cstdint>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "guestproto/frame.h"

namespace matchlock::guestproto {
namespace {

Error bad(std::string_view what) {
  return Error(Errc::Protocol, fmt::format("exec protocol: {}", what));
}

}  // namespace

std::string encodeExecMessage(ExecKind kind, std::string_view payload) {
  ML_CHECK(payload.size() <= kMaxExecMessage, "exec message too large");
  std::string out;
  out.reserve(5 + payload.size());
  out.push_back(static_cast<char>(kind));
  putU32(out, static_cast<uint32_t>(payload.size()));
  out.append(payload);
  return out;
}

std::string startPayload(const ExecRequest& r) {
  nlohmann::json j = {{"argv", r.argv}, {"env", r.env},
                      {"cwd", r.cwd},   {"user", r.user},
                      {"tty", r.tty},   {"rows", r.rows},
                      {"cols", r.cols}, {"kill_grace_seconds", r.kill_grace_seconds}};
  return j.dump();
}

std::string encodeStart(const ExecRequest& r) {
  return encodeExecMessage(ExecKind::Start, startPayload(r));
}

std::string encodeResize(uint16_t rows, uint16_t cols) {
  std::string p;
  putU16(p, rows);
  putU16(p, cols);
  return encodeExecMessage(ExecKind::Resize, p);
}

std::string encodeSignal(uint32_t signo) {
  std::string p;
  putU32(p, signo);
  return encodeExecMessage(ExecKind::Signal, p);
}

std::string encodeExit(const ExecExit& e) {
  nlohmann::json j = {{"code", e.code}, {"signal", e.signal}, {"error", e.error}};
  return encodeExecMessage(ExecKind::Exit, j.dump());
}

namespace {

/// An integer field in [lo, hi], `fallback` when absent. nlohmann converts a float to an
/// integer type with a plain cast (undefined when out of range: the exec fuzz target found
/// `"signal": 9.3e37` from a guest) and wraps a large integer, so both are refused here.
int64_t intField(const nlohmann::json& j, const char* key, int64_t fallback, int64_t lo,
                 int64_t hi) {
  auto it = j.find(key);
  if (it == j.end()) {
    return fallback;
  }
  if (!it->is_number_integer()) {
    throw std::invalid_argument(fmt::format("{} is not an integer", key));
  }
  if (it->is_number_unsigned() ? it->get<uint64_t>() > static_cast<uint64_t>(hi)
                               : (it->get<int64_t>() < lo || it->get<int64_t>() > hi)) {
    throw std::invalid_argument(fmt::format("{} is out of range [{}, {}]", key, lo, hi));
  }
  return it->get<int64_t>();
}

}  // namespace

Result<ExecRequest> decodeStart(std::string_view payload) {
  // nlohmann throws on type mismatches; this adapter is the only place that calls it here.
  try {
    nlohmann::json j = nlohmann::json::parse(payload);
    ExecRequest r;
    r.argv = j.at("argv").get<std::vector<std::string>>();
    r.env = j.value("env", std::map<std::string, std::string>{});
    r.cwd = j.value("cwd", "");
    r.user = j.value("user", "");
    r.tty = j.value("tty", false);
    r.rows = static_cast<uint16_t>(intField(j, "rows", 24, 0, UINT16_MAX));
    r.cols = static_cast<uint16_t>(intField(j, "cols", 80, 0, UINT16_MAX));
    r.kill_grace_seconds =
        static_cast<uint32_t>(intField(j, "kill_grace_seconds", 5, 0, UINT32_MAX));
    if (r.argv.empty() || r.argv[0].empty()) {
      return makeError(bad("Start needs a non-empty argv"));
    }
    return r;
  } catch (const nlohmann::json::exception& e) {
    return makeError(bad(fmt::format("bad Start: {}", e.what())));
  } catch (const std::invalid_argument& e) {
    return makeError(bad(fmt::format("bad Start: {}", e.what())));
  }
}

Result<std::pair<uint16_t, uint16_t>> decodeResize(std::string_view payload) {
  PayloadReader r(payload);
  auto rows = r.u16();
  auto cols = r.u16();
  if (!rows || !cols || !r.empty()) {
    return makeError(bad("bad Resize"));
  }
  return std::make_pair(*rows, *cols);
}

Result<uint32_t> decodeSignal(std::string_view payload) {
  PayloadReader r(payload);
  auto signo = r.u32();
  if (!signo || !r.empty() || *signo == 0 || *signo > 64) {
    return makeError(bad("bad Signal"));
  }
  return *signo;
}

Result<ExecExit> decodeExit(std::string_view payload) {
  try {
    nlohmann::json j = nlohmann::json::parse(payload);
    ExecExit e;
    if (!j.contains("code")) {
      return makeError(bad("bad Exit: no code"));
    }
    e.code = static_cast<int>(intField(j, "code", 0, INT32_MIN, INT32_MAX));
    e.signal = static_cast<int>(intField(j, "signal", 0, 0, 128));
    e.error = j.value("error", "");
    return e;
  } catch (const nlohmann::json::exception& e) {
    return makeError(bad(fmt::format("bad Exit: {}", e.what())));
  } catch (const std::invalid_argument& e) {
    return makeError(bad(fmt::format("bad Exit: {}", e.what())));
  }
}

Status ExecMessageReader::feed(std::string_view bytes) {
  if (failed_) {
    return makeError(bad("stream already failed"));
  }
  buf_.append(bytes);
  size_t pos = 0;
  while (buf_.size() - pos >= 5) {
    PayloadReader r(std::string_view(buf_).substr(pos + 1, 4));
    uint32_t len = r.u32().value_or(0);
    auto kind = static_cast<uint8_t>(buf_[pos]);
    if (kind < static_cast<uint8_t>(ExecKind::Start) ||
        kind > static_cast<uint8_t>(ExecKind::Exit) || len > kMaxExecMessage) {
      failed_ = true;
      return makeError(bad(fmt::format("bad message header (kind {}, length {})", kind, len)));
    }
    if (buf_.size() - pos - 5 < len) {
      break;
    }
    ready_.push_back(ExecMessage{static_cast<ExecKind>(kind), buf_.substr(pos + 5, len)});
    pos += 5 + len;
  }
  buf_.erase(0, pos);
  return ok();
}

std::optional<ExecMessage> ExecMessageReader::next() {
  if (ready_.empty()) {
    return std::nullopt;
  }
  ExecMessage m = std::move(ready_.front());
  ready_.pop_front();
  return m;
}

}  // namespace matchlock::guestproto
