// SPDX-License-Identifier: Apache-2.0
// The golden corpus (tests/data/spec/{valid,invalid}) and examples/sandboxes/ through the loader:
// every valid file loads and normalizes to a fixed point; every invalid file fails with the
// position and path written in its .expected file.
#include <filesystem>
#include <fstream>
#include <sstream>

#include <catch2/catch.hpp>

#include "common/fd.h"
#include "spec/decode.h"
#include "spec/document.h"
#include "spec/load.h"
#include "spec/normalize.h"

namespace fs = std::filesystem;
using namespace matchlock::spec;  // NOLINT(google-build-using-namespace)

namespace {

const fs::path kData = fs::path(ML_SOURCE_DIR) / "tests/data/spec";

bool isSpec(const fs::path& p) {
  std::string ext = p.extension().string();
  return ext == ".toml" || ext == ".yaml" || ext == ".yml" || ext == ".json";
}

std::vector<fs::path> specFiles(const fs::path& dir, bool recursive) {
  std::vector<fs::path> out;
  if (recursive) {
    for (const auto& e : fs::recursive_directory_iterator(dir)) {
      if (e.is_regular_file() && isSpec(e.path())) {
        out.push_back(e.path());
      }
    }
  } else {
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.is_regular_file() && isSpec(e.path())) {
        out.push_back(e.path());
      }
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string allDetails(const matchlock::Error& e) {
  std::string out = e.message() + "\n";
  for (const auto& d : e.details()) {
    out += d + "\n";
  }
  return out;
}

// Loads one file, normalizes it, decodes the normalized JSON again and requires equality.
void checkValidAndFixedPoint(const fs::path& file) {
  auto projects = loadProjects(LoadOptions{{file.string()}, "", true});
  INFO(file.string() << "\n" << (projects ? "" : allDetails(projects.error())));
  REQUIRE(projects.has_value());
  REQUIRE(projects->size() == 1);
  const Project& p = projects->front();
  REQUIRE_FALSE(p.sandboxes.empty());
  nlohmann::ordered_json normal = toJson(p);
  auto doc = parseDocument(normal.dump(2), "json", "normalized.json", "/nonexistent");
  REQUIRE(doc.has_value());
  std::vector<Diagnostic> diags;
  DecodedFile again = decodeDocument(*doc, diags, Origin::File);
  INFO(normal.dump(2) << (diags.empty() ? "" : diags.front().toString()));
  REQUIRE(diags.empty());
  Project p2;
  p2.name = *again.project_name;
  for (auto& [name, s] : again.sandboxes) {
    p2.sandboxes[name] = s;
  }
  CHECK(toJson(p2).dump() == normal.dump());
  // What the state store keeps per sandbox decodes back to the same spec (the reconciler's
  // "applied" side of every diff).
  for (const auto& [name, s] : p.sandboxes) {
    auto stored = decodeNormalized(nlohmann::json::parse(toJson(s).dump()), name);
    INFO(name << (stored ? "" : stored.error().message()));
    REQUIRE(stored.has_value());
    SandboxSpec expected = s;
    expected.source_file.clear();
    CHECK(*stored == expected);
  }
  // The YAML rendering reads back to the same tree.
  auto ydoc = parseDocument(toYaml(normal), "yaml", "normalized.yaml", "/nonexistent");
  INFO(toYaml(normal));
  REQUIRE(ydoc.has_value());
  CHECK(ydoc->tree == nlohmann::json::parse(normal.dump()));
}

}  // namespace

TEST_CASE("golden corpus: valid files load and normalize to a fixed point") {
  auto files = specFiles(kData / "valid", true);
  REQUIRE(files.size() >= 10);
  for (const fs::path& f : files) {
    SECTION(f.filename().string()) {
      checkValidAndFixedPoint(f);
    }
  }
}

TEST_CASE("examples/sandboxes load and normalize to a fixed point") {
  auto files = specFiles(fs::path(ML_SOURCE_DIR) / "examples/sandboxes", false);
  REQUIRE(files.size() >= 2);
  for (const fs::path& f : files) {
    SECTION(f.filename().string()) {
      checkValidAndFixedPoint(f);
    }
  }
}

TEST_CASE("golden corpus: full.toml, full.yaml and full.json are the same spec") {
  std::vector<std::string> normalized;
  for (const char* name : {"full.toml", "full.yaml", "full.json"}) {
    auto p = loadProject(LoadOptions{{(kData / "valid" / name).string()}, "", true});
    INFO(name << (p ? "" : allDetails(p.error())));
    REQUIRE(p.has_value());
    for (auto& [n, s] : p->sandboxes) {
      s.source_file.clear();
    }
    p->files.clear();
    normalized.push_back(toJson(*p).dump(2));
  }
  CHECK(normalized[0] == normalized[1]);
  CHECK(normalized[0] == normalized[2]);
}

TEST_CASE("golden corpus: invalid files fail at the expected place") {
  auto files = specFiles(kData / "invalid", false);
  REQUIRE(files.size() >= 20);
  for (const fs::path& f : files) {
    SECTION(f.filename().string()) {
      auto expected_text = matchlock::readFile(f.string() + ".expected");
      INFO(f.string());
      REQUIRE(expected_text.has_value());
      std::istringstream lines(*expected_text);
      std::string want;
      std::getline(lines, want);
      auto p = loadProjects(LoadOptions{{f.string()}, "", true});
      REQUIRE_FALSE(p.has_value());
      CHECK(p.error().code() == matchlock::Errc::InvalidSpec);
      std::string got = allDetails(p.error());
      INFO("expected: " << f.string() << ":" << want << "\ngot:\n" << got);
      CHECK(got.find(f.string() + ":" + want) != std::string::npos);
    }
  }
}
