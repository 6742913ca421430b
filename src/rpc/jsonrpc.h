// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace matchlock::rpc {

/// JSON-RPC 2.0 error codes, as upstream matchlock uses them (docs/rpc.md).
enum ErrorCode : int {
  kParseError = -32700,
  kInvalidRequest = -32600,
  kMethodNotFound = -32601,
  kInvalidParams = -32602,
  kInternalError = -32603,
  kVmFailed = -32000,
  kExecFailed = -32001,
  kFileFailed = -32002,
  kCancelled = -32003,
};

/// One parsed input line. Sans-I/O: every byte comes from the client, so parse() accepts any
/// input and never throws.
struct Message {
  std::string method;
  nlohmann::json params;             ///< null when absent
  std::optional<nlohmann::json> id;  ///< absent: a notification (no response)
};

struct ParseFailure {
  int code = kParseError;
  std::string message;
  nlohmann::json id;  ///< null when the line had no usable id
};

/// Parses one line (without its newline). A line that is not JSON is a parse error; an object
/// without a string `method`, or a `jsonrpc` other than "2.0", is an invalid request. Ids must
/// be numbers or strings (upstream's SDKs use integers from 1).
struct Parsed {
  std::optional<Message> message;
  std::optional<ParseFailure> failure;
};
Parsed parse(std::string_view line);

std::string resultLine(const nlohmann::json& id, const nlohmann::json& result);
/// `id` null: the response carries no id (upstream omits it when unknown).
std::string errorLine(const nlohmann::json& id, int code, std::string_view message);
std::string notificationLine(std::string_view method, const nlohmann::json& params);

/// Splits a byte stream into lines of at most `max_line` bytes. Empty lines are skipped; a line
/// over the limit is reported once (as an oversized line) and discarded up to its newline.
class LineReader {
 public:
  explicit LineReader(size_t max_line) : max_(max_line) {}
  void feed(std::string_view bytes);
  struct Line {
    std::string text;
    bool oversized = false;
  };
  std::optional<Line> next();

 private:
  size_t max_;
  std::string buf_;
  bool discarding_ = false;
  std::deque<Line> ready_;
};

}  // namespace matchlock::rpc
