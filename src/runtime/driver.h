// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include "reconcile/apply.h"
#include "runtime/sandbox.h"
#include "state/store.h"

namespace matchlock::runtime {

/// The state store's and the live system's view of a project's sandboxes, for the planner.
/// Read-only: never writes the state DB (dry runs rely on it). `records` receives the rows.
[[nodiscard]] Result<std::map<std::string, reconcile::Observed>> observeProject(
    state::Store& store, const std::string& project,
    std::vector<state::SandboxRecord>* records = nullptr);

/// The manifest digest each image reference resolves to in the local image store, without
/// pulling (one store open for all); absent when it is not there (a pull would fetch it).
std::map<std::string, std::string> localImageDigests(const std::set<std::string>& images);

struct DriverOptions {
  std::string project;
  std::string accel = "auto";
  std::chrono::seconds boot_timeout{120};
};

/// Applies actions to real sandboxes: images are pulled when missing, sandboxes boot under
/// detached supervisors with their overlay data in the project's data dir. Thread-safe: every call
/// opens its own state store connection.
class SandboxDriver final : public reconcile::Driver {
 public:
  explicit SandboxDriver(DriverOptions options) : options_(std::move(options)) {}
  /// The live-class field groups this driver applies to a running sandbox (PlanOptions::
  /// live_supported): egress and secrets by its network layer, ports by its ports layer, the
  /// healthcheck by its health layer.
  static std::set<std::string> liveGroups() {
    return {"egress", "secrets", "ports", "healthcheck"};
  }
  [[nodiscard]] Status apply(const reconcile::Action& action,
                             const reconcile::Desired* desired) override;
  [[nodiscard]] Status waitReady(const std::string& sandbox) override;

 private:
  Result<BootAssets> assets();
  Status start(const reconcile::Action& action, const reconcile::Desired& desired);
  Status update(const reconcile::Action& action, const reconcile::Desired& desired);
  Status removeOrphan(const std::string& name);

  DriverOptions options_;
  std::mutex assets_mu_;
  std::optional<Result<BootAssets>> assets_;
};

}  // namespace matchlock::runtime
