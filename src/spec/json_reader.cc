// SPDX-License-Identifier: Apache-2.0
#include <fmt/format.h>

#include <string>

#include "spec/readers.h"

namespace matchlock::spec {
namespace {

/// Walks JSON text that nlohmann already accepted and records where each key and value starts.
/// nlohmann's SAX interface does not report positions, so this small scanner mirrors the grammar.
/// It also rejects duplicate keys, which nlohmann silently collapses.
class PositionScanner {
 public:
  PositionScanner(std::string_view text, Document& doc) : text_(text), doc_(doc) {}

  Status scan() {
    if (text_.substr(0, 3) == "\xEF\xBB\xBF") {  // UTF-8 byte order mark
      i_ = 3;
      line_start_ = 3;
    }
    skipWs();
    ML_RETURN_IF_ERROR(value(""));
    return ok();
  }

 private:
  SourcePos here() const { return SourcePos{line_, static_cast<int>(i_ - line_start_) + 1}; }

  void advance() {
    if (text_[i_] == '\n') {
      ++line_;
      line_start_ = i_ + 1;
    }
    ++i_;
  }

  void skipWs() {
    while (i_ < text_.size() &&
           (text_[i_] == ' ' || text_[i_] == '\t' || text_[i_] == '\n' || text_[i_] == '\r')) {
      advance();
    }
  }

  // Returns the raw token text of a string (including quotes).
  std::string_view stringToken() {
    size_t start = i_;
    advance();  // opening quote
    while (i_ < text_.size() && text_[i_] != '"') {
      if (text_[i_] == '\\') {
        advance();
      }
      advance();
    }
    advance();  // closing quote
    return text_.substr(start, i_ - start);
  }

  Status value(const std::string& ptr) {
    doc_.value_pos[ptr] = here();
    char c = text_[i_];
    if (c == '{') {
      return object(ptr);
    }
    if (c == '[') {
      advance();
      skipWs();
      size_t idx = 0;
      while (text_[i_] != ']') {
        ML_RETURN_IF_ERROR(value(pointerAppend(ptr, idx++)));
        skipWs();
        if (text_[i_] == ',') {
          advance();
          skipWs();
        }
      }
      advance();
      return ok();
    }
    if (c == '"') {
      stringToken();
      return ok();
    }
    // number, true, false, null
    while (i_ < text_.size() && text_[i_] != ',' && text_[i_] != '}' && text_[i_] != ']' &&
           text_[i_] != ' ' && text_[i_] != '\n' && text_[i_] != '\t' && text_[i_] != '\r') {
      advance();
    }
    return ok();
  }

  Status object(const std::string& ptr) {
    advance();  // {
    skipWs();
    std::set<std::string> seen;
    while (text_[i_] != '}') {
      SourcePos key_pos = here();
      std::string key = nlohmann::json::parse(stringToken()).get<std::string>();
      std::string child = pointerAppend(ptr, key);
      if (!seen.insert(key).second) {
        return makeError(specError({Diagnostic{doc_.file, key_pos, dottedPath(doc_.tree, child),
                                               fmt::format("duplicate key '{}'", key)}}));
      }
      doc_.key_pos[child] = key_pos;
      skipWs();
      advance();  // :
      skipWs();
      ML_RETURN_IF_ERROR(value(child));
      skipWs();
      if (text_[i_] == ',') {
        advance();
        skipWs();
      }
    }
    advance();
    return ok();
  }

  std::string_view text_;
  Document& doc_;
  size_t i_ = 0;
  int line_ = 1;
  size_t line_start_ = 0;
};

SourcePos positionAtByte(std::string_view text, size_t byte) {
  SourcePos pos{1, 1};
  for (size_t i = 0; i < byte && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++pos.line;
      pos.col = 1;
    } else {
      ++pos.col;
    }
  }
  return pos;
}

}  // namespace

Status readJson(std::string_view text, Document& doc) {
  try {
    doc.tree = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte is 1-based and points just past the offending character.
    size_t byte = e.byte > 0 ? e.byte - 1 : 0;
    std::string what = e.what();
    if (auto p = what.find("syntax error "); p != std::string::npos) {
      what = what.substr(p);
    }
    return makeError(specError({Diagnostic{doc.file, positionAtByte(text, byte), "<root>",
                                           fmt::format("JSON {}", what)}}));
  } catch (const nlohmann::json::exception& e) {
    // A number beyond a double's range, for one: nlohmann reports no position for those.
    std::string what = e.what();
    if (auto p = what.find("] "); p != std::string::npos) {
      what = what.substr(p + 2);
    }
    return makeError(specError(
        {Diagnostic{doc.file, SourcePos{}, "<root>", fmt::format("JSON error: {}", what)}}));
  }
  try {
    PositionScanner scanner(text, doc);
    return scanner.scan();
  } catch (const nlohmann::json::exception& e) {
    return makeError(Errc::Internal,
                     fmt::format("{}: scanning JSON positions: {}", doc.file, e.what()));
  }
}

}  // namespace matchlock::spec
