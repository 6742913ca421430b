// SPDX-License-Identifier: Apache-2.0
#include "rpc/jsonrpc.h"

namespace matchlock::rpc {
namespace {

using Json = nlohmann::json;

Json envelope(const Json& id) {
  Json j = {{"jsonrpc", "2.0"}};
  if (!id.is_null()) {
    j["id"] = id;
  }
  return j;
}

}  // namespace

Parsed parse(std::string_view line) {
  Parsed out;
  Json j = Json::parse(line, nullptr, false);
  if (j.is_discarded()) {
    out.failure = ParseFailure{kParseError, "Parse error", nullptr};
    return out;
  }
  if (!j.is_object()) {
    out.failure = ParseFailure{kInvalidRequest, "Invalid request: not an object", nullptr};
    return out;
  }
  Json id = nullptr;
  bool has_id = false;
  if (auto it = j.find("id"); it != j.end() && !it->is_null()) {
    if (!it->is_number_integer() && !it->is_number_unsigned() && !it->is_string()) {
      out.failure =
          ParseFailure{kInvalidRequest, "Invalid request: id must be a number or string", nullptr};
      return out;
    }
    id = *it;
    has_id = true;
  }
  if (auto v = j.find("jsonrpc"); v != j.end() && !(v->is_string() && *v == "2.0")) {
    out.failure = ParseFailure{kInvalidRequest, "Invalid request: jsonrpc must be \"2.0\"", id};
    return out;
  }
  auto m = j.find("method");
  if (m == j.end() || !m->is_string() || m->get_ref<const std::string&>().empty()) {
    out.failure = ParseFailure{kInvalidRequest, "Invalid request: method is missing", id};
    return out;
  }
  Message msg;
  msg.method = m->get<std::string>();
  if (auto p = j.find("params"); p != j.end()) {
    msg.params = *p;
  }
  if (has_id) {
    msg.id = id;
  }
  out.message = std::move(msg);
  return out;
}

std::string resultLine(const Json& id, const Json& result) {
  Json j = envelope(id);
  j["result"] = result;
  return j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

std::string errorLine(const Json& id, int code, std::string_view message) {
  Json j = envelope(id);
  j["error"] = {{"code", code}, {"message", std::string(message)}};
  return j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

std::string notificationLine(std::string_view method, const Json& params) {
  Json j = {{"jsonrpc", "2.0"}, {"method", std::string(method)}, {"params", params}};
  return j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

void LineReader::feed(std::string_view bytes) {
  while (!bytes.empty()) {
    size_t nl = bytes.find('\n');
    std::string_view part = bytes.substr(0, nl);
    if (!discarding_) {
      if (buf_.size() + part.size() > max_) {
        ready_.push_back(Line{"", true});
        buf_.clear();
        discarding_ = true;
      } else {
        buf_.append(part);
      }
    }
    if (nl == std::string_view::npos) {
      return;
    }
    if (!discarding_) {
      if (!buf_.empty() && buf_.back() == '\r') {
        buf_.pop_back();
      }
      if (buf_.find_first_not_of(" \t") != std::string::npos) {
        ready_.push_back(Line{std::move(buf_), false});
      }
    }
    buf_.clear();
    discarding_ = false;
    bytes.remove_prefix(nl + 1);
  }
}

std::optional<LineReader::Line> LineReader::next() {
  if (ready_.empty()) {
    return std::nullopt;
  }
  Line l = std::move(ready_.front());
  ready_.pop_front();
  return l;
}

}  // namespace matchlock::rpc
