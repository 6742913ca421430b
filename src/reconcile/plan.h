// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "spec/model.h"

namespace matchlock::reconcile {

/// What `up` does to one sandbox.
enum class ActionKind {
  Create,      ///< `+ create`: not there yet
  Recreate,    ///< `-/+ recreate`: a recreate-class field changed, or the sandbox must be repaired
  UpdateLive,  ///< `~ update`: only live-class fields changed and their layers can apply them
  Start,       ///< `> start`: stopped and unchanged
  Noop,        ///< nothing to do
  Remove,      ///< `- remove`: an orphan, with --remove-orphans
};
std::string_view toString(ActionKind kind);

struct Action {
  ActionKind kind = ActionKind::Noop;
  std::string sandbox;
  /// Why, one line each ("memory 512 MiB → 1024 MiB", "supervisor died"). Never secret values or
  /// env values: only names.
  std::vector<std::string> reasons;
  /// For UpdateLive: the field groups to apply live ("egress", "secrets", "ports").
  std::vector<std::string> live_groups;
};

struct Plan {
  std::string project;
  std::vector<Action> actions;       ///< dependencies before dependents; removals last
  std::vector<std::string> orphans;  ///< sandboxes of the project that no spec declares
  bool hasChanges() const;
};

/// The sandbox as the spec wants it.
struct Desired {
  spec::SandboxSpec spec;
  /// Keyed hash of the current secret values (rotation detection); empty when there are no
  /// secrets or values are not resolved (dry runs may skip reading them).
  std::string secrets_hash;
  /// Manifest digest the image reference resolves to in the local store (empty: not pulled yet,
  /// or unknown). A change against Observed::image_digest recreates with "image digest changed".
  std::string image_digest;
  /// The secret values read for the hash, kept so that a launch or a live update uses the very
  /// values that were hashed (and secret commands run once). In memory only: never logged.
  std::shared_ptr<const std::map<std::string, std::string>> secret_values;
  /// Set when the sandbox cannot be (re)started as declared (e.g. a secret's source is missing).
  /// The planner plans as usual; apply() fails such an action, if it has to start anything, with
  /// this message and leaves the other sandboxes alone.
  std::string blocked;
};

/// What the state store and live probes say about a sandbox.
struct Observed {
  enum class Health {
    Running,    ///< supervisor and VMM alive
    Stopped,    ///< cleanly stopped
    Crashed,    ///< the supervisor (recorded pid + start time) is gone
    VmmDied,    ///< the supervisor is alive but its VMM is not
    Leaked,     ///< the record is fine but owned resources (TAP, disk, ...) vanished
    Failed,     ///< the last apply failed
    Pending,    ///< an apply was interrupted (intent recorded, never completed)
    Unhealthy,  ///< running, but its healthcheck failed `retries` times in a row
  };
  Health health = Health::Running;
  /// The spec last applied (decoded from the state store's normalized JSON).
  spec::SandboxSpec applied;
  std::string secrets_hash;
  std::string image_digest;  ///< digest last booted (empty: unknown)
  /// The healthcheck's last state ("starting", "healthy", "unhealthy"; empty: no healthcheck).
  std::string healthcheck;
  /// Why the health is what it is, when it is not Running or Stopped (shown as the reason).
  std::string detail;
};

struct PlanOptions {
  bool remove_orphans = false;
  bool force_recreate = false;
  bool no_recreate = false;
  /// `up SANDBOX...`: only these and what they depend on; empty means all.
  std::set<std::string> only;
  /// Field groups whose layer can update a running sandbox. A live-class change outside this set
  /// becomes a recreate (with a reason saying so), never silently ignored.
  std::set<std::string> live_supported;
};

/// Pure: same inputs, same plan. No I/O, no clock.
Plan plan(const std::string& project, const std::map<std::string, Desired>& desired,
          const std::map<std::string, Observed>& observed, const PlanOptions& options);

/// Field-level differences between two specs, grouped by spec::fieldGroups() name. Each entry is
/// a human line without values of env or secrets.
std::map<std::string, std::vector<std::string>> diffSpecs(const spec::SandboxSpec& before,
                                                          const spec::SandboxSpec& after);

/// `terraform plan`-like text: one line per action (`+ create web`), reasons indented below,
/// and a summary line.
std::string renderPlan(const Plan& plan);
nlohmann::ordered_json planToJson(const Plan& plan);

}  // namespace matchlock::reconcile
