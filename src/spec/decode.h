// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.h"
#include "spec/document.h"
#include "spec/model.h"

namespace matchlock::spec {

/// Where a tree came from. Only Rpc accepts literal secret values and placeholders.
enum class Origin { File, Rpc };

/// What one spec file declares.
struct DecodedFile {
  std::optional<std::string> project_name;
  std::map<std::string, SandboxSpec> sandboxes;
  std::map<std::string, SourcePos> sandbox_pos;  ///< where each sandbox's key is
};

/// Decodes an (already interpolated) document into sandboxes, appending every problem found to
/// `diags` (the result is meaningful only when no diagnostic was added). Values that
/// interpolation produced are converted in `doc.tree` where a number or bool is expected, so the
/// tree can then be checked against the JSON Schema.
DecodedFile decodeDocument(Document& doc, std::vector<Diagnostic>& diags, Origin origin);

/// Cross-sandbox rules of a project (depends_on targets and cycles, unique published ports).
/// `where` maps sandbox name to (document, pointer) for positions.
struct SandboxLocation {
  const Document* doc = nullptr;
  std::string pointer;
};
void checkProject(const Project& project, const std::map<std::string, SandboxLocation>& where,
                  std::vector<Diagnostic>& diags);

/// Maps upstream matchlock's JSON-RPC `create` params (its `Config`: resources.memory_mb,
/// network.allowed_hosts, network.secrets with values, vfs.mounts, ...) onto the spec tree and
/// decodes it with the same decoder. `name` names the sandbox.
Result<SandboxSpec> decodeUpstreamConfig(const nlohmann::json& config, const std::string& name);

/// Decodes a sandbox's normalized JSON (spec::toJson, as the state store keeps it) back into a
/// SandboxSpec named `name`. toJson's output always decodes to the spec it came from (without
/// source_file); anything else is InvalidSpec.
Result<SandboxSpec> decodeNormalized(const nlohmann::json& spec_json, const std::string& name);

/// An absolute guest mount path: `^/[a-zA-Z0-9/_.-]+$`, no `..` component, not `/`.
bool isValidGuestMountPath(const std::string& path);
/// The target of the VFS mount in `mounts` that would shadow a block mount at `target` (one that
/// is a parent of it: the VFS mounts go on after the guest init mounted the disks), or "".
std::string shadowingVfsMount(const std::vector<Mount>& mounts, const std::string& target);

/// Parses sizes: an integer (MiB) or a string with a binary unit. Returns MiB.
Result<int64_t> parseSizeMib(const nlohmann::json& value);
/// Parses durations: an integer (seconds) or a Go-style string ("1m30s", "500ms"). Returns ms.
Result<int64_t> parseDurationMs(const nlohmann::json& value);
/// Formats milliseconds canonically ("1m30s", "500ms", "0s").
std::string formatDurationMs(int64_t ms);

}  // namespace matchlock::spec
