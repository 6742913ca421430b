// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"

namespace matchlock::spec {

/// 1-based line and column; 0 means unknown.
struct SourcePos {
  int line = 0;
  int col = 0;
};

/// A spec file read into the neutral tree shared by TOML, YAML and JSON, plus a source map from
/// JSON pointer ("/sandboxes/coder/cpus") to positions.
struct Document {
  std::string file;  ///< path as given by the user (used in messages)
  std::string dir;   ///< absolute directory of the file (relative paths resolve against it)
  nlohmann::json tree;
  std::map<std::string, SourcePos, std::less<>> value_pos;  ///< where each value starts
  std::map<std::string, SourcePos, std::less<>> key_pos;    ///< where each object key starts
  /// Pointers of strings that came (wholly or partly) from interpolation.
  std::set<std::string, std::less<>> interpolated;
  /// Pointers of strings whose interpolation failed (already reported; the decoder skips them).
  std::set<std::string, std::less<>> interpolation_failed;

  /// Position of the value at `pointer`, else its key, else the nearest ancestor's.
  SourcePos positionOf(std::string_view pointer) const;
  /// Position of the key at `pointer` if known, else positionOf().
  SourcePos keyPositionOf(std::string_view pointer) const;
};

/// One problem found in a spec: `file:line:col: path: message`.
struct Diagnostic {
  std::string file;
  SourcePos pos;
  std::string path;  ///< dotted JSON path ("sandboxes.coder.mounts[1].mode"), "<root>" at the top
  std::string message;

  std::string toString() const;
};

/// JSON pointer helpers. Tokens are escaped as RFC 6901 (~0, ~1).
std::string pointerAppend(std::string_view pointer, std::string_view token);
std::string pointerAppend(std::string_view pointer, size_t index);
std::vector<std::string> pointerTokens(std::string_view pointer);

/// Renders a pointer as a dotted path, using the tree to tell array indexes from keys.
std::string dottedPath(const nlohmann::json& tree, std::string_view pointer);

/// Builds an InvalidSpec error carrying every diagnostic as a detail line. The message is the
/// first diagnostic (plus a count when there are more).
Error specError(const std::vector<Diagnostic>& diags);

/// Reads `path` (by extension: .toml, .yaml/.yml, .json) into a Document.
Result<Document> readDocument(const std::string& path);

/// Parses text already in memory; `format` is "toml", "yaml" or "json".
Result<Document> parseDocument(std::string_view text, std::string_view format,
                               const std::string& file, const std::string& dir);

}  // namespace matchlock::spec
