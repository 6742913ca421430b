// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "spec/model.h"

namespace matchlock::spec {

/// The normalized form of a sandbox: every default explicit, sizes in MiB, commands as lists,
/// secrets as references (never values). Valid input to the decoder again (except Inline secrets,
/// which only JSON-RPC creates).
nlohmann::ordered_json toJson(const SandboxSpec& s);

/// `{"version": 1, "name": ..., "sandboxes": {...}}`.
nlohmann::ordered_json toJson(const Project& p);

/// Renders JSON as block-style YAML (strings quoted when YAML would read them as something else).
std::string toYaml(const nlohmann::ordered_json& v);

/// Field groups of a sandbox and how a change to each is applied by the reconciler.
/// docs/spec.md lists them; reconcile/ reads this table rather than re-deriving it.
enum class ChangeClass { Recreate, Live, Ignored };
struct FieldGroup {
  const char* name;
  ChangeClass change;
};
/// image, resources, env, process, mounts, network_config, secret_names → recreate; egress,
/// secrets, ports, healthcheck → live; meta (labels, depends_on, restart) → ignored by the VM
/// (reconciler only). docs/reconcile.md's field table says the same per field, and
/// tests/unit/runtime/field_table_test.cc holds the planner to it.
const std::vector<FieldGroup>& fieldGroups();

/// SHA-256 of the canonical JSON of each field group. Secret values are not part of any hash
/// (only their references); rotation is detected separately from a keyed hash of the values.
std::map<std::string, std::string> groupHashes(const SandboxSpec& s);

/// SHA-256 of the whole normalized sandbox (without source_file).
std::string specHash(const SandboxSpec& s);

}  // namespace matchlock::spec
