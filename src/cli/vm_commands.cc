// SPDX-License-Identifier: Apache-2.0
// Sandbox lifecycle: run, exec, list, inspect, log, kill, rm, prune, and the hidden
// `__supervise` entry point of the per-sandbox supervisor process.
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <memory>
#include <regex>
#include <thread>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/output.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/strings.h"
#include "image/image.h"
#include "ml_version.h"
#include "net/policy.h"
#include "runtime/exec_client.h"
#include "runtime/main_process.h"
#include "runtime/sandbox.h"
#include "runtime/volumes.h"
#include "spec/decode.h"
#include "spec/model.h"
#include "spec/normalize.h"
#include "state/store.h"
#include "supervisor/supervisor.h"
#include "sys/process.h"
#include "sys/process_ref.h"

namespace matchlock::cli {
namespace {

namespace fs = std::filesystem;

struct RunOptions {
  std::string image;
  std::vector<std::string> command;
  std::vector<std::string> env;
  std::string workdir;
  std::string user;
  std::string hostname;
  bool privileged = false;
  std::string accel = "auto";
  double cpus = spec::kDefaultCpus;
  int64_t memory = spec::kDefaultMemoryMib;
  int64_t disk = spec::kDefaultDiskMib;
  bool rm = true;
  bool detach = false;
  bool interactive = false;
  bool tty = false;
  int boot_timeout = 120;
  // Network (docs/egress.md).
  std::vector<std::string> allow_hosts;  ///< repeatable, comma lists allowed
  std::vector<std::string> secrets;      ///< NAME=VALUE@host,host or NAME@host,host
  std::vector<std::string> add_hosts;    ///< host:ip
  std::vector<std::string> dns_servers;
  bool no_network = false;
  bool network_intercept = false;
  bool allow_private = false;
  int mtu = spec::kDefaultMtu;
  std::string upstream_ca;
  // Host-served filesystems (docs/vfs.md).
  std::vector<std::string> volumes;  ///< HOST:GUEST[:overlay|host_fs|rw|ro|readonly]
  std::string workspace;
  std::vector<std::string> disks;  ///< HOST_PATH:GUEST_MOUNT[:ro] or @VOLUME:GUEST_MOUNT[:ro]
  // Published ports (docs/ports.md).
  std::vector<std::string> publish;    ///< [LOCAL:]REMOTE
  std::vector<std::string> addresses;  ///< bind addresses, comma lists allowed
};

/// Applies run's --disk flags (reference §1.2.3) after the -v mounts: a disk must not sit inside
/// a VFS mount, which would shadow it.
Status applyDiskFlags(const RunOptions& o, spec::SandboxSpec& sb) {
  for (const std::string& arg : o.disks) {
    ML_ASSIGN_OR_RETURN(spec::Mount m, runtime::parseDiskFlag(arg));
    if (std::any_of(sb.mounts.begin(), sb.mounts.end(),
                    [&](const spec::Mount& x) { return x.target == m.target; })) {
      return makeError(
          Errc::InvalidSpec,
          fmt::format("invalid disk mount '{}': '{}' is already a mount target", arg, m.target));
    }
    if (std::string parent = spec::shadowingVfsMount(sb.mounts, m.target); !parent.empty()) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid disk mount '{}': '{}' would be shadowed by the mount "
                                   "at '{}'",
                                   arg, m.target, parent));
    }
    // Fail before anything is recorded when a named volume does not exist.
    ML_ASSIGN_OR_RETURN(std::string image, runtime::diskImageOf(m));
    (void)image;
    sb.mounts.push_back(std::move(m));
  }
  return ok();
}

/// Applies run's -v and --workspace with upstream's rules (reference §1.2.2): the host path is
/// made absolute and must exist, a relative guest path is joined onto the workspace, an absolute
/// one must lie within it, and the mode is a snapshot (overlay) unless asked otherwise.
Status applyVolumeFlags(const RunOptions& o, spec::SandboxSpec& sb) {
  static const std::regex kGuestPath("^/[a-zA-Z0-9/_.-]+$");
  if (!o.workspace.empty() && o.volumes.empty()) {
    return makeError(Errc::InvalidSpec, "vfs.workspace requires at least one vfs.mounts entry");
  }
  std::string workspace = o.workspace.empty() ? "/workspace" : o.workspace;
  if (!std::regex_match(workspace, kGuestPath) && workspace != "/") {
    return makeError(
        Errc::InvalidSpec,
        fmt::format("invalid workspace '{}': must match ^/[a-zA-Z0-9/_.-]+$", workspace));
  }
  while (workspace.size() > 1 && workspace.back() == '/') {
    workspace.pop_back();
  }
  for (const std::string& v : o.volumes) {
    std::vector<std::string> parts = split(v, ':');
    if (parts.size() < 2 || parts.size() > 3 || parts[0].empty() || parts[1].empty()) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid volume mount '{}': expected HOST:GUEST[:OPT]", v));
    }
    spec::Mount m;
    std::error_code ec;
    m.source = std::filesystem::absolute(parts[0], ec).lexically_normal().string();
    if (ec || !std::filesystem::exists(m.source, ec)) {
      return makeError(
          Errc::NotFound,
          fmt::format("invalid volume mount '{}': host path {} does not exist", v, m.source));
    }
    std::string guest = parts[1];
    if (!guest.starts_with("/")) {
      guest = (workspace == "/" ? "" : workspace) + "/" + guest;
    }
    guest = std::filesystem::path(guest).lexically_normal().string();
    while (guest.size() > 1 && guest.back() == '/') {
      guest.pop_back();
    }
    if (!std::regex_match(guest, kGuestPath) || guest.find("/../") != std::string::npos ||
        guest.ends_with("/..")) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid volume mount '{}': guest path '{}' must match "
                                   "^/[a-zA-Z0-9/_.-]+$",
                                   v, guest));
    }
    if (workspace != "/" && guest != workspace && !guest.starts_with(workspace + "/")) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid volume mount '{}': guest path must be within "
                                   "workspace '{}'",
                                   v, workspace));
    }
    m.target = guest;
    std::string opt = parts.size() == 3 ? parts[2] : "overlay";
    if (opt == "overlay") {
      m.mode = spec::MountMode::Overlay;
    } else if (opt == "host_fs" || opt == "rw") {
      m.mode = spec::MountMode::ReadWrite;
    } else if (opt == "ro" || opt == "readonly") {
      m.mode = spec::MountMode::ReadOnly;
    } else {
      return makeError(Errc::InvalidSpec,
                       fmt::format("invalid volume mount '{}': unknown option '{}' (overlay, "
                                   "host_fs, ro)",
                                   v, opt));
    }
    if (std::any_of(sb.mounts.begin(), sb.mounts.end(),
                    [&](const spec::Mount& x) { return x.target == m.target; })) {
      return makeError(
          Errc::InvalidSpec,
          fmt::format("invalid volume mount '{}': '{}' is already a mount target", v, m.target));
    }
    sb.mounts.push_back(std::move(m));
  }
  return ok();
}

/// Applies run's network flags to `sb`, with upstream's rules and messages (the secret flag is
/// split at the last '@' and its host list at commas: upstream's comma quirk is fixed).
Status applyNetworkFlags(const RunOptions& o, spec::SandboxSpec& sb) {
  spec::NetworkSpec& n = sb.network;
  n.no_network = o.no_network;
  for (const std::string& arg : o.allow_hosts) {
    for (const std::string& h : split(arg, ',')) {
      std::string host = toLower(std::string(trim(h)));
      if (!host.empty() &&
          std::find(n.allow_hosts.begin(), n.allow_hosts.end(), host) == n.allow_hosts.end()) {
        n.allow_hosts.push_back(host);
      }
    }
  }
  for (const std::string& arg : o.secrets) {
    size_t at = arg.rfind('@');
    if (at == std::string::npos || at == 0) {
      return makeError(
          Errc::InvalidSpec,
          fmt::format("--secret {}: expected NAME=VALUE@host[,host] or NAME@host[,host]",
                      arg.substr(0, arg.find('='))));
    }
    spec::SecretRef ref;
    std::string lhs = arg.substr(0, at);
    for (const std::string& h : split(arg.substr(at + 1), ',')) {
      if (std::string host = toLower(std::string(trim(h))); !host.empty()) {
        ref.hosts.push_back(host);
      }
    }
    if (ref.hosts.empty()) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("--secret {}: at least one host is required after '@'",
                                   lhs.substr(0, lhs.find('='))));
    }
    if (size_t eq = lhs.find('='); eq != std::string::npos) {
      ref.name = lhs.substr(0, eq);
      ref.kind = spec::SecretRef::Kind::Inline;
      ref.inline_value = lhs.substr(eq + 1);
    } else {
      ref.name = lhs;
      ref.kind = spec::SecretRef::Kind::Env;
      ref.env_var = lhs;
      const char* v = std::getenv(lhs.c_str());
      if (v == nullptr || *v == '\0') {
        return makeError(
            Errc::InvalidSpec,
            fmt::format("--secret {}: ${} is not set or empty (with sudo, use sudo -E)", lhs, lhs));
      }
    }
    if (ref.name.empty()) {
      return makeError(Errc::InvalidSpec, "--secret: the secret name is empty");
    }
    sb.secrets.push_back(std::move(ref));
  }
  for (const std::string& arg : o.add_hosts) {
    size_t colon = arg.find(':');
    std::string host = colon == std::string::npos ? "" : arg.substr(0, colon);
    std::string ip = colon == std::string::npos ? "" : arg.substr(colon + 1);
    if (host.empty() || host.find_first_of(" \t") != std::string::npos || !net::isIpLiteral(ip)) {
      return makeError(Errc::InvalidSpec, fmt::format("--add-host {}: expected HOST:IP", arg));
    }
    n.add_hosts[toLower(host)] = ip;
  }
  if (!o.dns_servers.empty()) {
    n.dns_servers.clear();
    for (const std::string& arg : o.dns_servers) {
      for (const std::string& d : split(arg, ',')) {
        std::string ip(trim(d));
        if (!net::isIpLiteral(ip)) {
          return makeError(Errc::InvalidSpec,
                           fmt::format("--dns-servers: '{}' is not an IP address", d));
        }
        n.dns_servers.push_back(ip);
      }
    }
  }
  if (o.mtu < 68 || o.mtu > 65535) {
    return makeError(Errc::InvalidSpec, "--mtu must be between 68 and 65535");
  }
  n.mtu = o.mtu;
  n.intercept = o.network_intercept;
  n.block_private_ips = !o.allow_private;
  n.upstream_ca = o.upstream_ca;
  if (n.no_network && (!n.allow_hosts.empty() || !sb.secrets.empty() || n.intercept)) {
    return makeError(Errc::InvalidSpec,
                     "--no-network cannot be combined with --allow-host, --secret or "
                     "--network-intercept");
  }
  return ok();
}

struct ExecOptions {
  std::string id;
  std::vector<std::string> command;
  std::string workdir;
  std::string user;
  bool interactive = false;
  bool tty = false;
};

using runtime::runDirOf;

bool supervisorAlive(const state::SandboxRecord& r) {
  return r.supervisor && sys::isAlive(*r.supervisor);
}

/// The recorded status, corrected by observation: "running" with a dead supervisor is crashed.
state::SandboxStatus observedStatus(state::Store& store, const state::SandboxRecord& r) {
  bool live = r.status == state::SandboxStatus::Running ||
              r.status == state::SandboxStatus::Creating ||
              r.status == state::SandboxStatus::Pending;
  if (live && r.supervisor && !supervisorAlive(r)) {
    (void)store.updateSandboxStatus(r.id, state::SandboxStatus::Crashed,
                                    std::string("supervisor died"));
    return state::SandboxStatus::Crashed;
  }
  return r.status;
}

/// The guest init's own console lines after "init reached" (why a boot was given up, e.g. a
/// disk that would not mount), as "; guest: ..." for an error message; "" when there are none.
std::string guestBootMessages(const std::string& run_dir) {
  std::string console = readFile(supervisor::consoleLogPath(run_dir)).value_or("");
  std::vector<std::string> lines;
  for (const std::string& line : split(console, '\n')) {
    constexpr std::string_view kPrefix = "matchlock-guest: ";
    size_t at = line.find(kPrefix);
    if (at != std::string::npos && line.find("init reached") == std::string::npos) {
      lines.emplace_back(trim(line.substr(at + kPrefix.size())));
    }
  }
  if (lines.size() > 5) {
    lines.erase(lines.begin(), lines.end() - 5);
  }
  return lines.empty() ? "" : "; guest: " + join(lines, "; ");
}

std::vector<std::string> composeCommand(const image::ImageConfig& config,
                                        const std::vector<std::string>& args) {
  // Docker's rule: ENTRYPOINT + (arguments if given, else CMD).
  std::vector<std::string> argv = config.entrypoint;
  const auto& rest = args.empty() ? config.cmd : args;
  argv.insert(argv.end(), rest.begin(), rest.end());
  return argv;
}

Result<int> runCommand(const RunOptions& o) {
  if (o.detach && (o.tty || o.interactive)) {
    return makeError(Errc::InvalidSpec,
                     "--detach cannot be combined with -t/--tty or -i/--interactive");
  }
  if (o.tty && ::isatty(STDIN_FILENO) == 0) {
    return makeError(Errc::InvalidSpec, "-t requires a TTY on stdin");
  }
  if (o.cpus <= 0 || o.cpus > 256) {
    return makeError(Errc::InvalidSpec, "--cpus must be greater than 0 and at most 256");
  }
  bool keep = !o.rm || o.detach;
  {
    // Mount and disk flags are checked before the image is resolved (a pull may take minutes).
    spec::SandboxSpec scratch;
    ML_RETURN_IF_ERROR(applyVolumeFlags(o, scratch));
    ML_RETURN_IF_ERROR(applyDiskFlags(o, scratch));
  }

  // Resolve everything that can fail before any state exists.
  ML_ASSIGN_OR_RETURN(std::string image_root, image::Store::defaultRoot());
  ML_ASSIGN_OR_RETURN(auto image_store, image::Store::open(image_root));
  ML_ASSIGN_OR_RETURN(auto prepared, image::prepareImage(image_store, o.image, {}));
  std::vector<std::string> argv = composeCommand(prepared.config, o.command);
  if (argv.empty() && !keep) {
    return makeError(Errc::InvalidSpec,
                     "command required (or use --rm=false / -d to start without a command)");
  }
  ML_ASSIGN_OR_RETURN(runtime::BootAssets assets, runtime::resolveBootAssets(o.accel));

  std::map<std::string, std::string> env = runtime::imageEnv(prepared.config);
  for (const std::string& kv : o.env) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos) {
      const char* v = std::getenv(kv.c_str());
      if (v == nullptr) {
        return makeError(Errc::InvalidSpec, fmt::format("-e {}: not set in the environment", kv));
      }
      env[kv] = v;
    } else {
      env[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
  }

  std::string id = runtime::newSandboxId();
  spec::SandboxSpec sb;
  sb.name = id;
  sb.image = o.image;
  sb.cpus = o.cpus;
  sb.memory_mib = o.memory;
  sb.disk_mib = o.disk;
  sb.env = env;
  sb.hostname = o.hostname.empty() ? id : o.hostname;
  if (!o.workdir.empty()) {
    sb.workdir = o.workdir;
  }
  if (!o.user.empty()) {
    sb.user = o.user;
  }
  sb.privileged = o.privileged;
  ML_RETURN_IF_ERROR(applyNetworkFlags(o, sb));
  ML_RETURN_IF_ERROR(applyVolumeFlags(o, sb));
  ML_RETURN_IF_ERROR(applyDiskFlags(o, sb));
  ML_ASSIGN_OR_RETURN(auto published, parsePublished("--publish", o.publish, o.addresses, true));
  for (const auto& p : published) {
    sb.ports.push_back(spec::PortForward{p.local, p.remote, p.address, "tcp"});
  }

  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  std::string run_dir = runDirOf(root, id);
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  runtime::LaunchOptions lo;
  lo.project = runtime::kAdhocProject;
  lo.boot_timeout = std::chrono::seconds(o.boot_timeout);
  lo.image_digest = prepared.record.manifest_digest;
  lo.id = id;
  ML_RETURN_IF_ERROR(runtime::launch(store, sb, prepared, assets, lo));
  // From here on, a failure must not leave anything behind unless the user asked to keep it.
  auto cleanup = [&](Error e) -> Result<int> {
    if (auto current = store.getSandbox(id); current) {
      (void)runtime::remove(store, *current, root, false);
    }
    return makeError(std::move(e));
  };

  std::string control = supervisor::controlSocketPath(run_dir);
  if (o.detach || argv.empty() || !sb.ports.empty()) {
    // Wait until the guest is ready, so that `run -d` followed by `exec` just works, and so that
    // a published port that could not be bound is reported before anything runs.
    if (Status st = runtime::waitReady(store, id, std::chrono::seconds(o.boot_timeout + 5)); !st) {
      return cleanup(std::move(st).error());
    }
    for (const auto& p : sb.ports) {
      fmt::print(stderr, "Forwarding {}:{} -> {}\n", p.address, p.host, p.guest);
    }
    if (o.detach) {
      fmt::print("{}\n", id);
      return 0;
    }
  }
  int code = 0;
  if (!argv.empty()) {
    runtime::ExecClientOptions eo;
    eo.request.argv = argv;
    eo.request.env = env;
    eo.request.cwd = !o.workdir.empty() ? o.workdir : prepared.config.working_dir;
    eo.request.user = !o.user.empty() ? o.user : prepared.config.user;
    eo.request.tty = o.tty && o.interactive;
    eo.request.kill_grace_seconds = 2;
    eo.forward_stdin = o.interactive;
    eo.connect_timeout_ms = 10000;
    auto r = runtime::runExec(control, eo);
    if (!r) {
      // The supervisor records why a sandbox failed to start: that beats "not reachable".
      Error err = std::move(r).error();
      auto current = store.getSandbox(id);
      if (current && current->last_error && !current->last_error->empty()) {
        err = Error(Errc::Unavailable, *current->last_error + guestBootMessages(run_dir));
      }
      if (!keep) {
        if (current) {
          runtime::stop(store, *current, root);
        }
        return cleanup(std::move(err));
      }
      return makeError(std::move(err));
    }
    code = *r;
  }
  if (keep) {
    fmt::print(stderr,
               "Sandbox {} is running\n  Connect: matchlock exec {} -it sh\n  Stop:    "
               "matchlock kill {}\n",
               id, id, id);
    return code;
  }
  auto current = store.getSandbox(id);
  if (current) {
    // --rm discards the upper disk, so a clean guest power-off buys nothing: kill and remove.
    // Unless a volume or disk is attached: the guest's power-off syncs what was written to it.
    if (std::any_of(sb.mounts.begin(), sb.mounts.end(),
                    [](const spec::Mount& m) { return spec::isBlockMount(m.mode); })) {
      runtime::stop(store, *current, root);
    }
    ML_RETURN_IF_ERROR(runtime::remove(store, *current, root, false));
  }
  return code;
}

Result<int> execCommand(const ExecOptions& o) {
  if (o.command.empty() && !(o.interactive && o.tty)) {
    return makeError(Errc::InvalidSpec, "command required (or -it for a shell)");
  }
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto rec, runtime::findSandbox(store, o.id));
  state::SandboxStatus status = observedStatus(store, rec);
  if (status == state::SandboxStatus::Creating && supervisorAlive(rec)) {
    // Just launched (e.g. by `up` without --wait): wait for the boot instead of failing.
    ML_RETURN_IF_ERROR(runtime::waitReady(store, rec.id, std::chrono::seconds(125)));
    status = state::SandboxStatus::Running;
  }
  if (status != state::SandboxStatus::Running) {
    return makeError(Errc::Conflict, fmt::format("sandbox {} is not running (status: {})", o.id,
                                                 state::sandboxStatusName(status)));
  }
  runtime::ExecDefaults defaults = runtime::execDefaults(rec);
  runtime::ExecClientOptions eo;
  eo.request.argv = o.command.empty() ? std::vector<std::string>{"/bin/sh"} : o.command;
  eo.request.env = std::move(defaults.env);
  eo.request.cwd = std::move(defaults.cwd);
  eo.request.user = std::move(defaults.user);
  if (!o.workdir.empty()) {
    eo.request.cwd = o.workdir;
  }
  if (!o.user.empty()) {
    eo.request.user = o.user;
  }
  eo.request.tty = o.tty && o.interactive;
  eo.request.kill_grace_seconds = 2;
  eo.forward_stdin = o.interactive;
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  return runtime::runExec(supervisor::controlSocketPath(runDirOf(root, rec.id)), eo);
}

Status listCommand(const std::string& output, bool running_only) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto all, store.listSandboxes());
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  std::vector<std::vector<std::string>> table;
  for (const auto& r : all) {
    state::SandboxStatus status = observedStatus(store, r);
    if (running_only && status != state::SandboxStatus::Running) {
      continue;
    }
    auto spec = nlohmann::json::parse(r.spec_json, nullptr, false);
    std::string image = spec.is_object() ? spec.value("image", "") : "";
    std::string pid = r.supervisor ? std::to_string(r.supervisor->pid) : "-";
    rows.push_back({{"id", r.id},
                    {"project", r.project},
                    {"name", r.name},
                    {"status", state::sandboxStatusName(status)},
                    {"image", image},
                    {"created_at", r.created_at},
                    {"pid", r.supervisor ? r.supervisor->pid : 0}});
    table.push_back({r.id, std::string(state::sandboxStatusName(status)), image,
                     r.created_at.substr(0, 16), pid});
  }
  if (output == "json") {
    fmt::print("{}\n", rows.dump(2));
    return ok();
  }
  fmt::print("{:<14} {:<9} {:<32} {:<17} {}\n", "ID", "STATUS", "IMAGE", "CREATED", "PID");
  for (const auto& t : table) {
    fmt::print("{:<14} {:<9} {:<32} {:<17} {}\n", t[0], t[1], t[2], t[3], t[4]);
  }
  return ok();
}

Status inspectCommand(const std::string& id) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto r, runtime::findSandbox(store, id));
  state::SandboxStatus status = observedStatus(store, r);
  nlohmann::ordered_json out = {{"id", r.id},
                                {"project", r.project},
                                {"name", r.name},
                                {"status", state::sandboxStatusName(status)},
                                {"created_at", r.created_at},
                                {"updated_at", r.updated_at},
                                {"last_error", r.last_error ? *r.last_error : ""},
                                {"spec", nlohmann::ordered_json::parse(r.spec_json)}};
  if (r.supervisor) {
    out["supervisor"] = {{"pid", r.supervisor->pid},
                         {"start_time", r.supervisor->start_time},
                         {"alive", sys::isAlive(*r.supervisor)}};
  }
  if (auto vm = store.getVm(id); vm) {
    out["vm"] = {{"backend", vm->backend},
                 {"status", state::vmStatusName(vm->status)},
                 {"pid", vm->process ? vm->process->pid : 0}};
  }
  nlohmann::ordered_json resources = nlohmann::ordered_json::array();
  if (auto res = store.listResources(id); res) {
    for (const auto& x : *res) {
      resources.push_back({{"kind", state::resourceKindName(x.kind)},
                           {"name", x.name},
                           {"state", state::resourceStateName(x.state)}});
    }
  }
  out["resources"] = resources;
  fmt::print("{}\n", out.dump(2));
  return ok();
}

Status logCommand(const std::string& id, bool follow, bool main) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto r, runtime::findSandbox(store, id));
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  std::string path = main ? supervisor::mainLogPath(runDirOf(root, r.id))
                          : supervisor::consoleLogPath(runDirOf(root, r.id));
  size_t offset = 0;
  for (;;) {
    auto text = readFile(path);
    if (text) {
      std::string content = std::move(*text);
      if (content.size() < offset) {
        offset = 0;  // truncated: start over
      }
      std::string_view fresh = std::string_view(content).substr(offset);
      (void)std::fwrite(fresh.data(), 1, fresh.size(), stdout);
      (void)std::fflush(stdout);
      offset = content.size();
    } else if (!follow) {
      return makeError(std::move(text).error());
    }
    if (!follow) {
      return ok();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

/// `allow-list add|delete ID HOST...`: changes a running sandbox's egress policy through its
/// supervisor, effective for the next connection. Output as upstream's.
Status allowListCommand(const std::string& action, const std::string& id,
                        const std::vector<std::string>& args) {
  std::vector<std::string> hosts;
  for (const std::string& a : args) {
    for (const std::string& h : split(a, ',')) {
      std::string host = toLower(std::string(trim(h)));
      if (!host.empty() && std::find(hosts.begin(), hosts.end(), host) == hosts.end()) {
        hosts.push_back(host);
      }
    }
  }
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto r, runtime::findSandbox(store, id));
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  nlohmann::json req = {{"op", "allow_list"}, {"action", action}, {"hosts", hosts}};
  auto line =
      runtime::controlRequestLine(supervisor::controlSocketPath(runDirOf(root, r.id)), req.dump());
  if (!line) {
    return makeError(Errc::Unavailable,
                     fmt::format("sandbox {} is not running (no supervisor answered)", r.id));
  }
  auto reply = nlohmann::json::parse(*line, nullptr, false);
  if (!reply.is_object() || !reply.value("ok", false)) {
    return makeError(Errc::Conflict, reply.is_object()
                                         ? reply.value("error", "allow-list update failed")
                                         : std::string("allow-list update failed"));
  }
  const bool add = action == "add";
  auto changed = reply.value(add ? "added" : "removed", std::vector<std::string>{});
  if (changed.empty()) {
    fmt::print("{} {}\n", add ? "No new hosts were added to" : "No hosts were removed from", r.id);
  } else {
    fmt::print("{} {}: {}\n", add ? "Added to" : "Removed from", r.id, join(changed, ","));
  }
  auto current = reply.value("allow_hosts", std::vector<std::string>{});
  fmt::print("Current allow-list: {}\n",
             current.empty() ? "(empty: all hosts allowed)" : join(current, ","));
  return ok();
}

/// `events ID [-f] [-o json]`: the sandbox's network events (and later file events).
Status eventsCommand(const std::string& id, bool follow, bool json) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto r, runtime::findSandbox(store, id));
  ML_ASSIGN_OR_RETURN(std::string home, matchlockHome());
  const std::string path = supervisor::eventsPath(home, r.id);
  // The rotated file first (older events), then the current one, followed.
  std::string partial;
  size_t offset = 0;
  if (auto older = readFile(path + ".1"); older) {
    partial = std::move(*older);
  }
  auto drain = [&] {
    size_t nl = 0;
    while ((nl = partial.find('\n')) != std::string::npos) {
      std::string ev = partial.substr(0, nl);
      partial.erase(0, nl + 1);
      if (json) {
        fmt::print("{}\n", ev);
        continue;
      }
      auto e = nlohmann::json::parse(ev, nullptr, false);
      if (!e.is_object()) {
        continue;
      }
      if (auto f = e.find("file"); f != e.end() && f->is_object()) {
        // File events carry milliseconds (upstream's shape).
        std::time_t t = e.value("timestamp", int64_t{0}) / 1000;
        char when[32] = {};
        (void)std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", std::localtime(&t));
        std::string line =
            fmt::format("{} file {} {}", when, f->value("op", "?"), f->value("path", ""));
        if (f->value("size", uint64_t{0}) > 0) {
          line += fmt::format(" {} bytes", f->value("size", uint64_t{0}));
        }
        if (f->contains("error")) {
          line += fmt::format(" BLOCKED: {}", f->value("error", ""));
          if (f->contains("rule")) {
            line += fmt::format(" (rule {})", f->value("rule", ""));
          }
        }
        fmt::print("{}\n", line);
        continue;
      }
      if (!e.contains("network")) {
        continue;
      }
      const auto& n = e["network"];
      std::time_t t = e.value("timestamp", int64_t{0});
      char when[32] = {};
      (void)std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", std::localtime(&t));
      std::string line = fmt::format("{} {} {} {}", when, n.value("method", "-"),
                                     n.value("url", ""), n.value("status_code", 0));
      if (n.value("blocked", false)) {
        line += fmt::format(" BLOCKED: {}", n.value("block_reason", ""));
      }
      fmt::print("{}\n", line);
    }
    (void)std::fflush(stdout);
  };
  // Only what was appended since the last look is read (the file may hold megabytes). A new
  // inode (or a shorter file) means it was rotated: the rest of its old self is in `.1`.
  struct Tail {
    ino_t inode = 0;
    bool rotated = false;
    std::string data;
  };
  auto tail = [](const std::string& file, size_t from, ino_t inode) -> std::optional<Tail> {
    auto fd = openFile(file, O_RDONLY | O_CLOEXEC);
    struct stat st {};
    if (!fd || ::fstat(fd->get(), &st) != 0) {
      return std::nullopt;
    }
    const auto size = static_cast<size_t>(st.st_size);
    Tail t;
    t.inode = st.st_ino;
    t.rotated = (inode != 0 && st.st_ino != inode) || size < from;
    if (!t.rotated && size > from) {
      t.data.resize(size - from);
      ssize_t n = ::pread(fd->get(), t.data.data(), t.data.size(), static_cast<off_t>(from));
      t.data.resize(n > 0 ? static_cast<size_t>(n) : 0);
    }
    return t;
  };
  ino_t inode = 0;
  for (;;) {
    auto text = tail(path, offset, inode);
    if (text && text->rotated) {
      if (auto older = tail(path + ".1", offset, inode); older && !older->rotated) {
        partial += older->data;  // the old file, renamed: same inode, read on from `offset`
      }
      offset = 0;
      text = tail(path, 0, 0);
    }
    if (text) {
      inode = text->inode;
      partial += text->data;
      offset += text->data.size();
    }
    drain();
    if (!follow) {
      return ok();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

Status killCommand(const std::vector<std::string>& ids, bool all) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  std::vector<std::string> targets = ids;
  if (all) {
    ML_ASSIGN_OR_RETURN(auto list, store.listSandboxes());
    for (const auto& r : list) {
      targets.push_back(r.id);
    }
  }
  if (targets.empty()) {
    return makeError(Errc::InvalidSpec, "sandbox ID required (or use --all)");
  }
  for (const std::string& id : targets) {
    ML_ASSIGN_OR_RETURN(auto r, runtime::findSandbox(store, id));
    runtime::stop(store, r, root);
    (void)store.updateSandboxStatus(r.id, state::SandboxStatus::Stopped, std::nullopt);
    fmt::print("Killed {}\n", id);
  }
  return ok();
}

Status rmCommand(const std::vector<std::string>& ids, bool force) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  for (const std::string& id : ids) {
    ML_ASSIGN_OR_RETURN(auto r, runtime::findSandbox(store, id));
    if (observedStatus(store, r) == state::SandboxStatus::Running && supervisorAlive(r)) {
      if (!force) {
        return makeError(
            Errc::Conflict,
            fmt::format("sandbox {} is running; `matchlock kill {}` first or use -f", id, id));
      }
      runtime::stop(store, r, root);
    }
    ML_RETURN_IF_ERROR(runtime::remove(store, r, root, false));
    fmt::print("Removed {}\n", id);
  }
  return ok();
}

Status pruneCommand() {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  ML_ASSIGN_OR_RETURN(auto list, store.listSandboxes());
  int pruned = 0;
  for (const auto& r : list) {
    if (observedStatus(store, r) == state::SandboxStatus::Running && supervisorAlive(r)) {
      continue;
    }
    ML_RETURN_IF_ERROR(runtime::remove(store, r, root, false));
    fmt::print("Pruned {}\n", r.id);
    ++pruned;
  }
  fmt::print("Pruned {} sandbox{}\n", pruned, pruned == 1 ? "" : "es");
  return ok();
}

Result<supervisor::Config> readSupervisorConfig(const std::string& config_path) {
  ML_ASSIGN_OR_RETURN(std::string text, readFile(config_path));
  auto json = nlohmann::json::parse(text, nullptr, false);
  if (json.is_discarded()) {
    return makeError(Errc::InvalidSpec, fmt::format("{}: not JSON", config_path));
  }
  return supervisor::configFromJson(json);
}

Status superviseCommand(const std::string& config_path, int secrets_fd) {
  ML_ASSIGN_OR_RETURN(auto config, readSupervisorConfig(config_path));
  config.secrets_fd = secrets_fd;
  Status st = supervisor::run(config);
  if (supervisor::ownerGone(config)) {
    // The `matchlock rpc` server that owned the sandbox died without closing it: nothing of the
    // sandbox may outlive it (its network and VFS went with run()).
    auto store = state::Store::open(config.state_db);
    std::string root = std::filesystem::path(config.run_dir).parent_path().string();
    if (store) {
      if (auto record = store->getSandbox(config.sandbox_id); record) {
        (void)runtime::remove(*store, *record, root, false);
      }
    }
  }
  return st;
}

void addExitCode(CommandContext& ctx, Result<int> r) {
  if (r) {
    ctx.exit_code = *r;
  } else {
    ctx.exit_code = reportError(r.error());
  }
}

}  // namespace

void addVmCommands(CLI::App& app, CommandContext& ctx) {
  auto run = std::make_shared<RunOptions>();
  auto* r = app.add_subcommand("run",
                               "Run a command in a new sandbox (removed afterwards unless "
                               "--rm=false or -d)");
  r->add_option("--image", run->image, "Image (local store or registry reference)")->required();
  r->add_option("-e,--env", run->env, "KEY=VALUE, or KEY to copy from this environment")
      ->allow_extra_args(false);
  r->add_option("-w,--workdir", run->workdir, "Working directory in the sandbox");
  r->add_option("-u,--user", run->user, "uid, uid:gid, name or name:group");
  r->add_option("--cpus", run->cpus, "vCPUs (fractions allowed)");
  r->add_option("--memory", run->memory, "Memory in MiB");
  r->add_option("--disk-size", run->disk, "Writable disk in MiB");
  r->add_option("--hostname", run->hostname, "Guest hostname (default: the sandbox ID)");
  r->add_flag("--privileged", run->privileged,
              "Keep every capability in the guest's execs: no capability cut, no_new_privs or "
              "seccomp filter (they still get their own PID and mount namespaces)");
  r->add_option("--accel", run->accel, "kvm, tcg or auto (MATCHLOCK_ACCEL)")
      ->check(CLI::IsMember({"kvm", "tcg", "auto"}));
  r->add_option("--boot-timeout", run->boot_timeout, "Seconds to wait for the guest to boot");
  r->add_flag("--rm", run->rm,
              "Remove the sandbox when the command ends (default; --rm=false keeps it)");
  r->add_flag("-d,--detach", run->detach, "Start in the background and print the sandbox ID");
  r->add_flag("-i,--interactive", run->interactive, "Forward stdin");
  r->add_flag("-t,--tty", run->tty, "Allocate a terminal (with -i)");
  r->add_option("--allow-host", run->allow_hosts,
                "Allowed egress host pattern (repeatable, comma lists; empty = all public hosts)")
      ->allow_extra_args(false);
  r->add_option("--secret", run->secrets,
                "NAME=VALUE@host[,host] or NAME@host[,host] (value from $NAME); the guest sees a "
                "placeholder")
      ->allow_extra_args(false);
  r->add_option("--add-host", run->add_hosts, "HOST:IP added to the guest's /etc/hosts")
      ->allow_extra_args(false);
  r->add_option("--dns-servers", run->dns_servers, "Upstream resolvers of the sandbox resolver")
      ->allow_extra_args(false);
  r->add_option("--mtu", run->mtu, "Guest NIC MTU");
  r->add_flag("--no-network", run->no_network, "No NIC at all (only lo)");
  r->add_flag("--network-intercept", run->network_intercept,
              "Accepted for upstream compatibility: every sandbox network is intercepted");
  r->add_flag("--allow-private", run->allow_private,
              "Do not block private, loopback, link-local and metadata ranges");
  r->add_option("--upstream-ca", run->upstream_ca,
                "Extra CA bundle trusted for upstream TLS (verification is never off)");
  r->add_option("-v,--volume", run->volumes,
                "HOST:GUEST[:overlay|host_fs|ro] host path served into the guest (repeatable)")
      ->allow_extra_args(false);
  r->add_option("--disk", run->disks,
                "Raw ext4 disk HOST_PATH:GUEST_MOUNT[:ro], or a named volume "
                "@VOLUME:GUEST_MOUNT[:ro] (repeatable)")
      ->allow_extra_args(false);
  r->add_option("--workspace", run->workspace,
                "Guest directory relative -v targets are joined onto (default /workspace)");
  r->add_option("-p,--publish", run->publish,
                "[LOCAL:]REMOTE: forward a host port to the sandbox's 127.0.0.1 (repeatable)");
  r->add_option("--address", run->addresses,
                "Bind address of published ports (repeatable, comma lists; default 127.0.0.1)");
  r->add_option("command", run->command, "Command and arguments (after --)");
  r->callback([run, &ctx] { addExitCode(ctx, runCommand(*run)); });

  auto ex = std::make_shared<ExecOptions>();
  auto* e = app.add_subcommand("exec", "Run a command in a running sandbox");
  e->add_option("id", ex->id, "Sandbox ID")->required();
  e->add_option("-w,--workdir", ex->workdir, "Working directory");
  e->add_option("-u,--user", ex->user, "User");
  e->add_flag("-i,--interactive", ex->interactive, "Forward stdin");
  e->add_flag("-t,--tty", ex->tty, "Allocate a terminal (with -i)");
  e->add_option("command", ex->command, "Command and arguments (after --)");
  e->callback([ex, &ctx] { addExitCode(ctx, execCommand(*ex)); });

  auto list_output = std::make_shared<std::string>("human");
  auto running = std::make_shared<bool>(false);
  auto* l = app.add_subcommand("list", "List sandboxes");
  l->alias("ls");
  l->add_option("-o,--output", *list_output, "human or json")
      ->check(CLI::IsMember({"human", "json"}));
  l->add_flag("--running", *running, "Only running sandboxes");
  l->callback([list_output, running, &ctx] { ctx.finish(listCommand(*list_output, *running)); });

  auto inspect_id = std::make_shared<std::string>();
  auto* i = app.add_subcommand("inspect", "Show a sandbox's record, VM and resources as JSON");
  i->add_option("id", *inspect_id, "Sandbox ID")->required();
  i->callback([inspect_id, &ctx] { ctx.finish(inspectCommand(*inspect_id)); });

  auto log_id = std::make_shared<std::string>();
  auto follow = std::make_shared<bool>(false);
  auto main_log = std::make_shared<bool>(false);
  auto* lg = app.add_subcommand("log", "Print a sandbox's console log (or its main process's)");
  lg->add_option("id", *log_id, "Sandbox ID, project/name or name")->required();
  lg->add_flag("-f,--follow", *follow, "Keep printing as the log grows");
  lg->add_flag("-m,--main", *main_log, "The main process's output (the spec's command)");
  lg->callback(
      [log_id, follow, main_log, &ctx] { ctx.finish(logCommand(*log_id, *follow, *main_log)); });

  auto kill_ids = std::make_shared<std::vector<std::string>>();
  auto kill_all = std::make_shared<bool>(false);
  auto* k = app.add_subcommand("kill", "Stop sandboxes (clean guest power-off, then force)");
  k->add_option("id", *kill_ids, "Sandbox IDs");
  k->add_flag("--all", *kill_all, "Every sandbox");
  k->callback([kill_ids, kill_all, &ctx] { ctx.finish(killCommand(*kill_ids, *kill_all)); });

  auto rm_ids = std::make_shared<std::vector<std::string>>();
  auto rm_force = std::make_shared<bool>(false);
  auto* rmc = app.add_subcommand("rm", "Remove stopped sandboxes (their disks, logs and records)");
  rmc->alias("remove");
  rmc->add_option("id", *rm_ids, "Sandbox IDs")->required();
  rmc->add_flag("-f,--force", *rm_force, "Stop running sandboxes first");
  rmc->callback([rm_ids, rm_force, &ctx] { ctx.finish(rmCommand(*rm_ids, *rm_force)); });

  auto* p = app.add_subcommand("prune", "Remove every sandbox that is not running");
  p->callback([&ctx] { ctx.finish(pruneCommand()); });

  auto al = app.add_subcommand("allow-list", "Change a running sandbox's egress allow-list");
  al->require_subcommand(1);
  for (const char* action : {"add", "delete"}) {
    auto al_id = std::make_shared<std::string>();
    auto al_hosts = std::make_shared<std::vector<std::string>>();
    auto* sub = al->add_subcommand(action, std::string(action) + " host patterns");
    sub->add_option("id", *al_id, "Sandbox ID, project/name or name")->required();
    sub->add_option("hosts", *al_hosts, "Host patterns (comma lists allowed)")->required();
    std::string act = action;
    sub->callback(
        [act, al_id, al_hosts, &ctx] { ctx.finish(allowListCommand(act, *al_id, *al_hosts)); });
  }

  auto ev_id = std::make_shared<std::string>();
  auto ev_follow = std::make_shared<bool>(false);
  auto ev_output = std::make_shared<std::string>("human");
  auto* evc = app.add_subcommand("events", "A sandbox's network events");
  evc->add_option("id", *ev_id, "Sandbox ID, project/name or name")->required();
  evc->add_flag("-f,--follow", *ev_follow, "Keep printing new events");
  evc->add_option("-o,--output", *ev_output, "human or json (upstream's event objects)")
      ->check(CLI::IsMember({"human", "json"}));
  evc->callback([ev_id, ev_follow, ev_output, &ctx] {
    ctx.finish(eventsCommand(*ev_id, *ev_follow, *ev_output == "json"));
  });

  auto main_config = std::make_shared<std::string>();
  auto* mp = app.add_subcommand("__main", "");  // internal: a sandbox's main process runner
  mp->group("");
  mp->add_option("--config", *main_config, "vm.json")->required();
  mp->callback([main_config, &ctx] {
    auto config = readSupervisorConfig(*main_config);
    ctx.finish(config ? runtime::runMainProcess(*config) : Status(makeError(config.error())));
  });

  auto sup_config = std::make_shared<std::string>();
  auto* s = app.add_subcommand("__supervise", "");  // internal: the per-sandbox supervisor
  s->group("");                                     // hidden from --help
  s->add_option("--config", *sup_config, "vm.json")->required();
  auto sup_secrets_fd = std::make_shared<int>(-1);
  s->add_option("--secrets-fd", *sup_secrets_fd, "inherited pipe with the secret values");
  s->callback([sup_config, sup_secrets_fd, &ctx] {
    ctx.finish(superviseCommand(*sup_config, *sup_secrets_fd));
  });
}

}  // namespace matchlock::cli
