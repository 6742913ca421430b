// SPDX-License-Identifier: Apache-2.0
#include <fmt/format.h>

#include <sstream>
#include <string>

#include <toml++/toml.h>

#include "spec/readers.h"

namespace matchlock::spec {
namespace {

SourcePos posOf(const toml::source_region& src) {
  return SourcePos{static_cast<int>(src.begin.line), static_cast<int>(src.begin.column)};
}

nlohmann::json convert(const toml::node& node, const std::string& pointer, Document& doc) {
  doc.value_pos[pointer] = posOf(node.source());
  switch (node.type()) {
    case toml::node_type::table: {
      nlohmann::json obj = nlohmann::json::object();
      for (const auto& [key, child] : *node.as_table()) {
        std::string child_ptr = pointerAppend(pointer, key.str());
        doc.key_pos[child_ptr] = posOf(key.source());
        obj[std::string(key.str())] = convert(child, child_ptr, doc);
      }
      return obj;
    }
    case toml::node_type::array: {
      nlohmann::json arr = nlohmann::json::array();
      size_t i = 0;
      for (const toml::node& child : *node.as_array()) {
        arr.push_back(convert(child, pointerAppend(pointer, i), doc));
        ++i;
      }
      return arr;
    }
    case toml::node_type::string:
      return node.as_string()->get();
    case toml::node_type::integer:
      return node.as_integer()->get();
    case toml::node_type::floating_point:
      return node.as_floating_point()->get();
    case toml::node_type::boolean:
      return node.as_boolean()->get();
    case toml::node_type::date:
    case toml::node_type::time:
    case toml::node_type::date_time: {
      // Kept as their TOML text so that a field expecting a string can still reject them clearly.
      std::ostringstream text;
      node.visit([&](const auto& v) { text << v; });
      return text.str();
    }
    case toml::node_type::none:
      break;
  }
  return nullptr;
}

}  // namespace

Status readToml(std::string_view text, Document& doc) {
  try {
    toml::table table = toml::parse(text, doc.file);
    doc.tree = convert(table, "", doc);
    doc.value_pos[""] = SourcePos{1, 1};
    return ok();
  } catch (const toml::parse_error& e) {
    Diagnostic d{doc.file, posOf(e.source()), "<root>",
                 fmt::format("TOML syntax error: {}", e.description())};
    return makeError(specError({d}));
  }
}

}  // namespace matchlock::spec
