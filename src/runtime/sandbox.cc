// SPDX-License-Identifier: Apache-2.0
#include "runtime/sandbox.h"

#include <fmt/format.h>
#include <signal.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/fault.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/strings.h"
#include "health/checker.h"
#include "image/store.h"
#include "ml_kernel_key.h"
#include "net/sandbox_network.h"
#include "runtime/exec_client.h"
#include "runtime/secrets.h"
#include "runtime/volumes.h"
#include "spec/normalize.h"
#include "supervisor/supervisor.h"
#include "sys/cgroup.h"
#include "sys/netns.h"
#include "sys/process.h"
#include "sys/process_ref.h"
#include "vfs/sandbox_vfs.h"
#include "vm/initramfs.h"
#include "vm/qemu/qemu.h"

namespace matchlock::runtime {
namespace {

namespace fs = std::filesystem;

bool alive(const std::optional<sys::ProcessRef>& ref) {
  return ref && sys::isAlive(*ref);
}

std::string upperDiskOf(const std::string& run_dir, const LaunchOptions& options) {
  return options.data_disk.empty() ? run_dir + "/upper.ext4" : options.data_disk;
}

/// `spec` as the record keeps it: normalized JSON, its hashes, the spec file's absolute path.
state::SandboxSpecUpdate appliedSpecOf(const spec::SandboxSpec& spec,
                                       std::optional<std::string> secrets_hash,
                                       std::optional<std::string> image_digest) {
  state::SandboxSpecUpdate applied;
  if (!spec.source_file.empty()) {
    std::error_code ec;
    applied.source_file = fs::absolute(spec.source_file, ec).string();
  }
  applied.spec_json = spec::toJson(spec).dump();
  applied.spec_hash = spec::specHash(spec);
  applied.group_hashes = spec::groupHashes(spec);
  applied.secrets_hash = std::move(secrets_hash);
  applied.image_digest = std::move(image_digest);
  return applied;
}

}  // namespace

Result<std::string> runRoot() {
  ML_ASSIGN_OR_RETURN(std::string home, matchlockHome());
  std::string root = home + "/run";
  ML_RETURN_IF_ERROR(makeDirs(root, 0700));
  return root;
}

std::string runDirOf(const std::string& run_root, const std::string& id) {
  return run_root + "/" + id;
}

Result<std::string> projectDataDir(const std::string& project) {
  ML_ASSIGN_OR_RETURN(std::string home, matchlockHome());
  return fmt::format("{}/data/{}", home, project);
}

Result<std::string> dataDirOf(const std::string& project, const std::string& name) {
  ML_ASSIGN_OR_RETURN(std::string dir, projectDataDir(project));
  return dir + "/" + name;
}

std::string newSandboxId() {
  unsigned char bytes[4] = {};
  if (::getrandom(bytes, sizeof(bytes), 0) != static_cast<ssize_t>(sizeof(bytes))) {
    auto now = std::chrono::steady_clock::now().time_since_epoch().count();
    std::memcpy(bytes, &now, sizeof(bytes));
  }
  return "vm-" + toHex(std::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

Result<std::string> findKernel() {
  if (const char* env = std::getenv("MATCHLOCK_KERNEL"); env != nullptr && *env != '\0') {
    if (::access(env, R_OK) != 0) {
      return makeError(Errc::NotFound, fmt::format("MATCHLOCK_KERNEL={}: cannot read it", env),
                       errno);
    }
    return std::string(env);
  }
  ML_ASSIGN_OR_RETURN(std::string cache, cacheDir());
  std::string path = fmt::format("{}/kernels/{}/vmlinux", cache, kKernelKey);
  if (::access(path.c_str(), R_OK) == 0) {
    return path;
  }
  return makeError(Errc::NotFound,
                   fmt::format("guest kernel not found at {}: build it with guest/kernel/build.sh "
                               "(scripts/setup does) or set MATCHLOCK_KERNEL",
                               path));
}

Result<std::string> findGuest() {
  if (const char* env = std::getenv("MATCHLOCK_GUEST"); env != nullptr && *env != '\0') {
    return std::string(env);
  }
  std::error_code ec;
  fs::path self = fs::read_symlink("/proc/self/exe", ec);
  std::string path = (self.parent_path() / "matchlock-guest").string();
  if (!ec && ::access(path.c_str(), X_OK) == 0) {
    return path;
  }
  return makeError(Errc::NotFound,
                   "matchlock-guest not found next to matchlock; set "
                   "MATCHLOCK_GUEST");
}

Result<BootAssets> resolveBootAssets(const std::string& accel_name) {
  BootAssets assets;
  ML_ASSIGN_OR_RETURN(assets.kernel, findKernel());
  ML_ASSIGN_OR_RETURN(std::string guest, findGuest());
  ML_ASSIGN_OR_RETURN(std::string cache, cacheDir());
  ML_ASSIGN_OR_RETURN(assets.initramfs, vm::ensureInitramfs(guest, cache + "/initramfs"));
  ML_ASSIGN_OR_RETURN(vm::Accel accel, vm::parseAccel(accel_name));
  assets.accel =
      vm::qemu::resolveAccel(accel, "qemu-system-x86_64", assets.kernel, assets.initramfs, cache);
  return assets;
}

std::map<std::string, std::string> imageEnv(const image::ImageConfig& config) {
  std::map<std::string, std::string> env;
  for (const std::string& kv : config.env) {
    size_t eq = kv.find('=');
    env[kv.substr(0, eq)] = eq == std::string::npos ? "" : kv.substr(eq + 1);
  }
  return env;
}

std::optional<supervisor::MainProcess> mainProcessOf(const spec::SandboxSpec& spec,
                                                     const image::ImageConfig& image) {
  if (!spec.command && !spec.entrypoint) {
    return std::nullopt;
  }
  supervisor::MainProcess m;
  if (spec.entrypoint) {
    m.argv = *spec.entrypoint;
  } else {
    m.argv = image.entrypoint;
  }
  if (spec.command) {
    m.argv.insert(m.argv.end(), spec.command->begin(), spec.command->end());
  }
  if (m.argv.empty()) {
    return std::nullopt;
  }
  m.env = imageEnv(image);
  for (const auto& [k, v] : spec.env) {
    m.env[k] = v;
  }
  m.cwd = spec.workdir.value_or(image.working_dir);
  m.user = spec.user.value_or(image.user);
  m.restart = std::string(spec::toString(spec.restart));
  return m;
}

ExecDefaults execDefaults(const state::SandboxRecord& record) {
  ExecDefaults d;
  auto spec = nlohmann::json::parse(record.spec_json, nullptr, false);
  if (!spec.is_object()) {
    return d;
  }
  if (auto root = image::Store::defaultRoot(); root) {
    if (auto store = image::Store::open(*root); store) {
      auto rec = store->resolveImage(spec.value("image", ""));
      if (auto config = rec ? image::loadImageConfig(*store, *rec) : makeError(rec.error());
          config) {
        d.env = imageEnv(*config);
        d.cwd = config->working_dir;
        d.user = config->user;
      }
    }
  }
  for (const auto& [k, v] : spec.value("env", std::map<std::string, std::string>{})) {
    d.env[k] = v;
  }
  if (std::string cwd = spec.value("workdir", ""); !cwd.empty()) {
    d.cwd = cwd;
  }
  if (std::string user = spec.value("user", ""); !user.empty()) {
    d.user = user;
  }
  return d;
}

Result<std::string> launch(state::Store& store, const spec::SandboxSpec& spec,
                           const image::PreparedImage& image, const BootAssets& assets,
                           const LaunchOptions& options,
                           const std::optional<std::string>& existing_id) {
  const std::string id =
      existing_id ? *existing_id : (options.id.empty() ? newSandboxId() : options.id);
  ML_ASSIGN_OR_RETURN(std::string root, runRoot());
  const std::string run_dir = runDirOf(root, id);
  const std::string upper = upperDiskOf(run_dir, options);
  const std::string hostname = spec.hostname.empty() ? spec.name : spec.hostname;

  // 1. The record first, status "creating": from here on a crash leaves a row that observation
  //    reports as an interrupted launch, so the next `up` or `prune` cleans up.
  state::SandboxSpecUpdate applied =
      appliedSpecOf(spec, options.secrets_hash, options.image_digest);
  if (existing_id) {
    ML_RETURN_IF_ERROR(store.setSupervisor(id, std::nullopt));
    ML_RETURN_IF_ERROR(store.updateSandboxStatus(id, state::SandboxStatus::Creating, std::nullopt));
    ML_RETURN_IF_ERROR(store.updateSandboxSpec(id, applied));
  } else {
    state::SandboxRecord rec;
    rec.id = id;
    rec.project = options.project;
    rec.name = spec.name.empty() ? id : spec.name;
    rec.source_file = applied.source_file;
    rec.spec_json = std::move(applied.spec_json);
    rec.spec_hash = std::move(applied.spec_hash);
    rec.group_hashes = std::move(applied.group_hashes);
    rec.secrets_hash = applied.secrets_hash;
    rec.image_digest = applied.image_digest;
    rec.status = state::SandboxStatus::Creating;
    ML_RETURN_IF_ERROR(store.createSandbox(rec));
  }
  faultPoint("launch:recorded");

  // From here on a failure must leave nothing running: a new record goes away again, an existing
  // one is torn down and marked failed with the reason.
  auto fail = [&](Error e) -> Result<std::string> {
    if (auto current = store.getSandbox(id); current) {
      if (existing_id) {
        (void)teardown(store, *current, root);
        (void)store.updateSandboxStatus(id, state::SandboxStatus::Failed, e.message());
      } else {
        (void)remove(store, *current, root, false);
      }
    }
    return makeError(std::move(e));
  };

  // 2. Intents before the objects exist.
  for (auto [kind, name] : {std::pair{state::ResourceKind::RunDir, run_dir},
                            std::pair{state::ResourceKind::Disk, upper}}) {
    if (auto intent = store.recordResourceIntent(id, kind, name, "{}"); !intent) {
      return fail(std::move(intent).error());
    }
  }
  // The network's kernel objects: a subnet first (unique in the DB), then the namespace, TAP
  // and table names, all recorded before the supervisor creates anything.
  std::optional<state::SubnetAllocation> subnet;
  const net::NetworkNames names = net::networkNames(id);
  if (!spec.network.no_network) {
    auto alloc = store.allocateSubnet(id);
    if (!alloc) {
      return fail(std::move(alloc).error());
    }
    subnet = *alloc;
    faultPoint("launch:subnet");
    for (auto [kind, name] : {std::pair{state::ResourceKind::Netns, names.netns},
                              std::pair{state::ResourceKind::Tap, names.tap},
                              std::pair{state::ResourceKind::NftTable, names.table}}) {
      if (auto intent = store.recordResourceIntent(id, kind, name, "{}"); !intent) {
        return fail(std::move(intent).error());
      }
    }
  }
  faultPoint("launch:intents");
  if (Status st = makeDirs(run_dir, 0700); !st) {
    return fail(std::move(st).error());
  }
  std::string events_path;
  const bool vfs_mounts = std::ranges::any_of(
      spec.mounts, [](const spec::Mount& m) { return !spec::isBlockMount(m.mode); });
  if (subnet || vfs_mounts) {
    auto home = matchlockHome();
    if (!home) {
      return fail(std::move(home).error());
    }
    if (Status st = makeDirs(*home + "/events", 0700); !st) {
      return fail(std::move(st).error());
    }
    events_path = supervisor::eventsPath(*home, id);
  }
  if (!options.data_disk.empty()) {
    if (Status st = makeDirs(fs::path(options.data_disk).parent_path().string(), 0700); !st) {
      return fail(std::move(st).error());
    }
  }
  (void)store.markResourceCreated(state::ResourceKind::RunDir, run_dir);

  supervisor::Config cfg;
  cfg.owner = options.owner;
  cfg.sandbox_id = id;
  cfg.run_dir = run_dir;
  cfg.vm.kernel = assets.kernel;
  cfg.vm.initramfs = assets.initramfs;
  cfg.vm.cpus = spec.cpus;
  cfg.vm.memory_mib = spec.memory_mib;
  cfg.vm.accel = assets.accel;
  cfg.vm.disks = {{image.rootfs, "image", true}, {upper, "upper", false}};
  cfg.vm.kernel_params = {"matchlock.root=serial:image", "matchlock.upper=serial:upper",
                          "matchlock.hostname=" + hostname,
                          fmt::format("matchlock.cpus={}", spec.cpus)};
  if (spec.privileged) {
    // Execs keep their namespaces but not the capability cut, no_new_privs or seccomp.
    cfg.vm.kernel_params.emplace_back("matchlock.privileged=1");
  }
  // The spec's working directory exists in the guest even when the image lacks it (a kernel
  // parameter cannot hold whitespace: such a path is left to the image).
  if (spec.workdir && spec.workdir->find_first_of(" \t\n") == std::string::npos) {
    cfg.vm.kernel_params.push_back("matchlock.workdir=" + *spec.workdir);
  }
  cfg.main_process = mainProcessOf(spec, image.config);
  cfg.upper_disk_mib = spec.disk_mib;
  cfg.upper_disk_path = upper;
  cfg.keep_upper_disk = !options.data_disk.empty();
  cfg.boot_timeout = options.boot_timeout;
  cfg.ports = portBindingsOf(spec);
  cfg.healthcheck = healthCheckOf(spec);
  cfg.add_hosts = spec.network.add_hosts;
  cfg.boot_config_path = run_dir + "/boot-config.json";
  if (subnet) {
    net::NetworkConfig& n = cfg.network;
    n.enabled = true;
    n.names = names;
    n.gateway = subnet->gateway;
    n.guest_ip = subnet->guest_ip;
    n.prefix = store.subnetPool().subnetPrefix();
    n.mtu = spec.network.mtu;
    n.allow_hosts = spec.network.allow_hosts;
    n.rules = spec.network.rules;
    n.callback_socket = spec.network.callback_socket;
    n.block_private_ips = spec.network.block_private_ips;
    n.dns_servers = spec.network.dns_servers;
    n.upstream_ca_file = spec.network.upstream_ca;
    for (const auto& sec : spec.secrets) {
      n.secrets.push_back(net::SecretBinding{sec.name, sec.hosts});
    }
    n.events_path = events_path;
  }
  // Mounts: the supervisor serves them (docs/vfs.md). An overlay's upper layer lives with the
  // sandbox's data: a declared sandbox keeps it across recreate (down -v deletes it), an ad-hoc
  // one has it in the run dir.
  const fs::path overlay_root =
      (options.data_disk.empty() ? fs::path(run_dir) : fs::path(options.data_disk).parent_path()) /
      "overlays";
  // Named volumes and raw disks: virtio-blk disks the guest init mounts by serial before the
  // agent starts (matchlock.disk.<serial>=<target>[,ro]).
  size_t disk_index = 0;
  for (const spec::Mount& m : spec.mounts) {
    if (!spec::isBlockMount(m.mode)) {
      continue;
    }
    auto image_path = diskImageOf(m);
    if (!image_path) {
      return fail(Error(Errc::NotFound,
                        fmt::format("sandbox {}: mount {}: {}", spec.name.empty() ? id : spec.name,
                                    m.target, image_path.error().message())));
    }
    if (disk_index == kMaxExtraDisks) {
      return fail(Error(Errc::InvalidSpec,
                        fmt::format("sandbox {}: at most {} volume and disk mounts",
                                    spec.name.empty() ? id : spec.name, kMaxExtraDisks)));
    }
    for (const auto& d : cfg.vm.disks) {
      if (d.path == *image_path) {
        return fail(
            Error(Errc::InvalidSpec, fmt::format("sandbox {}: {} is attached twice",
                                                 spec.name.empty() ? id : spec.name, *image_path)));
      }
    }
    const std::string serial = fmt::format("disk{}", disk_index++);
    cfg.vm.disks.push_back({*image_path, serial, m.readonly});
    cfg.vm.kernel_params.push_back(
        fmt::format("matchlock.disk.{}={}{}", serial, m.target, m.readonly ? ",ro" : ""));
  }
  for (const spec::Mount& m : spec.mounts) {
    if (spec::isBlockMount(m.mode)) {
      continue;
    }
    vfs::MountConfig mc;
    mc.target = m.target;
    mc.source = m.source;
    switch (m.mode) {
      case spec::MountMode::ReadWrite:
        mc.kind = vfs::MountKind::ReadWrite;
        break;
      case spec::MountMode::ReadOnly:
        mc.kind = vfs::MountKind::ReadOnly;
        break;
      case spec::MountMode::Overlay:
        mc.kind = vfs::MountKind::Overlay;
        break;
      case spec::MountMode::Memory:
        mc.kind = vfs::MountKind::Memory;
        break;
      case spec::MountMode::Volume:
      case spec::MountMode::Disk:
        continue;  // attached as disks above
    }
    static const std::map<std::string, int, std::less<>> kErrnos = {
        {"EPERM", EPERM}, {"EACCES", EACCES}, {"EROFS", EROFS},  {"ENOENT", ENOENT},
        {"EIO", EIO},     {"ENOSPC", ENOSPC}, {"EEXIST", EEXIST}};
    mc.hooks.emit_events = m.emit_events;
    for (const spec::MountRule& r : m.rules) {
      vfs::HookRule rule;
      rule.name = r.name;
      rule.path = r.path;
      rule.block = r.block;
      auto e = kErrnos.find(r.error);
      rule.error = e != kErrnos.end() ? e->second : EPERM;
      for (const std::string& op : r.ops) {
        if (auto o = vfs::opFromName(op)) {
          rule.ops.push_back(*o);
        }
      }
      mc.hooks.rules.push_back(std::move(rule));
    }
    if (mc.kind != vfs::MountKind::Memory) {
      std::error_code exists_ec;
      if (!fs::exists(mc.source, exists_ec)) {
        return fail(Error(Errc::NotFound,
                          fmt::format("sandbox {}: mount {}: source {} does not exist",
                                      spec.name.empty() ? id : spec.name, m.target, m.source)));
      }
    }
    if (mc.kind == vfs::MountKind::Overlay) {
      std::string key = m.target.substr(1);
      std::replace(key.begin(), key.end(), '/', '_');
      mc.overlay_dir = (overlay_root / key).string();
      if (Status st = makeDirs(overlay_root.string(), 0700); !st) {
        return fail(std::move(st).error());
      }
    }
    cfg.vfs.mounts.push_back(std::move(mc));
  }
  cfg.vfs.events_path = events_path;
  if (const char* t = std::getenv("MATCHLOCK_VFS_TRANSPORT"); t != nullptr && *t != '\0') {
    auto transport = vfs::transportFromString(t);
    if (!transport) {
      return fail(Error(Errc::InvalidSpec,
                        fmt::format("MATCHLOCK_VFS_TRANSPORT={}: expected virtiofs or stream", t)));
    }
    cfg.vfs.transport = *transport;
  }
  std::map<std::string, std::string> resolved;
  const std::map<std::string, std::string>* values = options.secret_values;
  if (values == nullptr && !spec.secrets.empty()) {
    auto r = resolveSecretValues(spec);
    if (!r) {
      return fail(std::move(r).error());
    }
    resolved = std::move(*r);
    values = &resolved;
  }
  if (auto db = state::Store::defaultPath(); db) {
    cfg.state_db = *db;
  } else {
    return fail(std::move(db).error());
  }
  if (Status st = writeFileAtomic(run_dir + "/vm.json", supervisor::toJson(cfg).dump(2), 0600);
      !st) {
    return fail(std::move(st).error());
  }

  // 3. The supervisor, in its own session so that it outlives this process and its terminal.
  //    It records itself in the DB as its first step, so even a crash right after the spawn
  //    leaves it observable and killable.
  std::error_code ec;
  std::string self = fs::read_symlink("/proc/self/exe", ec).string();
  sys::SpawnOptions sopts;
  sopts.new_session = true;
  sopts.stdout_path = run_dir + "/supervisor.log";
  sopts.stderr_path = sopts.stdout_path;
  auto secrets_pipe = Pipe::create();
  if (!secrets_pipe) {
    return fail(std::move(secrets_pipe).error());
  }
  sopts.inherit_fds = {secrets_pipe->read.get()};
  // Not our environment: a secret read from an env var (or any token of the caller's) must not
  // sit in the supervisor's, or QEMU's, /proc/PID/environ. The values come down the pipe.
  sopts.env = sys::minimalEnvironment();
  auto sup = sys::ChildProcess::spawn(
      {self, "--log-level", "info", "__supervise", "--config", run_dir + "/vm.json", "--secrets-fd",
       std::to_string(secrets_pipe->read.get())},
      sopts);
  if (!sup) {
    return fail(std::move(sup).error());
  }
  secrets_pipe->read.reset();
  {
    // The values go down the pipe and nowhere else; the supervisor reads it to EOF.
    nlohmann::json j = nlohmann::json::object();
    if (values != nullptr) {
      for (const auto& [name, value] : *values) {
        j[name] = value;
      }
    }
    std::string data = j.dump();
    size_t off = 0;
    while (off < data.size()) {
      ssize_t n = ::write(secrets_pipe->write.get(), data.data() + off, data.size() - off);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n <= 0) {
        break;  // the supervisor died: its failure is recorded and reported below
      }
      off += static_cast<size_t>(n);
    }
    std::fill(data.begin(), data.end(), '\0');
    secrets_pipe->write.reset();
  }
  faultPoint("launch:spawned");
  if (Status st = store.setSupervisor(id, sys::ProcessRef{sup->pid(), sup->startTime()}); !st) {
    (void)sup->terminate(std::chrono::milliseconds(0));
    return fail(std::move(st).error());
  }
  sup->detach();  // reparented to init when we exit; its state is in the DB
  return id;
}

Status waitReady(state::Store& store, const std::string& id, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto r = store.getSandbox(id);
    if (r && r->status == state::SandboxStatus::Running) {
      return ok();
    }
    bool dead = r && r->status != state::SandboxStatus::Creating &&
                r->status != state::SandboxStatus::Pending;
    bool gone = r && r->supervisor && !sys::isAlive(*r->supervisor);
    if (!r || dead || gone) {
      if (r && r->last_error) {
        return makeError(Errc::Unavailable, *r->last_error);
      }
      // The supervisor died without recording why (a crash): its log says what it last did.
      std::string why = fmt::format("sandbox {} did not start: its supervisor exited", id);
      if (auto root = runRoot()) {
        const std::string log = runDirOf(*root, id) + "/supervisor.log";
        if (auto text = readFile(log)) {
          if (std::string tail = lastLines(*text, 5); !tail.empty()) {
            why += fmt::format("; the end of {}:\n{}", log, tail);
          }
        }
      }
      return makeError(Errc::Unavailable, why);
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return makeError(
          Errc::Unavailable,
          fmt::format("sandbox {} was not ready within {} s", id,
                      std::chrono::duration_cast<std::chrono::seconds>(timeout).count()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
}

std::string_view toString(Health health) {
  switch (health) {
    case Health::Running:
      return "running";
    case Health::Starting:
      return "starting";
    case Health::Stopped:
      return "stopped";
    case Health::Crashed:
      return "crashed";
    case Health::VmmDied:
      return "vm-died";
    case Health::Leaked:
      return "leaked";
    case Health::Failed:
      return "failed";
    case Health::Pending:
      return "interrupted";
    case Health::Unhealthy:
      return "unhealthy";
  }
  return "unknown";
}

Observation observe(state::Store& store, const state::SandboxRecord& r,
                    const std::string& run_root) {
  const bool sup_alive = alive(r.supervisor);
  const std::string error = r.last_error.value_or("");
  switch (r.status) {
    case state::SandboxStatus::Stopped:
      return {Health::Stopped, ""};
    case state::SandboxStatus::Failed:
      return {Health::Failed, error.empty() ? "start failed" : error};
    case state::SandboxStatus::Crashed:
      return {error.starts_with("VM process") ? Health::VmmDied : Health::Crashed,
              error.empty() ? "crashed" : error};
    case state::SandboxStatus::Removing:
      return {Health::Pending, "an earlier removal was interrupted"};
    case state::SandboxStatus::Pending:
    case state::SandboxStatus::Creating:
      if (!sup_alive) {
        return {Health::Pending, "an earlier launch was interrupted"};
      }
      break;
    case state::SandboxStatus::Running:
      if (!sup_alive) {
        return {Health::Crashed,
                "supervisor died (its pid and start time no longer match a live process)"};
      }
      break;
  }
  // The supervisor lives: is its VMM still there, and are the sandbox's objects?
  if (auto vm = store.getVm(r.id);
      vm && vm->process && !sys::isAlive(*vm->process) &&
      (vm->status == state::VmStatus::Starting || vm->status == state::VmStatus::Running)) {
    return {Health::VmmDied, "VM process died"};
  }
  std::error_code ec;
  const std::string run_dir = runDirOf(run_root, r.id);
  if (!fs::is_directory(run_dir, ec)) {
    return {Health::Leaked, fmt::format("run dir {} is gone", run_dir)};
  }
  if (r.status == state::SandboxStatus::Running) {
    if (auto resources = store.listResources(r.id); resources) {
      for (const auto& res : *resources) {
        if (res.kind == state::ResourceKind::Disk && !fs::exists(res.name, ec)) {
          return {Health::Leaked, fmt::format("disk {} is gone", res.name)};
        }
        if (res.kind == state::ResourceKind::Netns && res.state == state::ResourceState::Created &&
            !sys::netnsExists(res.name)) {
          return {Health::Leaked, fmt::format("network namespace {} is gone", res.name)};
        }
      }
    }
    if (r.health && *r.health == "unhealthy") {
      return {Health::Unhealthy, "unhealthy: " + r.health_detail.value_or("healthcheck failed")};
    }
    return {Health::Running, ""};
  }
  return {Health::Starting, ""};
}

void killProcesses(state::Store& store, const state::SandboxRecord& r) {
  std::vector<sys::ProcessRef> refs;
  if (r.supervisor) {
    refs.push_back(*r.supervisor);
  }
  // The record passed in may predate the supervisor recording itself: re-read it.
  if (auto fresh = store.getSandbox(r.id);
      fresh && fresh->supervisor && !(r.supervisor && *r.supervisor == *fresh->supervisor)) {
    refs.push_back(*fresh->supervisor);
  }
  if (auto vm = store.getVm(r.id); vm && vm->process) {
    refs.push_back(*vm->process);
  }
  // A supervisor removing its own sandbox (its owner died) must not kill itself.
  std::erase_if(refs, [](const sys::ProcessRef& ref) { return ref.pid == ::getpid(); });
  for (const auto& ref : refs) {
    if (sys::isAlive(ref)) {
      (void)::kill(ref.pid, SIGKILL);
    }
  }
  for (int i = 0; i < 1000; ++i) {  // 5 s bound
    bool any = false;
    for (const auto& ref : refs) {
      any = any || sys::isAlive(ref);
    }
    if (!any) {
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::optional<health::Check> healthCheckOf(const spec::SandboxSpec& spec) {
  if (!spec.healthcheck) {
    return std::nullopt;
  }
  auto argv = health::argvOf(spec.healthcheck->test);
  if (!argv) {
    return std::nullopt;  // ["NONE"]
  }
  const auto& h = *spec.healthcheck;
  return health::Check{*argv, std::chrono::milliseconds(h.interval_ms),
                       std::chrono::milliseconds(h.timeout_ms),
                       std::chrono::milliseconds(h.start_period_ms), h.retries};
}

std::vector<ports::Binding> portBindingsOf(const spec::SandboxSpec& spec) {
  std::vector<ports::Binding> out;
  for (const auto& p : spec.ports) {
    out.push_back(
        ports::Binding{p.address, static_cast<uint16_t>(p.host), static_cast<uint16_t>(p.guest)});
  }
  return out;
}

Status updateLive(state::Store& store, const state::SandboxRecord& record,
                  const spec::SandboxSpec& spec, const std::vector<std::string>& groups,
                  const std::map<std::string, std::string>& secret_values,
                  const std::optional<std::string>& secrets_hash) {
  // A sandbox without a network has no egress to change (the spec forbids allow_hosts and
  // secrets there): its change is only recorded.
  const bool egress =
      !spec.network.no_network && std::ranges::any_of(groups, [](const std::string& g) {
        return g == "egress" || g == "secrets";
      });
  ML_ASSIGN_OR_RETURN(std::string root, runRoot());
  const std::string control = supervisor::controlSocketPath(runDirOf(root, record.id));
  auto request = [&](const nlohmann::json& req, std::string_view what) -> Result<nlohmann::json> {
    ML_ASSIGN_OR_RETURN(std::string line, controlRequestLine(control, req.dump(), 5000));
    auto reply = nlohmann::json::parse(line, nullptr, false);
    if (!reply.is_object() || !reply.value("ok", false)) {
      return makeError(
          Errc::Unavailable,
          fmt::format("sandbox {}: live {} update refused: {}", record.name, what,
                      reply.is_object() ? reply.value("error", "no reason given") : line));
    }
    return reply;
  };
  // Ports first: binding a new listener is what most often fails (a taken port), and a refused
  // set changes nothing. When the egress update after it fails, the old forwards come back.
  std::optional<nlohmann::json> ports_before;
  if (std::ranges::find(groups, "ports") != groups.end()) {
    ML_ASSIGN_OR_RETURN(auto listed, request({{"op", "ports"}, {"action", "list"}}, "ports"));
    ports_before = listed.value("ports", nlohmann::json::array());
    ML_RETURN_IF_ERROR(request(
        {{"op", "ports"}, {"action", "set"}, {"ports", ports::toJson(portBindingsOf(spec))}},
        "ports"));
  }
  if (egress) {
    nlohmann::json secrets = nlohmann::json::array();
    for (const auto& sec : spec.secrets) {
      auto it = secret_values.find(sec.name);
      if (it == secret_values.end()) {
        return makeError(Errc::Internal,
                         fmt::format("sandbox {}: secret {} has no value", record.name, sec.name));
      }
      secrets.push_back({{"name", sec.name}, {"hosts", sec.hosts}, {"value", it->second}});
    }
    nlohmann::json req = {{"op", "network_update"},
                          {"allow_hosts", spec.network.allow_hosts},
                          {"block_private_ips", spec.network.block_private_ips},
                          {"secrets", std::move(secrets)},
                          {"rules", net::toJson(spec.network.rules)},
                          {"callback_socket", spec.network.callback_socket}};
    if (auto done = request(req, "egress"); !done) {
      if (ports_before) {
        auto back =
            request({{"op", "ports"}, {"action", "set"}, {"ports", *ports_before}}, "ports");
        if (!back) {
          // Said, not hidden: the sandbox now publishes the new ports under the old egress.
          return makeError(done.error().code(),
                           fmt::format("{}; putting the previous ports back failed too: {} (the "
                                       "next up applies the spec again)",
                                       done.error().message(), back.error().message()));
        }
      }
      return makeError(std::move(done).error());
    }
    faultPoint("update:sent");
  }
  if (std::ranges::find(groups, "healthcheck") != groups.end()) {
    auto check = healthCheckOf(spec);
    ML_RETURN_IF_ERROR(request(
        {{"op", "healthcheck"}, {"healthcheck", check ? health::toJson(*check) : nlohmann::json()}},
        "healthcheck"));
  }
  state::SandboxSpecUpdate applied = appliedSpecOf(spec, secrets_hash, record.image_digest);
  if (!applied.source_file) {
    applied.source_file = record.source_file;
  }
  ML_ASSIGN_OR_RETURN(int64_t generation, store.updateSandboxSpec(record.id, applied));
  ML_LOG(runtime, info, "sandbox {}: {} applied live (generation {})", record.name,
         fmt::join(groups, ", "), generation);
  return ok();
}

void stop(state::Store& store, const state::SandboxRecord& r, const std::string& run_root) {
  // A supervisor that does not take the request (its socket gone) is not waited for.
  if (alive(r.supervisor) &&
      controlRequest(supervisor::controlSocketPath(runDirOf(run_root, r.id)), "stop", 2000)) {
    for (int i = 0; i < 400 && alive(r.supervisor); ++i) {  // 10 s for a clean power-off
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
  }
  killProcesses(store, r);
}

Status teardown(state::Store& store, const state::SandboxRecord& r, const std::string& run_root) {
  killProcesses(store, r);
  const std::string run_dir = runDirOf(run_root, r.id);
  std::error_code ec;
  // A VMM killed while it starts may still be creating its sockets in the dir for a moment
  // (ENOTEMPTY): a few short retries, bounded at half a second.
  for (int attempt = 0; attempt < 10; ++attempt) {
    ec.clear();
    fs::remove_all(run_dir, ec);
    if (!ec || ec != std::errc::directory_not_empty) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (ec) {
    return makeError(Errc::System, fmt::format("removing {}", run_dir), ec.value());
  }
  // The jailed VMM's cgroup: its supervisor removes it, unless it was killed first. A VMM just
  // killed may take a moment to leave it (EBUSY): bounded like the run dir above.
  for (int attempt = 0;; ++attempt) {
    Status st = sys::SandboxCgroup::remove(r.id);
    if (st || attempt == 9) {
      ML_RETURN_IF_ERROR(st);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ML_ASSIGN_OR_RETURN(auto resources, store.listResources(r.id));
  for (const auto& res : resources) {
    // A namespace takes its TAP and nftables table with it; objects inside the run dir are gone
    // with it; a data disk outside it is kept on purpose.
    if (res.kind == state::ResourceKind::Netns) {
      ML_RETURN_IF_ERROR(store.markResourceDeleting(res.kind, res.name));
      ML_RETURN_IF_ERROR(sys::deleteNetns(res.name));
    }
  }
  for (const auto& res : resources) {
    ML_RETURN_IF_ERROR(store.deleteResource(res.kind, res.name));
  }
  ML_ASSIGN_OR_RETURN(bool released, store.releaseSubnet(r.id));
  (void)released;
  ML_RETURN_IF_ERROR(store.deleteVm(r.id));
  return ok();
}

Status remove(state::Store& store, const state::SandboxRecord& r, const std::string& run_root,
              bool remove_data) {
  ML_RETURN_IF_ERROR(store.updateSandboxStatus(r.id, state::SandboxStatus::Removing, r.last_error));
  ML_RETURN_IF_ERROR(teardown(store, r, run_root));
  if (remove_data) {
    ML_ASSIGN_OR_RETURN(std::string data, dataDirOf(r.project, r.name));
    std::error_code ec;
    fs::remove_all(data, ec);
    if (ec) {
      return makeError(Errc::System, fmt::format("removing {}", data), ec.value());
    }
  }
  if (auto home = matchlockHome(); home) {
    const std::string events = supervisor::eventsPath(*home, r.id);
    for (const std::string& f : {events, events + ".1"}) {
      std::error_code ec;
      fs::remove(f, ec);
    }
  }
  ML_RETURN_IF_ERROR(store.deleteSandbox(r.id, state::DeleteMode::Force));
  (void)store.deleteProjectIfEmpty(r.project);
  return ok();
}

Result<state::SandboxRecord> findSandbox(state::Store& store, const std::string& ref) {
  if (auto r = store.getSandbox(ref); r || r.error().code() != Errc::NotFound) {
    return r;
  }
  if (size_t slash = ref.find('/'); slash != std::string::npos) {
    ML_ASSIGN_OR_RETURN(auto r, store.findSandbox(ref.substr(0, slash), ref.substr(slash + 1)));
    if (r) {
      return std::move(*r);
    }
  } else {
    ML_ASSIGN_OR_RETURN(auto all, store.listSandboxes());
    std::vector<state::SandboxRecord> named;
    for (auto& r : all) {
      if (r.name == ref) {
        named.push_back(std::move(r));
      }
    }
    if (named.size() == 1) {
      return std::move(named.front());
    }
    if (named.size() > 1) {
      std::vector<std::string> options;
      for (const auto& r : named) {
        options.push_back(r.project + "/" + r.name);
      }
      return makeError(Errc::Conflict, fmt::format("sandbox name '{}' is ambiguous: use one of {}",
                                                   ref, join(options, ", ")));
    }
  }
  return makeError(Errc::NotFound, fmt::format("sandbox {} not found (see matchlock list)", ref));
}

}  // namespace matchlock::runtime
