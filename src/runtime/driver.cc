// SPDX-License-Identifier: Apache-2.0
#include "runtime/driver.h"

#include <fmt/format.h>

#include <chrono>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/fault.h"
#include "common/log.h"
#include "image/store.h"
#include "spec/decode.h"
#include "sys/process_ref.h"

namespace matchlock::runtime {
namespace {

reconcile::Observed::Health toPlannerHealth(Health h) {
  using P = reconcile::Observed::Health;
  switch (h) {
    case Health::Running:
    case Health::Starting:
      return P::Running;
    case Health::Stopped:
      return P::Stopped;
    case Health::Crashed:
      return P::Crashed;
    case Health::VmmDied:
      return P::VmmDied;
    case Health::Leaked:
      return P::Leaked;
    case Health::Failed:
      return P::Failed;
    case Health::Pending:
      return P::Pending;
    case Health::Unhealthy:
      return P::Unhealthy;
  }
  return P::Pending;
}

}  // namespace

Result<std::map<std::string, reconcile::Observed>> observeProject(
    state::Store& store, const std::string& project, std::vector<state::SandboxRecord>* records) {
  ML_ASSIGN_OR_RETURN(std::string root, runRoot());
  ML_ASSIGN_OR_RETURN(auto rows, store.listSandboxes(project));
  std::map<std::string, reconcile::Observed> out;
  for (const auto& r : rows) {
    reconcile::Observed o;
    Observation obs = observe(store, r, root);
    o.health = toPlannerHealth(obs.health);
    o.detail = obs.detail;
    o.secrets_hash = r.secrets_hash.value_or("");
    o.image_digest = r.image_digest.value_or("");
    o.healthcheck = r.health.value_or("");
    auto json = nlohmann::json::parse(r.spec_json, nullptr, false);
    auto applied = spec::decodeNormalized(json, r.name);
    if (applied) {
      o.applied = std::move(*applied);
    } else if (o.health == reconcile::Observed::Health::Running ||
               o.health == reconcile::Observed::Health::Stopped) {
      // A record we cannot read back is repaired rather than trusted.
      o.health = reconcile::Observed::Health::Pending;
      o.detail = "the applied spec on record is unreadable: " + applied.error().message();
    }
    out[r.name] = std::move(o);
  }
  if (records != nullptr) {
    *records = std::move(rows);
  }
  return out;
}

std::map<std::string, std::string> localImageDigests(const std::set<std::string>& images) {
  std::map<std::string, std::string> out;
  auto root = image::Store::defaultRoot();
  auto store = root ? image::Store::open(*root) : makeError(root.error());
  if (!store) {
    return out;
  }
  for (const std::string& image : images) {
    if (auto record = store->resolveImage(image); record) {
      out[image] = record->manifest_digest;
    }
  }
  return out;
}

Result<BootAssets> SandboxDriver::assets() {
  std::lock_guard lock(assets_mu_);
  if (!assets_) {
    assets_ = resolveBootAssets(options_.accel);
  }
  return *assets_;
}

Status SandboxDriver::apply(const reconcile::Action& action, const reconcile::Desired* desired) {
  switch (action.kind) {
    case reconcile::ActionKind::Noop:
      return ok();
    case reconcile::ActionKind::Remove:
      return removeOrphan(action.sandbox);
    case reconcile::ActionKind::UpdateLive:
      if (desired == nullptr) {
        return makeError(Errc::Internal, fmt::format("{}: no desired spec", action.sandbox));
      }
      return update(action, *desired);
    case reconcile::ActionKind::Create:
    case reconcile::ActionKind::Recreate:
    case reconcile::ActionKind::Start:
      if (desired == nullptr) {
        return makeError(Errc::Internal, fmt::format("{}: no desired spec", action.sandbox));
      }
      return start(action, *desired);
  }
  return ok();
}

Status SandboxDriver::start(const reconcile::Action& action, const reconcile::Desired& desired) {
  const spec::SandboxSpec& spec = desired.spec;
  // Everything that can fail without side effects first: the image (pulled if missing), the
  // kernel, the initramfs and the accelerator.
  ML_ASSIGN_OR_RETURN(std::string image_root, image::Store::defaultRoot());
  ML_ASSIGN_OR_RETURN(auto image_store, image::Store::open(image_root));
  auto prepared = image::prepareImage(image_store, spec.image, {});
  if (!prepared) {
    return makeError(std::move(prepared).error().withContext(fmt::format("image {}", spec.image)));
  }
  ML_ASSIGN_OR_RETURN(BootAssets boot, assets());

  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(std::string root, runRoot());
  ML_ASSIGN_OR_RETURN(auto existing, store.findSandbox(options_.project, action.sandbox));
  if (existing) {
    // Recreate and start reuse the record (same id, next generation). A running guest gets a
    // clean power-off first, so its overlay data is synced to the kept data disk.
    if (action.kind == reconcile::ActionKind::Recreate) {
      stop(store, *existing, root);
    }
    ML_RETURN_IF_ERROR(teardown(store, *existing, root));
    faultPoint("apply:torn-down");
  }

  LaunchOptions lo;
  lo.project = options_.project;
  ML_ASSIGN_OR_RETURN(std::string data, dataDirOf(options_.project, spec.name));
  lo.data_disk = data + "/upper.ext4";
  lo.boot_timeout = options_.boot_timeout;
  if (!desired.secrets_hash.empty()) {
    lo.secrets_hash = desired.secrets_hash;
  }
  lo.secret_values = desired.secret_values.get();
  lo.image_digest = prepared->record.manifest_digest;
  std::optional<std::string> id;
  if (existing) {
    id = existing->id;
  }
  ML_ASSIGN_OR_RETURN(std::string launched, launch(store, spec, *prepared, boot, lo, id));
  ML_LOG(runtime, info, "{}/{}: supervisor started for {}", options_.project, spec.name, launched);
  return ok();
}

Status SandboxDriver::update(const reconcile::Action& action, const reconcile::Desired& desired) {
  if (!desired.blocked.empty()) {
    return makeError(Errc::Unavailable, fmt::format("{}: {}", action.sandbox, desired.blocked));
  }
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto existing, store.findSandbox(options_.project, action.sandbox));
  if (!existing) {
    return makeError(Errc::NotFound, fmt::format("sandbox {} has no record", action.sandbox));
  }
  // The values `up` read for the hash (a secret without one fails in updateLive, naming it):
  // never read a second time, so a value that changed meanwhile cannot disagree with the hash.
  static const std::map<std::string, std::string> kNone;
  const auto& values = desired.secret_values ? *desired.secret_values : kNone;
  std::optional<std::string> hash;
  if (!desired.secrets_hash.empty()) {
    hash = desired.secrets_hash;
  }
  return updateLive(store, *existing, desired.spec, action.live_groups, values, hash);
}

Status SandboxDriver::removeOrphan(const std::string& name) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(std::string root, runRoot());
  ML_ASSIGN_OR_RETURN(auto existing, store.findSandbox(options_.project, name));
  if (!existing) {
    return ok();
  }
  stop(store, *existing, root);
  return remove(store, *existing, root, false);
}

Status SandboxDriver::waitReady(const std::string& sandbox) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto existing, store.findSandbox(options_.project, sandbox));
  if (!existing) {
    return makeError(Errc::NotFound, fmt::format("sandbox {} has no record", sandbox));
  }
  ML_RETURN_IF_ERROR(
      runtime::waitReady(store, existing->id, options_.boot_timeout + std::chrono::seconds(5)));
  auto applied = spec::decodeNormalized(nlohmann::json::parse(existing->spec_json, nullptr, false),
                                        existing->name);
  if (!applied || !applied->healthcheck) {
    return ok();
  }
  // With a healthcheck, ready means healthy (compose's `up --wait`), bounded by the time the
  // check needs to decide: its start period plus retries+1 full probes, and some slack.
  const auto& h = *applied->healthcheck;
  const auto bound = std::chrono::milliseconds(h.start_period_ms) +
                     (h.retries + 1) * std::chrono::milliseconds(h.interval_ms + h.timeout_ms) +
                     std::chrono::seconds(10);
  const auto deadline = std::chrono::steady_clock::now() + bound;
  for (;;) {
    ML_ASSIGN_OR_RETURN(auto now, store.getSandbox(existing->id));
    const std::string state = now.health.value_or("");
    if (state == "healthy" || state.empty()) {
      return ok();
    }
    if (state == "unhealthy") {
      return makeError(Errc::Unavailable,
                       fmt::format("{} is unhealthy: {}", sandbox,
                                   now.health_detail.value_or("healthcheck failed")));
    }
    if (now.status != state::SandboxStatus::Running ||
        (now.supervisor && !sys::isAlive(*now.supervisor))) {
      return makeError(Errc::Unavailable,
                       fmt::format("{} stopped before its healthcheck passed", sandbox));
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return makeError(
          Errc::Unavailable,
          fmt::format("{} did not become healthy within {} s", sandbox,
                      std::chrono::duration_cast<std::chrono::seconds>(bound).count()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace matchlock::runtime
