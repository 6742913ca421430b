// SPDX-License-Identifier: Apache-2.0
#include <fmt/format.h>

#include <cmath>
#include <regex>
#include <sstream>
#include <string>

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include "spec/readers.h"

namespace matchlock::spec {
namespace {

constexpr std::string_view kTagPrefix = "tag:yaml.org,2002:";
constexpr int kMaxMergeDepth = 16;

SourcePos posOf(const YAML::Mark& mark) {
  if (mark.is_null()) {
    return {};
  }
  return SourcePos{mark.line + 1, mark.column + 1};
}

struct YamlError {
  YAML::Mark mark;
  std::string message;
};

/// Resolves a plain (unquoted) scalar with the YAML 1.2 core schema. Unlike YAML 1.1, "yes",
/// "no", "on" and "off" stay strings.
nlohmann::json resolvePlain(const std::string& s) {
  static const std::regex kInt(R"([-+]?[0-9]+)");
  static const std::regex kHex(R"(0x[0-9a-fA-F]+)");
  static const std::regex kOct(R"(0o[0-7]+)");
  static const std::regex kFloat(R"([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)");
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") {
    return nullptr;
  }
  if (s == "true" || s == "True" || s == "TRUE") {
    return true;
  }
  if (s == "false" || s == "False" || s == "FALSE") {
    return false;
  }
  try {
    if (std::regex_match(s, kInt)) {
      return std::stoll(s);
    }
    if (std::regex_match(s, kHex)) {
      return std::stoll(s.substr(2), nullptr, 16);
    }
    if (std::regex_match(s, kOct)) {
      return std::stoll(s.substr(2), nullptr, 8);
    }
    if (std::regex_match(s, kFloat)) {
      return std::stod(s);
    }
  } catch (const std::out_of_range&) {
    return s;  // too large for a number: leave it to the decoder to reject as a string
  }
  return s;
}

class Converter {
 public:
  explicit Converter(Document& doc) : doc_(doc) {}

  tl::expected<nlohmann::json, YamlError> convert(const YAML::Node& node, const std::string& ptr,
                                                  int depth = 0) {
    if (SourcePos pos = posOf(node.Mark()); pos.line > 0) {
      doc_.value_pos[ptr] = pos;
    }
    switch (node.Type()) {
      case YAML::NodeType::Undefined:
      case YAML::NodeType::Null:
        return nullptr;
      case YAML::NodeType::Scalar:
        return scalar(node);
      case YAML::NodeType::Sequence: {
        nlohmann::json arr = nlohmann::json::array();
        size_t i = 0;
        for (const YAML::Node& child : node) {
          auto v = convert(child, pointerAppend(ptr, i), depth);
          if (!v) {
            return v;
          }
          arr.push_back(std::move(*v));
          ++i;
        }
        return arr;
      }
      case YAML::NodeType::Map:
        return map(node, ptr, depth);
    }
    return nullptr;
  }

 private:
  tl::expected<nlohmann::json, YamlError> scalar(const YAML::Node& node) {
    const std::string& tag = node.Tag();
    const std::string& value = node.Scalar();
    if (tag == "!") {  // quoted or block scalar: always a string
      return value;
    }
    if (tag == "?" || tag.empty()) {
      return resolvePlain(value);
    }
    if (tag.rfind(kTagPrefix, 0) == 0) {
      std::string_view kind = std::string_view(tag).substr(kTagPrefix.size());
      nlohmann::json plain = resolvePlain(value);
      if (kind == "str") {
        return value;
      }
      if ((kind == "int" && plain.is_number_integer()) || (kind == "float" && plain.is_number()) ||
          (kind == "bool" && plain.is_boolean()) || (kind == "null" && plain.is_null())) {
        return plain;
      }
      return tl::unexpected(YamlError{
          node.Mark(), fmt::format("value '{}' does not match its tag !!{}", value, kind)});
    }
    return tl::unexpected(YamlError{node.Mark(), fmt::format("unsupported YAML tag '{}'", tag)});
  }

  // Merge keys (`<<: *defaults`, compose's habit) are applied here: yaml-cpp leaves them as plain
  // keys. Keys written in the mapping itself win over merged ones; earlier merge sources win over
  // later ones, as the YAML merge-key spec says.
  tl::expected<nlohmann::json, YamlError> map(const YAML::Node& node, const std::string& ptr,
                                              int depth) {
    if (depth > kMaxMergeDepth) {
      return tl::unexpected(YamlError{node.Mark(), "merge keys nested too deeply"});
    }
    nlohmann::json obj = nlohmann::json::object();
    std::vector<YAML::Node> merges;
    for (const auto& kv : node) {
      const YAML::Node& key = kv.first;
      if (!key.IsScalar()) {
        return tl::unexpected(YamlError{key.Mark(), "mapping keys must be scalars"});
      }
      const std::string& name = key.Scalar();
      if (name == "<<" && key.Tag() != "!") {
        if (kv.second.IsMap()) {
          merges.push_back(kv.second);
        } else if (kv.second.IsSequence()) {
          for (const YAML::Node& m : kv.second) {
            if (!m.IsMap()) {
              return tl::unexpected(YamlError{m.Mark(), "merge key '<<' needs mappings"});
            }
            merges.push_back(m);
          }
        } else {
          return tl::unexpected(YamlError{kv.second.Mark(), "merge key '<<' needs a mapping"});
        }
        continue;
      }
      if (obj.contains(name)) {
        return tl::unexpected(YamlError{key.Mark(), fmt::format("duplicate key '{}'", name)});
      }
      std::string child_ptr = pointerAppend(ptr, name);
      doc_.key_pos[child_ptr] = posOf(key.Mark());
      auto v = convert(kv.second, child_ptr, depth);
      if (!v) {
        return v;
      }
      obj[name] = std::move(*v);
    }
    for (const YAML::Node& m : merges) {
      for (const auto& kv : m) {
        if (!kv.first.IsScalar()) {
          return tl::unexpected(YamlError{kv.first.Mark(), "mapping keys must be scalars"});
        }
        const std::string& name = kv.first.Scalar();
        if (obj.contains(name) || name == "<<") {
          continue;
        }
        std::string child_ptr = pointerAppend(ptr, name);
        doc_.key_pos[child_ptr] = posOf(kv.first.Mark());
        auto v = convert(kv.second, child_ptr, depth + 1);
        if (!v) {
          return v;
        }
        obj[name] = std::move(*v);
      }
    }
    return obj;
  }

  Document& doc_;
};

/// Sees where documents start without building them. yaml-cpp 0.7's LoadAll loops forever,
/// allocating, on some malformed input (",[" for one): the parser reports a document that
/// consumes nothing again and again. Counting stops at the second document, which is an error
/// for a spec anyway.
class DocumentStarts : public YAML::EventHandler {
 public:
  std::vector<YAML::Mark> marks;
  void OnDocumentStart(const YAML::Mark& mark) override { marks.push_back(mark); }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark& /*mark*/, YAML::anchor_t /*anchor*/) override {}
  void OnAlias(const YAML::Mark& /*mark*/, YAML::anchor_t /*anchor*/) override {}
  void OnScalar(const YAML::Mark& /*mark*/, const std::string& /*tag*/, YAML::anchor_t /*anchor*/,
                const std::string& /*value*/) override {}
  void OnSequenceStart(const YAML::Mark& /*mark*/, const std::string& /*tag*/,
                       YAML::anchor_t /*anchor*/, YAML::EmitterStyle::value /*style*/) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark& /*mark*/, const std::string& /*tag*/, YAML::anchor_t /*anchor*/,
                  YAML::EmitterStyle::value /*style*/) override {}
  void OnMapEnd() override {}
};

}  // namespace

Status readYaml(std::string_view text, Document& doc) {
  auto fail = [&](SourcePos pos, std::string message) -> Status {
    return makeError(specError({Diagnostic{doc.file, pos, "<root>", std::move(message)}}));
  };
  try {
    DocumentStarts starts;
    {
      std::istringstream in{std::string(text)};
      YAML::Parser parser(in);
      while (starts.marks.size() < 2 && parser.HandleNextDocument(starts)) {
      }
    }
    if (starts.marks.size() > 1) {
      if (starts.marks[1].pos <= starts.marks[0].pos) {
        return fail(posOf(starts.marks[0]), "YAML syntax error: no document can be read here");
      }
      return fail(posOf(starts.marks[1]),
                  "a spec file holds one YAML document; put several sandboxes under 'sandboxes:'");
    }
    if (starts.marks.empty()) {
      doc.tree = nullptr;
      return ok();
    }
    Converter conv(doc);
    auto tree = conv.convert(YAML::Load(std::string(text)), "");
    if (!tree) {
      return fail(posOf(tree.error().mark), "YAML error: " + tree.error().message);
    }
    doc.tree = std::move(*tree);
    doc.value_pos[""] = SourcePos{1, 1};
    return ok();
  } catch (const YAML::Exception& e) {
    return fail(posOf(e.mark), fmt::format("YAML syntax error: {}", e.msg));
  }
}

}  // namespace matchlock::spec
