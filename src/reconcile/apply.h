// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/result.h"
#include "reconcile/plan.h"

namespace matchlock::reconcile {

/// The layer that turns actions into real sandboxes (runtime::SandboxDriver for VMs; tests use a
/// fake). Called from several threads at once, one sandbox per call.
class Driver {
 public:
  virtual ~Driver() = default;
  /// Performs `action`. `desired` is null only for Remove. For Create/Recreate/Start it returns
  /// once the sandbox is launched (its supervisor recorded); waitReady() waits for the guest.
  [[nodiscard]] virtual Status apply(const Action& action, const Desired* desired) = 0;
  /// Bounded wait until the sandbox's guest is ready; Unavailable with the reason otherwise.
  [[nodiscard]] virtual Status waitReady(const std::string& sandbox) = 0;
};

struct ApplyOptions {
  /// Sandboxes applied at once (independent ones only: dependents wait for their dependencies).
  size_t parallelism = 4;
  /// Wait until every started sandbox is ready (`up --wait`). Dependencies are always waited for
  /// before their dependents start.
  bool wait = false;
};

struct Outcome {
  std::string sandbox;
  ActionKind kind = ActionKind::Noop;
  Status status;
  bool skipped = false;  ///< not attempted (a dependency failed)
  bool ready = false;    ///< waited for and ready (else launched and still booting, or no VM)
  std::chrono::milliseconds elapsed{0};
};

/// Called once per action as it finishes (serialized, in completion order).
using ProgressFn = std::function<void(const Outcome&)>;

/// Applies `plan`: every action runs once its dependencies (depends_on, within the plan) have
/// succeeded and are ready; independent actions run in parallel, at most `parallelism` at a time.
/// A failure is reported for its sandbox and its dependents (skipped); the others go on and
/// nothing is rolled back. Returns one outcome per action, in plan order.
std::vector<Outcome> apply(const Plan& plan, const std::map<std::string, Desired>& desired,
                           Driver& driver, const ApplyOptions& options,
                           const ProgressFn& progress = {});

}  // namespace matchlock::reconcile
