// SPDX-License-Identifier: Apache-2.0
// Declarative sandboxes: up (and plan), down, ps and reconcile [--watch]. The planner is pure
// (reconcile/plan.h); runtime::SandboxDriver applies its actions to real VMs.
#include <fmt/format.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <thread>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/output.h"
#include "common/file_lock.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/strings.h"
#include "reconcile/apply.h"
#include "reconcile/plan.h"
#include "runtime/driver.h"
#include "runtime/sandbox.h"
#include "runtime/secrets.h"
#include "spec/decode.h"
#include "spec/load.h"
#include "state/store.h"

namespace matchlock::cli {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct UpOptions {
  std::vector<std::string> files;
  std::string project;
  std::vector<std::string> only;
  std::string output = "human";
  bool dry_run = false;
  bool remove_orphans = false;
  bool force_recreate = false;
  bool no_recreate = false;
  bool wait = false;
  bool detailed_exitcode = false;
  size_t parallel = 4;
  std::string accel = "auto";
  int boot_timeout = 120;
  int lock_timeout = 120;
  // reconcile only
  bool watch = false;
  std::string interval = "30s";
};

struct DownOptions {
  std::vector<std::string> files;
  std::string project;
  bool volumes = false;
  int lock_timeout = 120;
};

struct PsOptions {
  std::vector<std::string> files;
  std::string project;
  std::string output = "human";
};

/// Per-sandbox retry state of `reconcile --watch`.
struct Backoff {
  int failures = 0;
  Clock::time_point next_try{};
  std::string last_error;
  /// Backing off after repairing an unhealthy sandbox (not after a failed action): cleared once
  /// a pass sees it healthy.
  bool unhealthy = false;
};
using BackoffMap = std::map<std::string, Backoff>;

/// What one project's pass did.
struct PassResult {
  bool changes = false;  ///< the plan had changes (applied, or pending in a dry run)
  int failed = 0;
  nlohmann::ordered_json json;
};

std::atomic<bool> g_stop{false};

void onStopSignal(int /*sig*/) {
  g_stop.store(true);
}

std::vector<std::string> specPaths(const std::vector<std::string>& files) {
  return files.empty() ? std::vector<std::string>{"."} : files;
}

/// Holds a project's lock: `up`, `down` and `reconcile` of one project never interleave. A second
/// command waits (bounded, saying whom it waits for) and then fails clearly.
class ProjectLock {
 public:
  static Result<ProjectLock> acquire(const std::string& project, int timeout_s) {
    ML_ASSIGN_OR_RETURN(std::string home, matchlockHome());
    ML_RETURN_IF_ERROR(makeDirs(home + "/locks", 0700));
    const std::string path = fmt::format("{}/locks/{}.lock", home, project);
    ML_ASSIGN_OR_RETURN(auto lock, FileLock::tryAcquire(path, FileLock::Mode::Exclusive));
    if (!lock) {
      std::string holder(trim(readFile(path).value_or("")));
      fmt::print(stderr, "waiting for another matchlock command on project {}{} (up to {} s)\n",
                 project, holder.empty() ? "" : " (pid " + holder + ")", timeout_s);
      auto waited =
          FileLock::acquireWithin(path, FileLock::Mode::Exclusive, std::chrono::seconds(timeout_s));
      if (!waited) {
        return makeError(
            Errc::Conflict,
            fmt::format("project {} is locked by another matchlock command{}; "
                        "gave up after {} s (--lock-timeout)",
                        project, holder.empty() ? "" : " (pid " + holder + ")", timeout_s));
      }
      lock.emplace(std::move(*waited));
    }
    std::string pid = std::to_string(::getpid());
    if (::ftruncate(lock->fd(), 0) == 0) {
      (void)!::pwrite(lock->fd(), pid.data(), pid.size(), 0);
    }
    return ProjectLock(std::move(*lock));
  }

 private:
  explicit ProjectLock(FileLock lock) : lock_(std::move(lock)) {}
  FileLock lock_;
};

/// Opens the state store; for read-only uses (dry runs, ps) a missing DB is "no state" rather
/// than a reason to create one.
Result<std::optional<state::Store>> openStore(bool create) {
  ML_ASSIGN_OR_RETURN(std::string path, state::Store::defaultPath());
  if (!create && ::access(path.c_str(), F_OK) != 0) {
    return std::optional<state::Store>();
  }
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  return std::optional<state::Store>(std::move(store));
}

/// The desired state of each sandbox: its spec, the local image digest and the keyed hash of its
/// secret values. Secret values are read here only to hash them; they go nowhere else.
std::map<std::string, reconcile::Desired> desiredOf(const spec::Project& project, bool dry_run) {
  std::set<std::string> images;
  for (const auto& [name, sb] : project.sandboxes) {
    images.insert(sb.image);
  }
  auto digests = runtime::localImageDigests(images);
  std::map<std::string, reconcile::Desired> out;
  for (const auto& [name, sb] : project.sandboxes) {
    reconcile::Desired d;
    d.spec = sb;
    d.image_digest = digests[sb.image];
    bool has_command = std::ranges::any_of(
        sb.secrets, [](const auto& s) { return s.kind == spec::SecretRef::Kind::Command; });
    if (!(dry_run && has_command)) {  // a dry run runs nothing, secret commands included
      auto values = runtime::resolveSecretValues(sb);
      if (!values) {
        d.blocked = values.error().message();
      } else if (auto hash = runtime::secretsHash(*values, !dry_run); hash && *hash) {
        d.secrets_hash = **hash;
        d.secret_values =
            std::make_shared<const std::map<std::string, std::string>>(std::move(*values));
      } else if (!hash) {
        d.blocked = hash.error().message();
      }
    }
    out[name] = std::move(d);
  }
  return out;
}

std::string fmtSeconds(std::chrono::milliseconds ms) {
  return fmt::format("{:.1f}s", static_cast<double>(ms.count()) / 1000.0);
}

std::string_view pastTense(reconcile::ActionKind kind) {
  switch (kind) {
    case reconcile::ActionKind::Create:
      return "created";
    case reconcile::ActionKind::Recreate:
      return "recreated";
    case reconcile::ActionKind::UpdateLive:
      return "updated";
    case reconcile::ActionKind::Start:
      return "started";
    case reconcile::ActionKind::Remove:
      return "removed";
    case reconcile::ActionKind::Noop:
      return "up to date";
  }
  return "";
}

/// Records what an apply did in the event log (append-only; names and reasons, never values).
void recordEvents(const std::string& project, const reconcile::Plan& plan,
                  const std::vector<reconcile::Outcome>& outcomes) {
  auto store = state::Store::openDefault();
  if (!store) {
    return;
  }
  for (size_t i = 0; i < outcomes.size(); ++i) {
    const auto& o = outcomes[i];
    if (o.kind == reconcile::ActionKind::Noop && o.status) {
      continue;
    }
    state::Event e;
    e.project = project;
    if (auto rec = store->findSandbox(project, o.sandbox); rec && *rec) {
      e.sandbox_id = (*rec)->id;
    }
    e.kind = o.status ? fmt::format("reconcile.{}", reconcile::toString(o.kind))
                      : std::string("reconcile.failed");
    e.message = o.status ? fmt::format("{} {}", o.sandbox, pastTense(o.kind))
                         : fmt::format("{}: {}", o.sandbox, o.status.error().message());
    e.data_json = nlohmann::json({{"sandbox", o.sandbox},
                                  {"action", reconcile::toString(o.kind)},
                                  {"reasons", plan.actions[i].reasons},
                                  {"elapsed_ms", o.elapsed.count()}})
                      .dump();
    (void)store->appendEvent(e);
  }
}

/// One project: observe, plan, print, and (unless a dry run) apply.
Result<PassResult> reconcileProject(const spec::Project& project, const UpOptions& o,
                                    BackoffMap* backoff) {
  const bool human = o.output == "human";
  std::optional<ProjectLock> lock;
  if (!o.dry_run) {
    ML_ASSIGN_OR_RETURN(auto acquired, ProjectLock::acquire(project.name, o.lock_timeout));
    lock.emplace(std::move(acquired));
  }
  auto desired = desiredOf(project, o.dry_run);
  ML_ASSIGN_OR_RETURN(auto store, openStore(!o.dry_run));
  std::map<std::string, reconcile::Observed> observed;
  if (store) {
    ML_ASSIGN_OR_RETURN(observed, runtime::observeProject(*store, project.name));
  }
  store.reset();  // the driver opens its own connections, one per thread

  reconcile::PlanOptions po;
  po.remove_orphans = o.remove_orphans;
  po.force_recreate = o.force_recreate;
  po.no_recreate = o.no_recreate;
  po.only = std::set<std::string>(o.only.begin(), o.only.end());
  po.live_supported = runtime::SandboxDriver::liveGroups();
  reconcile::Plan plan = reconcile::plan(project.name, desired, observed, po);

  // Sandboxes still backing off after failures sit this pass out; one repaired for being
  // unhealthy stops backing off once its healthcheck passes.
  if (backoff != nullptr) {
    for (const auto& [name, obs] : observed) {
      auto it = backoff->find(name);
      if (it != backoff->end() && it->second.unhealthy && obs.healthcheck == "healthy") {
        backoff->erase(it);
      }
    }
    auto now = Clock::now();
    std::erase_if(plan.actions, [&](const reconcile::Action& a) {
      auto it = backoff->find(a.sandbox);
      return a.kind != reconcile::ActionKind::Noop && it != backoff->end() &&
             it->second.next_try > now;
    });
  }

  // What a dry run (or this apply) would pull: images not in the local store.
  std::set<std::string> pulls;
  for (const auto& a : plan.actions) {
    auto it = desired.find(a.sandbox);
    if (it != desired.end() && a.kind != reconcile::ActionKind::Noop &&
        a.kind != reconcile::ActionKind::Remove && it->second.image_digest.empty()) {
      pulls.insert(it->second.spec.image);
    }
  }

  PassResult result;
  result.changes = plan.hasChanges();
  result.json = {{"project", project.name}, {"plan", reconcile::planToJson(plan)}};
  result.json["pulls"] = pulls;
  if (human && (o.dry_run || plan.hasChanges() || !o.watch)) {
    fmt::print("{}", reconcile::renderPlan(plan));
    for (const auto& image : pulls) {
      fmt::print("  would pull {}\n", image);
    }
    for (const auto& [name, d] : desired) {
      if (!d.blocked.empty()) {
        fmt::print("! {}: {}\n", name, d.blocked);
      }
    }
  }
  // Nothing to change returns at once, unless --wait asks to see every sandbox ready (one just
  // launched by an interrupted run may still be booting).
  if (o.dry_run || (!plan.hasChanges() && !o.wait)) {
    return result;
  }

  runtime::DriverOptions dopt;
  dopt.project = project.name;
  dopt.accel = o.accel;
  dopt.boot_timeout = std::chrono::seconds(o.boot_timeout);
  runtime::SandboxDriver driver(dopt);
  reconcile::ApplyOptions ao;
  ao.parallelism = o.parallel;
  ao.wait = o.wait;
  auto outcomes = reconcile::apply(plan, desired, driver, ao, [&](const reconcile::Outcome& out) {
    if (!human || out.kind == reconcile::ActionKind::Noop) {
      return;
    }
    if (out.status) {
      // A live update and a removal start nothing: neither is booting.
      const bool starts = out.kind != reconcile::ActionKind::Remove &&
                          out.kind != reconcile::ActionKind::UpdateLive;
      fmt::print(" ✔ {} {} ({}{})\n", out.sandbox, pastTense(out.kind), fmtSeconds(out.elapsed),
                 !starts ? "" : (out.ready ? ", ready" : ", booting"));
    } else {
      fmt::print(" ✘ {} {}: {}\n", out.sandbox, out.skipped ? "skipped" : "failed",
                 out.status.error().message());
    }
    std::fflush(stdout);
  });
  recordEvents(project.name, plan, outcomes);

  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  for (const auto& out : outcomes) {
    results.push_back({{"sandbox", out.sandbox},
                       {"action", reconcile::toString(out.kind)},
                       {"ok", static_cast<bool>(out.status)},
                       {"skipped", out.skipped},
                       {"ready", out.ready},
                       {"error", out.status ? "" : out.status.error().message()},
                       {"elapsed_ms", out.elapsed.count()}});
    if (!out.status) {
      ++result.failed;
    }
    if (backoff != nullptr) {
      auto seen = observed.find(out.sandbox);
      const bool repaired_unhealthy = out.status && seen != observed.end() &&
                                      seen->second.health == reconcile::Observed::Health::Unhealthy;
      if (repaired_unhealthy) {
        // Recreated for failing its healthcheck: a sandbox that keeps failing is repaired with
        // growing pauses (5 s doubling to 5 min), not in a tight loop.
        Backoff& b = (*backoff)[out.sandbox];
        ++b.failures;
        b.unhealthy = true;
        auto delay = std::chrono::seconds(std::min(300, 5 << std::min(b.failures - 1, 6)));
        b.next_try = Clock::now() + delay;
        b.last_error = seen->second.detail;
      } else if (out.status) {
        backoff->erase(out.sandbox);
      } else {
        Backoff& b = (*backoff)[out.sandbox];
        ++b.failures;
        auto delay = std::chrono::seconds(std::min(300, 5 << std::min(b.failures - 1, 6)));
        b.next_try = Clock::now() + delay;
        b.last_error = out.status.error().message();
      }
    }
  }
  result.json["results"] = results;
  if (human && result.failed > 0) {
    fmt::print("project {}: {} of {} action(s) failed\n", project.name, result.failed,
               outcomes.size());
  }
  return result;
}

Result<std::vector<spec::Project>> loadForUp(const UpOptions& o) {
  spec::LoadOptions lo;
  lo.paths = specPaths(o.files);
  lo.project = o.project;
  ML_ASSIGN_OR_RETURN(auto projects, spec::loadProjects(lo));
  for (const auto& p : projects) {
    if (p.name == runtime::kAdhocProject) {
      // Its orphans would be every `matchlock run` sandbox.
      return makeError(Errc::InvalidSpec,
                       fmt::format("project name '{}' is reserved for `matchlock run` sandboxes; "
                                   "name the project (name = \"...\" or -p)",
                                   runtime::kAdhocProject));
    }
  }
  for (const std::string& name : o.only) {
    bool known = std::ranges::any_of(
        projects, [&](const spec::Project& p) { return p.sandboxes.contains(name); });
    if (!known) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("no sandbox named '{}' in {}", name, join(lo.paths, ", ")));
    }
  }
  if (!o.only.empty()) {
    std::erase_if(projects, [&](const spec::Project& p) {
      return std::ranges::none_of(o.only, [&](const auto& n) { return p.sandboxes.contains(n); });
    });
  }
  return projects;
}

Result<int> upCommand(const UpOptions& o) {
  if (o.force_recreate && o.no_recreate) {
    return makeError(Errc::InvalidSpec, "--force-recreate and --no-recreate exclude each other");
  }
  // Every spec is read and checked before anything changes: one bad file aborts the whole run.
  ML_ASSIGN_OR_RETURN(auto projects, loadForUp(o));
  bool changes = false;
  int failed = 0;
  nlohmann::ordered_json all = nlohmann::ordered_json::array();
  for (const auto& project : projects) {
    auto pass = reconcileProject(project, o, nullptr);
    if (!pass) {
      // A project that cannot even be planned (lock timeout, unreadable state) is reported, and
      // the other projects still go ahead.
      ++failed;
      (void)reportError(pass.error().withContext(fmt::format("project {}", project.name)));
      all.push_back({{"project", project.name}, {"error", pass.error().message()}});
      continue;
    }
    changes = changes || pass->changes;
    failed += pass->failed;
    all.push_back(pass->json);
  }
  if (o.output == "json") {
    fmt::print("{}\n", nlohmann::ordered_json{{"dry_run", o.dry_run}, {"projects", all}}.dump(2));
  }
  if (failed > 0) {
    return 1;
  }
  return o.detailed_exitcode && changes ? 2 : 0;
}

/// mtime and size of every spec file and `.env` next to them: a change means "plan again".
std::string fingerprint(const std::vector<std::string>& paths) {
  std::string out;
  auto files = spec::expandSpecPaths(paths);
  if (!files) {
    return "error";
  }
  std::set<std::string> seen(files->begin(), files->end());
  for (const auto& f : *files) {
    seen.insert((fs::path(f).parent_path() / ".env").string());
  }
  for (const auto& f : seen) {
    struct stat st {};
    if (::stat(f.c_str(), &st) == 0) {
      out += fmt::format("{}:{}.{}:{};", f, st.st_mtim.tv_sec, st.st_mtim.tv_nsec, st.st_size);
    }
  }
  return out;
}

Result<std::chrono::milliseconds> parseInterval(const std::string& text) {
  auto ms = spec::parseDurationMs(nlohmann::json(text));
  if (!ms || *ms < 1000) {
    return makeError(
        Errc::InvalidSpec,
        fmt::format("--interval {}: need a duration of at least 1s (e.g. 30s, 2m)", text));
  }
  return std::chrono::milliseconds(*ms);
}

/// One line per sandbox after each watch pass: what it is, or why it is backing off.
void printStatusLines(const std::string& project, const BackoffMap& backoff) {
  auto store = openStore(false);
  auto root = runtime::runRoot();
  if (!store || !*store || !root) {
    return;
  }
  auto rows = (*store)->listSandboxes(project);
  if (!rows) {
    return;
  }
  auto now = Clock::now();
  for (const auto& r : *rows) {
    auto obs = runtime::observe(**store, r, *root);
    std::string line =
        fmt::format("{}/{} {} {}", project, r.name, r.id, runtime::toString(obs.health));
    if (auto it = backoff.find(r.name); it != backoff.end()) {
      auto left = std::chrono::duration_cast<std::chrono::seconds>(it->second.next_try - now);
      line += fmt::format(" ({} {}×, {} in {} s: {})",
                          it->second.unhealthy ? "repaired unhealthy" : "failed",
                          it->second.failures, it->second.unhealthy ? "next repair" : "retry",
                          std::max<int64_t>(left.count(), 0), it->second.last_error);
    } else if (!obs.detail.empty()) {
      line += " (" + obs.detail + ")";
    }
    fmt::print("{}\n", line);
  }
  for (const auto& entry : backoff) {
    const std::string& name = entry.first;
    const Backoff& b = entry.second;
    bool recorded = std::ranges::any_of(*rows, [&](const auto& r) { return r.name == name; });
    if (!recorded) {
      auto left = std::chrono::duration_cast<std::chrono::seconds>(b.next_try - now);
      fmt::print("{}/{} - failed {}×, retry in {} s: {}\n", project, name, b.failures,
                 std::max<int64_t>(left.count(), 0), b.last_error);
    }
  }
}

Result<int> reconcileCommand(UpOptions o) {
  if (!o.watch) {
    return upCommand(o);
  }
  o.output = "human";
  ML_ASSIGN_OR_RETURN(auto interval, parseInterval(o.interval));
  struct sigaction sa {};
  sa.sa_handler = onStopSignal;
  (void)::sigaction(SIGINT, &sa, nullptr);
  (void)::sigaction(SIGTERM, &sa, nullptr);

  std::map<std::string, BackoffMap> backoff;  // per project
  std::string last_print;
  std::string last_fp;
  auto next_pass = Clock::now();
  while (!g_stop.load()) {
    std::string fp = fingerprint(specPaths(o.files));
    if (fp != last_fp || Clock::now() >= next_pass) {
      if (fp != last_fp && !last_fp.empty()) {
        fmt::print("spec files changed: planning again\n");
      }
      last_fp = fp;
      next_pass = Clock::now() + interval;
      auto projects = loadForUp(o);
      if (!projects) {
        // A broken edit keeps the last applied state running; the error says what to fix.
        (void)reportError(projects.error().withContext("not applying: the specs do not load"));
      } else {
        for (const auto& project : *projects) {
          auto pass = reconcileProject(project, o, &backoff[project.name]);
          if (!pass) {
            (void)reportError(pass.error().withContext(fmt::format("project {}", project.name)));
            continue;
          }
          printStatusLines(project.name, backoff[project.name]);
        }
      }
      std::fflush(stdout);
    }
    // Wake early for a retry that falls due before the next interval.
    for (const auto& [p, m] : backoff) {
      for (const auto& [n, b] : m) {
        next_pass = std::min(next_pass, std::max(b.next_try, Clock::now()));
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  fmt::print("stopping the watch; sandboxes keep running (matchlock down stops them)\n");
  return 0;
}

/// The projects a down/ps names: -p, else those of the spec files.
Result<std::vector<std::string>> projectNames(const std::vector<std::string>& files,
                                              const std::string& project, bool all_if_none) {
  if (!project.empty()) {
    return std::vector<std::string>{project};
  }
  if (files.empty() && all_if_none) {
    return std::vector<std::string>{};
  }
  spec::LoadOptions lo;
  lo.paths = specPaths(files);
  ML_ASSIGN_OR_RETURN(auto projects, spec::loadProjects(lo));
  std::vector<std::string> names;
  for (const auto& p : projects) {
    names.push_back(p.name);
  }
  return names;
}

Status downCommand(const DownOptions& o) {
  ML_ASSIGN_OR_RETURN(auto names, projectNames(o.files, o.project, false));
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  for (const std::string& project : names) {
    ML_ASSIGN_OR_RETURN(auto lock, ProjectLock::acquire(project, o.lock_timeout));
    ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
    ML_ASSIGN_OR_RETURN(auto rows, store.listSandboxes(project));
    if (rows.empty()) {
      fmt::print("project {}: nothing to remove\n", project);
    }
    // In parallel: each guest gets its clean power-off at the same time.
    std::vector<std::thread> threads;
    std::vector<Status> results(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      threads.emplace_back([&, i] {
        auto own = state::Store::openDefault();
        if (!own) {
          results[i] = makeError(std::move(own).error());
          return;
        }
        runtime::stop(*own, rows[i], root);
        results[i] = runtime::remove(*own, rows[i], root, o.volumes);
      });
    }
    for (auto& t : threads) {
      t.join();
    }
    Status first = ok();
    for (size_t i = 0; i < rows.size(); ++i) {
      if (results[i]) {
        fmt::print("Removed {}/{} ({})\n", project, rows[i].name, rows[i].id);
      } else {
        (void)reportError(results[i].error().withContext(rows[i].name));
        if (first) {
          first = results[i];
        }
      }
    }
    if (o.volumes) {
      // Data of sandboxes no longer recorded (e.g. removed earlier without -v) goes too.
      ML_ASSIGN_OR_RETURN(std::string data, runtime::projectDataDir(project));
      std::error_code ec;
      fs::remove_all(data, ec);
      if (ec) {
        return makeError(Errc::System, fmt::format("removing {}", data), ec.value());
      }
    }
    (void)store.deleteProjectIfEmpty(project);
    ML_RETURN_IF_ERROR(first);
  }
  return ok();
}

Status psCommand(const PsOptions& o) {
  ML_ASSIGN_OR_RETURN(auto names, projectNames(o.files, o.project, true));
  ML_ASSIGN_OR_RETURN(auto store, openStore(false));
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  std::vector<std::vector<std::string>> table;
  if (store) {
    std::vector<state::SandboxRecord> records;
    if (names.empty()) {
      ML_ASSIGN_OR_RETURN(records, store->listSandboxes());
    }
    for (const auto& p : names) {
      ML_ASSIGN_OR_RETURN(auto part, store->listSandboxes(p));
      records.insert(records.end(), part.begin(), part.end());
    }
    for (const auto& r : records) {
      auto obs = runtime::observe(*store, r, root);
      auto spec = nlohmann::json::parse(r.spec_json, nullptr, false);
      std::string image = spec.is_object() ? spec.value("image", "") : "";
      std::string source = r.source_file.value_or("-");
      rows.push_back(
          {{"project", r.project},
           {"name", r.name},
           {"id", r.id},
           {"status", runtime::toString(obs.health)},
           {"health", r.health ? nlohmann::ordered_json(*r.health) : nlohmann::ordered_json()},
           {"detail", obs.detail},
           {"image", image},
           {"spec", source},
           {"generation", r.generation},
           {"pid", r.supervisor ? r.supervisor->pid : 0},
           {"created_at", r.created_at}});
      std::string status(runtime::toString(obs.health));
      if (r.health && obs.health == runtime::Health::Running) {
        status += fmt::format(" ({})", *r.health);  // as docker ps: "running (healthy)"
      }
      table.push_back({r.project, r.name, r.id, status, image, source});
    }
  }
  if (o.output == "json") {
    fmt::print("{}\n", rows.dump(2));
    return ok();
  }
  fmt::print("{:<12} {:<14} {:<12} {:<20} {:<22} {}\n", "PROJECT", "NAME", "ID", "STATUS", "IMAGE",
             "SPEC");
  for (const auto& t : table) {
    fmt::print("{:<12} {:<14} {:<12} {:<20} {:<22} {}\n", t[0], t[1], t[2], t[3], t[4], t[5]);
  }
  return ok();
}

void setExit(CommandContext& ctx, Result<int> r) {
  ctx.exit_code = r ? *r : reportError(r.error());
}

void addUpFlags(CLI::App* c, UpOptions& o) {
  c->add_option("-f,--file", o.files, "Spec file or directory (repeatable; default: .)")
      ->allow_extra_args(false);
  c->add_option("-p,--project", o.project, "Project name (default: the specs' name)");
  c->add_option("sandbox", o.only, "Only these sandboxes (and what they depend on)");
  c->add_option("-o,--output", o.output, "human or json")->check(CLI::IsMember({"human", "json"}));
  c->add_flag("--remove-orphans,--prune", o.remove_orphans,
              "Remove the project's sandboxes that no spec declares any more");
  c->add_flag("--force-recreate", o.force_recreate, "Recreate even unchanged sandboxes");
  c->add_flag("--no-recreate", o.no_recreate,
              "Never recreate a healthy sandbox for a spec change (repairs still happen)");
  c->add_flag("--wait", o.wait, "Wait until every sandbox is ready");
  c->add_flag("--detailed-exitcode", o.detailed_exitcode,
              "Exit 0 when nothing changed, 2 when changes were applied (or are pending with "
              "--dry-run), 1 on error");
  c->add_option("--parallel", o.parallel, "Sandboxes started at once")->check(CLI::Range(1, 64));
  c->add_option("--accel", o.accel, "kvm, tcg or auto (MATCHLOCK_ACCEL)")
      ->check(CLI::IsMember({"kvm", "tcg", "auto"}));
  c->add_option("--boot-timeout", o.boot_timeout, "Seconds a guest may take to become ready")
      ->check(CLI::Range(1, 3600));
  c->add_option("--lock-timeout", o.lock_timeout,
                "Seconds to wait for another command on the same project")
      ->check(CLI::Range(0, 86400));
}

}  // namespace

void addUpCommands(CLI::App& app, CommandContext& ctx) {
  auto up = std::make_shared<UpOptions>();
  auto* u = app.add_subcommand("up", "Create, update or repair a project's sandboxes from specs");
  addUpFlags(u, *up);
  u->add_flag("--dry-run", up->dry_run,
              "Print the plan only: no VM, no image pull, no state change");
  u->callback([up, &ctx] { setExit(ctx, upCommand(*up)); });

  auto pl = std::make_shared<UpOptions>();
  auto* p = app.add_subcommand("plan", "Print what `up` would do (same as up --dry-run)");
  addUpFlags(p, *pl);
  p->callback([pl, &ctx] {
    pl->dry_run = true;
    setExit(ctx, upCommand(*pl));
  });

  auto rc = std::make_shared<UpOptions>();
  auto* r = app.add_subcommand("reconcile",
                               "Converge once like `up`, or keep converging with --watch "
                               "(spec edits and drift)");
  addUpFlags(r, *rc);
  r->add_flag("--watch", rc->watch, "Keep reconciling until interrupted");
  r->add_option("--interval", rc->interval, "Time between passes with --watch (e.g. 30s, 2m)");
  r->callback([rc, &ctx] { setExit(ctx, reconcileCommand(*rc)); });

  auto down = std::make_shared<DownOptions>();
  auto* d = app.add_subcommand("down", "Stop and remove a project's sandboxes");
  d->add_option("-f,--file", down->files, "Spec file or directory naming the project")
      ->allow_extra_args(false);
  d->add_option("-p,--project", down->project, "Project name");
  d->add_flag("-v,--volumes", down->volumes, "Also delete the sandboxes' overlay data");
  d->add_option("--lock-timeout", down->lock_timeout,
                "Seconds to wait for another command on the same project");
  d->callback([down, &ctx] { ctx.finish(downCommand(*down)); });

  auto ps = std::make_shared<PsOptions>();
  auto* s = app.add_subcommand("ps", "List declared sandboxes with their observed status");
  s->add_option("-f,--file", ps->files, "Spec file or directory naming the project")
      ->allow_extra_args(false);
  s->add_option("-p,--project", ps->project, "Project name (default: every project)");
  s->add_option("-o,--output", ps->output, "human or json")
      ->check(CLI::IsMember({"human", "json"}));
  s->callback([ps, &ctx] { ctx.finish(psCommand(*ps)); });
}

}  // namespace matchlock::cli
