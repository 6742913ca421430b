// SPDX-License-Identifier: Apache-2.0
// A spec file as a user (or a git remote) hands it over: the TOML, YAML or JSON reader (the
// first byte picks one), interpolation, the decoder and the JSON Schema check, the same chain
// `matchlock validate` runs. A file that passes must normalize to a fixed point: its normalized
// JSON (what the state store keeps) decodes to the same spec, and its YAML rendering reads back
// to the same tree.
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "fuzz_check.h"
#include "spec/decode.h"
#include "spec/document.h"
#include "spec/interpolate.h"
#include "spec/normalize.h"
#include "spec/schema.h"

namespace spec = matchlock::spec;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Cursor in(fuzz::asView(data, size));
  static constexpr const char* kFormats[] = {"toml", "yaml", "json"};
  const char* format = kFormats[in.byte() % 3];
  auto doc = spec::parseDocument(in.rest(), format, "fuzz.spec", "/nonexistent");
  if (!doc) {
    FUZZ_CHECK(!doc.error().message().empty());
    return 0;
  }
  std::vector<spec::Diagnostic> diags;
  spec::EnvLookup env = [](std::string_view name) -> std::optional<std::string> {
    if (name == "HOME") {
      return "/home/fuzz";
    }
    if (name == "N") {
      return "2";
    }
    return std::nullopt;
  };
  spec::interpolateDocument(*doc, env, diags);
  spec::DecodedFile decoded = spec::decodeDocument(*doc, diags, spec::Origin::File);
  for (const auto& d : diags) {
    (void)d.toString();
  }
  if (!diags.empty()) {
    return 0;
  }
  spec::validateAgainstSchema(*doc, diags);
  if (!diags.empty()) {
    return 0;
  }
  spec::Project project;
  project.name = decoded.project_name.value_or("fuzz");
  for (auto& [name, s] : decoded.sandboxes) {
    auto stored = spec::decodeNormalized(nlohmann::json::parse(spec::toJson(s).dump()), name);
    if (!stored) {
      std::fprintf(stderr, "%s\n", stored.error().message().c_str());
    }
    FUZZ_CHECK(stored.has_value());
    spec::SandboxSpec expected = s;
    expected.source_file.clear();
    FUZZ_CHECK(*stored == expected);
    project.sandboxes.emplace(name, s);
  }
  nlohmann::ordered_json normal = spec::toJson(project);
  auto ydoc = spec::parseDocument(spec::toYaml(normal), "yaml", "normalized.yaml", "/nonexistent");
  FUZZ_CHECK(ydoc.has_value());
  FUZZ_CHECK(ydoc->tree == nlohmann::json::parse(normal.dump()));
  return 0;
}
