// SPDX-License-Identifier: Apache-2.0
#include "spec/document.h"

#include <fmt/format.h>

#include <cctype>
#include <filesystem>
#include <optional>

#include "common/fd.h"
#include "common/strings.h"
#include "spec/readers.h"

namespace matchlock::spec {

SourcePos Document::positionOf(std::string_view pointer) const {
  std::string p(pointer);
  for (;;) {
    if (auto it = value_pos.find(p); it != value_pos.end()) {
      return it->second;
    }
    if (auto it = key_pos.find(p); it != key_pos.end()) {
      return it->second;
    }
    if (p.empty()) {
      return SourcePos{1, 1};
    }
    p.resize(p.rfind('/'));
  }
}

SourcePos Document::keyPositionOf(std::string_view pointer) const {
  if (auto it = key_pos.find(pointer); it != key_pos.end()) {
    return it->second;
  }
  return positionOf(pointer);
}

std::string Diagnostic::toString() const {
  if (pos.line > 0) {
    return fmt::format("{}:{}:{}: {}: {}", file, pos.line, pos.col, path, message);
  }
  return fmt::format("{}: {}: {}", file, path, message);
}

std::string pointerAppend(std::string_view pointer, std::string_view token) {
  std::string out(pointer);
  out.push_back('/');
  for (char c : token) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string pointerAppend(std::string_view pointer, size_t index) {
  return fmt::format("{}/{}", pointer, index);
}

std::vector<std::string> pointerTokens(std::string_view pointer) {
  std::vector<std::string> out;
  if (pointer.empty()) {
    return out;
  }
  size_t i = 1;
  std::string cur;
  for (; i <= pointer.size(); ++i) {
    if (i == pointer.size() || pointer[i] == '/') {
      out.push_back(cur);
      cur.clear();
      continue;
    }
    if (pointer[i] == '~' && i + 1 < pointer.size()) {
      cur.push_back(pointer[i + 1] == '1' ? '/' : '~');
      ++i;
      continue;
    }
    cur.push_back(pointer[i]);
  }
  return out;
}

namespace {
bool isIdentifier(std::string_view s) {
  if (s.empty()) {
    return false;
  }
  for (char c : s) {
    if (std::isalnum(static_cast<unsigned char>(c)) == 0 && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}
}  // namespace

std::string dottedPath(const nlohmann::json& tree, std::string_view pointer) {
  std::string out;
  const nlohmann::json* node = &tree;
  for (const std::string& tok : pointerTokens(pointer)) {
    if (node != nullptr && node->is_array()) {
      out += fmt::format("[{}]", tok);
      size_t idx = std::strtoul(tok.c_str(), nullptr, 10);
      node = idx < node->size() ? &(*node)[idx] : nullptr;
      continue;
    }
    if (isIdentifier(tok)) {
      if (!out.empty()) {
        out.push_back('.');
      }
      out += tok;
    } else {
      out += fmt::format("[{}]", nlohmann::json(tok).dump(
                                     -1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
    if (node != nullptr && node->is_object()) {
      auto it = node->find(tok);
      node = it != node->end() ? &*it : nullptr;
    } else {
      node = nullptr;
    }
  }
  return out.empty() ? "<root>" : out;
}

Error specError(const std::vector<Diagnostic>& diags) {
  ML_CHECK(!diags.empty(), "specError needs at least one diagnostic");
  std::string msg = diags.front().toString();
  if (diags.size() > 1) {
    msg += fmt::format(" (and {} more)", diags.size() - 1);
  }
  Error err(Errc::InvalidSpec, std::move(msg));
  for (const Diagnostic& d : diags) {
    err.addDetail(d.toString());
  }
  return err;
}

namespace {

/// The first key or string value of `node` that is not UTF-8 (YAML readers pass raw bytes and
/// escapes through; every later stage, from JSON output to the state store, needs UTF-8).
std::optional<Diagnostic> firstNonUtf8(const Document& doc, const nlohmann::json& node,
                                       const std::string& pointer) {
  auto bad = [&](std::string_view s, SourcePos pos, std::string_view what) {
    size_t at = invalidUtf8At(s);
    return Diagnostic{doc.file, pos, dottedPath(doc.tree, pointer),
                      fmt::format("{} is not valid UTF-8 (byte 0x{:02x} at offset {})", what,
                                  static_cast<unsigned char>(s[at]), at)};
  };
  if (node.is_string()) {
    const auto& s = node.get_ref<const std::string&>();
    if (invalidUtf8At(s) != std::string::npos) {
      return bad(s, doc.positionOf(pointer), "the value");
    }
  } else if (node.is_object()) {
    for (const auto& [key, value] : node.items()) {
      if (invalidUtf8At(key) != std::string::npos) {
        return bad(key, doc.keyPositionOf(pointerAppend(pointer, key)), "a key");
      }
      if (auto d = firstNonUtf8(doc, value, pointerAppend(pointer, key))) {
        return d;
      }
    }
  } else if (node.is_array()) {
    for (size_t i = 0; i < node.size(); ++i) {
      if (auto d = firstNonUtf8(doc, node[i], pointerAppend(pointer, i))) {
        return d;
      }
    }
  }
  return std::nullopt;
}

}  // namespace

Result<Document> parseDocument(std::string_view text, std::string_view format,
                               const std::string& file, const std::string& dir) {
  Document doc;
  doc.file = file;
  doc.dir = dir;
  Status st = format == "toml"   ? readToml(text, doc)
              : format == "yaml" ? readYaml(text, doc)
              : format == "json"
                  ? readJson(text, doc)
                  : Status(makeError(Errc::InvalidSpec,
                                     fmt::format("{}: unknown format '{}'", file, format)));
  if (!st) {
    return makeError(std::move(st).error());
  }
  if (auto d = firstNonUtf8(doc, doc.tree, "")) {
    return makeError(specError({*d}));
  }
  return doc;
}

Result<Document> readDocument(const std::string& path) {
  std::filesystem::path p(path);
  std::string ext = p.extension().string();
  std::string format;
  if (ext == ".toml") {
    format = "toml";
  } else if (ext == ".yaml" || ext == ".yml") {
    format = "yaml";
  } else if (ext == ".json") {
    format = "json";
  } else {
    return makeError(Errc::InvalidSpec,
                     fmt::format("{}: unsupported file extension '{}' (want .toml, .yaml, .yml "
                                 "or .json)",
                                 path, ext));
  }
  auto text = readFile(path);
  if (!text) {
    return makeError(std::move(text).error().withContext("reading spec"));
  }
  std::error_code ec;
  std::filesystem::path abs = std::filesystem::absolute(p, ec).lexically_normal();
  return parseDocument(*text, format, path, abs.parent_path().string());
}

}  // namespace matchlock::spec
