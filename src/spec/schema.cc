// SPDX-License-Identifier: Apache-2.0
#include "spec/schema.h"

#include <fmt/format.h>

#include <memory>
#include <set>

#include <valijson/adapters/nlohmann_json_adapter.hpp>
#include <valijson/schema.hpp>
#include <valijson/schema_parser.hpp>
#include <valijson/validation_results.hpp>
#include <valijson/validator.hpp>

#include "ml_spec_schema_embedded.h"

namespace matchlock::spec {
namespace {

struct CompiledSchema {
  valijson::Schema schema;
};

const CompiledSchema& compiled() {
  static const CompiledSchema* c = [] {
    auto* out = new CompiledSchema();  // lives for the process; parsed once
    nlohmann::json doc = nlohmann::json::parse(sandboxSchemaText());
    valijson::SchemaParser parser(valijson::SchemaParser::kDraft7);
    valijson::adapters::NlohmannJsonAdapter adapter(doc);
    parser.populateSchema(adapter, out->schema);
    return out;
  }();
  return *c;
}

// valijson context entries look like "<root>", "[sandboxes]", "[0]".
std::string contextToPointer(const nlohmann::json& tree, const std::vector<std::string>& ctx) {
  std::string ptr;
  const nlohmann::json* node = &tree;
  for (const std::string& c : ctx) {
    if (c.size() < 2 || c.front() != '[' || c.back() != ']') {
      continue;
    }
    std::string tok = c.substr(1, c.size() - 2);
    if (node != nullptr && node->is_array()) {
      size_t idx = std::strtoul(tok.c_str(), nullptr, 10);
      ptr = pointerAppend(ptr, idx);
      node = idx < node->size() ? &(*node)[idx] : nullptr;
    } else {
      ptr = pointerAppend(ptr, tok);
      if (node != nullptr && node->is_object() && node->contains(tok)) {
        node = &(*node)[tok];
      } else {
        node = nullptr;
      }
    }
  }
  return ptr;
}

}  // namespace

std::string_view sandboxSchemaText() {
  for (const auto& f : ml_spec_schema::embeddedFiles()) {
    if (f.name == "sandbox.v1.schema.json") {
      return f.data;
    }
  }
  ML_CHECK(false, "sandbox schema not embedded");
  return {};
}

void validateAgainstSchema(const Document& doc, std::vector<Diagnostic>& diags) {
  valijson::Validator validator(valijson::Validator::kStrongTypes);
  valijson::ValidationResults results;
  valijson::adapters::NlohmannJsonAdapter target(doc.tree);
  if (validator.validate(compiled().schema, target, &results)) {
    return;
  }
  // Report the deepest failures only: the shallower ones (oneOf/allOf wrappers) repeat them.
  size_t deepest = 0;
  for (const auto& e : results) {
    deepest = std::max(deepest, e.context.size());
  }
  std::set<std::string> seen;
  for (const auto& e : results) {
    if (e.context.size() != deepest) {
      continue;
    }
    std::string ptr = contextToPointer(doc.tree, e.context);
    std::string msg = fmt::format("does not match the schema: {}", e.description);
    if (!seen.insert(ptr + msg).second) {
      continue;
    }
    diags.push_back(Diagnostic{doc.file, doc.positionOf(ptr), dottedPath(doc.tree, ptr), msg});
    if (seen.size() >= 3) {
      break;
    }
  }
}

}  // namespace matchlock::spec
