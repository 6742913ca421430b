// SPDX-License-Identifier: Apache-2.0
#include "supervisor/supervisor.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <list>
#include <map>
#include <memory>

#include "common/fd.h"
#include "common/log.h"
#include "common/scope_exit.h"
#include "common/strings.h"
#include "common/wipe.h"
#include "ev/loop.h"
#include "guestproto/frame.h"
#include "guestproto/mux.h"
#include "state/store.h"
#include "sys/cgroup.h"
#include "sys/ext4.h"
#include "sys/process.h"
#include "sys/process_ref.h"
#include "sys/socket_util.h"
#include "vm/qemu/qemu.h"

namespace matchlock::supervisor {

std::string controlSocketPath(const std::string& run_dir) {
  return run_dir + "/control.sock";
}
std::string vmmDirPath(const std::string& run_dir) {
  return run_dir + "/vmm";
}
std::string channelSocketPath(const std::string& run_dir) {
  return vmmDirPath(run_dir) + "/channel.sock";
}
std::string mainLogPath(const std::string& run_dir) {
  return run_dir + "/main.log";
}

std::string consoleLogPath(const std::string& run_dir) {
  return vmmDirPath(run_dir) + "/console.log";
}

std::string eventsPath(const std::string& home, const std::string& sandbox_id) {
  return home + "/events/" + sandbox_id + ".jsonl";
}

nlohmann::json toJson(const Config& c) {
  nlohmann::json disks = nlohmann::json::array();
  for (const auto& d : c.vm.disks) {
    disks.push_back({{"path", d.path}, {"serial", d.serial}, {"readonly", d.readonly}});
  }
  return {
      {"sandbox_id", c.sandbox_id},
      {"run_dir", c.run_dir},
      {"backend", c.backend},
      {"kernel", c.vm.kernel},
      {"initramfs", c.vm.initramfs},
      {"cpus", c.vm.cpus},
      {"memory_mib", c.vm.memory_mib},
      {"disks", disks},
      {"kernel_params", c.vm.kernel_params},
      {"accel", std::string(vm::toString(c.vm.accel))},
      {"upper_disk_mib", c.upper_disk_mib},
      {"upper_disk_path", c.upper_disk_path},
      {"keep_upper_disk", c.keep_upper_disk},
      {"boot_timeout_ms", c.boot_timeout.count()},
      {"state_db", c.state_db},
      {"main_process", c.main_process ? nlohmann::json{{"argv", c.main_process->argv},
                                                       {"env", c.main_process->env},
                                                       {"cwd", c.main_process->cwd},
                                                       {"user", c.main_process->user},
                                                       {"restart", c.main_process->restart}}
                                      : nlohmann::json()},
      {"network", net::toJson(c.network)},
      {"vfs", vfs::toJson(c.vfs)},
      {"ports", ports::toJson(c.ports)},
      {"healthcheck", c.healthcheck ? health::toJson(*c.healthcheck) : nlohmann::json()},
      {"add_hosts", c.add_hosts},
      {"boot_config_path", c.boot_config_path},
      {"owner", c.owner ? nlohmann::json{{"pid", c.owner->pid}, {"start_time", c.owner->start_time}}
                        : nlohmann::json()}};
}

bool ownerGone(const Config& config) {
  return config.owner && !sys::isAlive(*config.owner);
}

Result<Config> configFromJson(const nlohmann::json& j) {
  try {
    Config c;
    c.sandbox_id = j.at("sandbox_id").get<std::string>();
    c.run_dir = j.at("run_dir").get<std::string>();
    c.backend = j.value("backend", c.backend);
    c.vm.id = c.sandbox_id;
    c.vm.kernel = j.at("kernel").get<std::string>();
    c.vm.initramfs = j.at("initramfs").get<std::string>();
    c.vm.cpus = j.value("cpus", 1.0);
    c.vm.memory_mib = j.value("memory_mib", int64_t{512});
    for (const auto& d : j.value("disks", nlohmann::json::array())) {
      c.vm.disks.push_back(vm::DiskSpec{d.at("path").get<std::string>(),
                                        d.at("serial").get<std::string>(),
                                        d.value("readonly", false)});
    }
    c.vm.kernel_params = j.value("kernel_params", std::vector<std::string>{});
    ML_ASSIGN_OR_RETURN(c.vm.accel, vm::parseAccel(j.value("accel", std::string("tcg"))));
    c.upper_disk_mib = j.value("upper_disk_mib", int64_t{0});
    c.upper_disk_path = j.value("upper_disk_path", std::string());
    c.keep_upper_disk = j.value("keep_upper_disk", false);
    c.boot_timeout = std::chrono::milliseconds(j.value("boot_timeout_ms", int64_t{60000}));
    c.state_db = j.value("state_db", std::string());
    if (auto m = j.find("main_process"); m != j.end() && m->is_object()) {
      MainProcess mp;
      mp.argv = m->at("argv").get<std::vector<std::string>>();
      mp.env = m->value("env", std::map<std::string, std::string>{});
      mp.cwd = m->value("cwd", std::string());
      mp.user = m->value("user", std::string());
      mp.restart = m->value("restart", std::string("no"));
      c.main_process = std::move(mp);
    }
    if (auto n = j.find("network"); n != j.end() && n->is_object()) {
      ML_ASSIGN_OR_RETURN(c.network, net::networkConfigFromJson(*n));
    }
    if (auto v = j.find("vfs"); v != j.end() && v->is_object()) {
      ML_ASSIGN_OR_RETURN(c.vfs, vfs::vfsConfigFromJson(*v));
    }
    if (auto p = j.find("ports"); p != j.end()) {
      ML_ASSIGN_OR_RETURN(c.ports, ports::bindingsFromJson(*p));
    }
    if (auto h = j.find("healthcheck"); h != j.end() && h->is_object()) {
      ML_ASSIGN_OR_RETURN(c.healthcheck, health::checkFromJson(*h));
    }
    c.add_hosts = j.value("add_hosts", std::map<std::string, std::string>{});
    c.boot_config_path = j.value("boot_config_path", std::string());
    if (auto o = j.find("owner"); o != j.end() && o->is_object()) {
      c.owner = sys::ProcessRef{o->at("pid").get<pid_t>(), o->at("start_time").get<uint64_t>()};
    }
    c.vm.channel_socket = channelSocketPath(c.run_dir);
    c.vm.control_socket = vmmDirPath(c.run_dir) + "/qmp.sock";
    c.vm.console_log = consoleLogPath(c.run_dir);
    return c;
  } catch (const nlohmann::json::exception& e) {
    return makeError(Errc::InvalidSpec, fmt::format("supervisor config: {}", e.what()));
  }
}

namespace {

/// A state-store write the supervisor cannot act on (the sandbox goes on): logged, not lost.
template <typename T>
void logIfFailed(const Result<T>& st, std::string_view what) {
  if (!st) {
    ML_LOG(supervisor, warn, "state store: {}: {}", what, st.error().toString());
  }
}

constexpr size_t kReadChunk = 64 * 1024;
constexpr size_t kClientHighWater = 1024 * 1024;
constexpr std::chrono::milliseconds kStopGrace{5000};
/// First uid of the jailed VMMs' range (docs/threat-model.md): far above login users and the
/// usual /etc/subuid ranges.
constexpr uint64_t kVmmUidBase = 1600000000;
/// memory.max of a jailed VMM = guest RAM + this: QEMU itself, its TCG translation cache
/// (tb-size 256 MiB), I/O buffers.
constexpr int64_t kVmmMemoryMarginMib = 512;

using sys::runTool;

Status makeUpperDisk(const std::string& path, int64_t mib) {
  // The guest's overlay upper layer: thrown away with the sandbox, so no journal.
  return sys::makeExt4Image(path, mib, sys::Ext4Options{.journal = false});
}

/// Reuses a sandbox's existing upper disk, growing it (offline, before boot) when the spec asks
/// for more room than it has.
Status keepUpperDisk(const std::string& path, int64_t mib) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return makeUpperDisk(path, mib);
  }
  const int64_t want = mib * 1024 * 1024;
  if (st.st_size >= want) {
    if (st.st_size > want) {
      ML_LOG(supervisor, warn, "{} keeps its {} MiB: shrinking a data disk is not supported", path,
             st.st_size / (1024 * 1024));
    }
    return ok();
  }
  if (::truncate(path.c_str(), want) != 0) {
    return makeError(Errc::System, fmt::format("growing {}", path), errno);
  }
  // e2fsck exits 1 when it only corrected counters (normal for a journal-less disk).
  ML_RETURN_IF_ERROR(runTool({"e2fsck", "-f", "-p", path}, path + ".fsck.log", 1));
  return runTool({"resize2fs", path}, path + ".resize.log");
}

/// Reads the secret values the launcher wrote into `fd` (one JSON object, to EOF, bounded).
Result<std::map<std::string, std::string>> readSecretValues(int fd) {
  std::map<std::string, std::string> values;
  if (fd < 0) {
    return values;
  }
  Fd owned(fd);
  std::string data;
  ML_DEFER {
    wipe(data);
  };
  char buf[4096];
  // Bounded: the launcher writes everything at once and closes its end (a dead launcher closes
  // it too); one that stalls must not hold the supervisor forever.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd p{owned.get(), POLLIN, 0};
    int ready = left.count() > 0 ? ::poll(&p, 1, static_cast<int>(left.count())) : 0;
    if (ready < 0 && errno == EINTR) {
      continue;
    }
    if (ready < 0) {
      return makeError(Errc::System, "waiting for the secret values", errno);
    }
    if (ready == 0) {
      return makeError(Errc::Unavailable,
                       "the launcher did not hand over the secret values "
                       "within 30 s");
    }
    ssize_t n = ::read(owned.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      return makeError(Errc::System, "reading the secret values", errno);
    }
    if (n == 0) {
      break;
    }
    wipeAppend(data, std::string_view(buf, static_cast<size_t>(n)));
    wipe(buf, sizeof(buf));
    if (data.size() > 16 * 1024 * 1024) {
      return makeError(Errc::InvalidSpec, "secret values exceed 16 MiB");
    }
  }
  auto j = nlohmann::json::parse(data, nullptr, false);
  wipe(data);
  if (!j.is_object()) {
    // Never echo the data: it is secret.
    return makeError(Errc::Internal, "the secret values handed over are not a JSON object");
  }
  for (auto& [name, value] : j.items()) {
    if (value.is_string()) {
      values[name] = value.get<std::string>();
      wipe(value.get_ref<std::string&>());
    }
  }
  return values;
}

/// The boot config disk: a raw, read-only virtio disk holding one JSON document (padded with
/// spaces to whole sectors) that the guest init reads before anything runs: the environment of
/// every guest process, the sandbox CA, /etc/hosts additions and the resolver. Secret values are
/// never in it (placeholders only).
Status writeBootConfig(const std::string& path, const nlohmann::json& config) {
  std::string text = config.dump();
  text.append(4096 - text.size() % 4096, ' ');
  return writeFileAtomic(path, text, 0600);
}

/// A locally administered MAC derived from the sandbox id (stable across restarts).
std::string macFor(const std::string& sandbox_id) {
  std::string hex = sandbox_id.starts_with("vm-") ? sandbox_id.substr(3) : sandbox_id;
  hex.resize(8, '0');
  return fmt::format("02:4d:{}:{}:{}:{}", hex.substr(0, 2), hex.substr(2, 2), hex.substr(4, 2),
                     hex.substr(6, 2));
}

class Supervisor;

/// One control-socket client: a JSON request line, then (for exec) a relay of exec messages
/// between the client and one guest stream, flow-controlled both ways.
struct Client {
  Fd fd;
  ev::Watch watch;
  std::string in;
  std::string out;
  bool have_request = false;
  uint32_t port = 0;    // guest port the relay opens (exec or service)
  uint32_t stream = 0;  // guest stream, once the relay started
  size_t unacked = 0;   // guest bytes queued for the client, not yet granted back
  size_t local = 0;     // bytes at the front of `out` that did not come from the guest
  bool closing = false;
};

class Supervisor {
 public:
  Supervisor(const Config& config, ev::Loop& loop) : config_(config), loop_(loop) {}

  Status start();
  Status result() const { return result_; }
  /// Records why the sandbox could not start (the CLI reports the recorded error).
  void startFailed(const Error& error) { record(state::SandboxStatus::Failed, error.toString()); }

 private:
  void record(state::SandboxStatus status, const std::string& error = "");
  Status prepareVmm();
  Status startNetwork(sys::SpawnOptions& qemu_opts);
  Status startVfs();
  guestproto::StreamChannel guestChannel(uint32_t port);
  Status startPorts();
  Status startHealth();
  void onVfsData(uint32_t stream, std::string_view data);
  void resetVfsStream(uint32_t stream, const Error& error);
  void onQemuExit();
  void tryConnectChannel();
  void onChannel(uint32_t events);
  void flushChannel();
  void onReady(std::string_view status_json);
  void onBootTimeout();
  void onAccept();
  void onClient(Client* c, uint32_t events);
  void handleRequest(Client* c, const nlohmann::json& req);
  /// Powers the sandbox off when its owner process (config.owner) dies: a pidfd on the loop,
  /// checked against the recorded start time so a reused pid is never mistaken for the owner.
  Status watchOwner();
  /// Opens the client's guest stream (exec or service port) and relays bytes both ways.
  void startRelay(Client* c);
  void pumpClient(Client* c);
  void closeClient(Client* c, const std::string& error = "");
  void stop(const std::string& why);
  void finish(Status status);
  void startMainProcess();
  Client* clientForStream(uint32_t stream);

  Config config_;
  ev::Loop& loop_;
  std::optional<state::Store> store_;
  std::unique_ptr<net::SandboxNetwork> network_;
  std::unique_ptr<vfs::SandboxVfs> vfs_;
  std::unique_ptr<ports::SandboxPorts> ports_;
  std::unique_ptr<health::Checker> health_;
  sys::SandboxCgroup cgroup_;  ///< the jailed VMM's; removed after qemu_ is gone
  sys::ChildProcess qemu_;
  ev::Watch qemu_watch_;
  sys::ChildProcess main_;  ///< `matchlock __main`, once the guest is ready
  Fd channel_;
  ev::Watch channel_watch_;
  std::string channel_out_;
  std::unique_ptr<guestproto::Mux> mux_;
  ev::Timer connect_timer_;
  ev::Timer boot_timer_;
  ev::Timer stop_timer_;
  Fd listener_;
  Fd owner_pidfd_;
  ev::Watch owner_watch_;
  ev::Watch listener_watch_;
  std::list<std::unique_ptr<Client>> clients_;
  std::map<uint32_t, std::string> ready_streams_;
  bool ready_ = false;
  bool stopping_ = false;
  bool finished_ = false;
  std::chrono::steady_clock::time_point started_at_;
  Status result_ = ok();
};

void Supervisor::record(state::SandboxStatus status, const std::string& error) {
  if (!store_) {
    return;
  }
  std::optional<std::string> err;
  if (!error.empty()) {
    err = error;
  }
  if (Status st = store_->updateSandboxStatus(config_.sandbox_id, status, err); !st) {
    ML_LOG(supervisor, warn, "recording status: {}", st.error().toString());
  }
}

Status Supervisor::start() {
  started_at_ = std::chrono::steady_clock::now();
  if (!config_.state_db.empty()) {
    auto store = state::Store::open(config_.state_db);
    if (!store) {
      return makeError(std::move(store).error().withContext("opening the state DB"));
    }
    store_.emplace(std::move(*store));
  }
  if (store_) {
    // Record ourselves first: if whoever started us dies before recording us, we are still
    // observable and killable by pid + start time.
    if (auto self = sys::processRef(::getpid()); self) {
      if (Status st = store_->setSupervisor(config_.sandbox_id, *self); !st) {
        ML_LOG(supervisor, warn, "recording the supervisor: {}", st.error().toString());
      }
    }
  }
  if (config_.upper_disk_mib > 0) {
    ML_RETURN_IF_ERROR(config_.keep_upper_disk
                           ? keepUpperDisk(config_.upper_disk_path, config_.upper_disk_mib)
                           : makeUpperDisk(config_.upper_disk_path, config_.upper_disk_mib));
  }
  ML_RETURN_IF_ERROR(prepareVmm());
  ML_ASSIGN_OR_RETURN(listener_, sys::listenUnix(controlSocketPath(config_.run_dir)));
  ML_ASSIGN_OR_RETURN(listener_watch_,
                      loop_.watch(listener_.get(), ev::kRead, [this](uint32_t) { onAccept(); }));
  ML_RETURN_IF_ERROR(watchOwner());

  sys::SpawnOptions opts;
  opts.stdout_path = config_.run_dir + "/qemu.log";
  opts.stderr_path = opts.stdout_path;
  // No VMM outlives us, however we die: the next command finds nothing of the sandbox running.
  opts.parent_death_signal = SIGKILL;
  ML_RETURN_IF_ERROR(startVfs());
  ML_RETURN_IF_ERROR(startPorts());
  ML_RETURN_IF_ERROR(startHealth());
  ML_RETURN_IF_ERROR(startNetwork(opts));
  (void)::unlink(config_.vm.channel_socket.c_str());
  ML_ASSIGN_OR_RETURN(vm::BackendPtr backend, vm::makeBackend(config_.backend));
  // The guest has no clock source of its own (microvm without RTC): hand it ours at each boot.
  config_.vm.kernel_params.push_back(
      fmt::format("matchlock.time={}", std::chrono::duration_cast<std::chrono::seconds>(
                                           std::chrono::system_clock::now().time_since_epoch())
                                           .count()));
  ML_ASSIGN_OR_RETURN(qemu_, backend->start(config_.vm, opts));
  ML_LOG(supervisor, info, "sandbox {}: {} pid {}", config_.sandbox_id, backend->name(),
         qemu_.pid());
  if (store_) {
    state::VmRecord vm;
    vm.id = config_.sandbox_id;
    vm.sandbox_id = config_.sandbox_id;
    vm.backend = config_.backend;
    vm.process = sys::ProcessRef{qemu_.pid(), qemu_.startTime()};
    vm.status = state::VmStatus::Starting;
    if (Status st = store_->upsertVm(vm); !st) {
      ML_LOG(supervisor, warn, "recording vm: {}", st.error().toString());
    }
  }
  ML_ASSIGN_OR_RETURN(
      qemu_watch_, loop_.watch(qemu_.pidfd().get(), ev::kRead, [this](uint32_t) { onQemuExit(); }));
  ML_ASSIGN_OR_RETURN(connect_timer_, loop_.timer([this] { tryConnectChannel(); }));
  ML_RETURN_IF_ERROR(connect_timer_.arm(std::chrono::milliseconds(5)));
  ML_ASSIGN_OR_RETURN(boot_timer_, loop_.timer([this] { onBootTimeout(); }));
  ML_RETURN_IF_ERROR(boot_timer_.arm(config_.boot_timeout));
  ML_ASSIGN_OR_RETURN(stop_timer_, loop_.timer([this] {
    ML_LOG(supervisor, warn, "sandbox {}: guest did not power off in time; killing QEMU",
           config_.sandbox_id);
    (void)qemu_.signal(SIGKILL);
  }));
  return ok();
}

/// The VMM's directory (its sockets and console log) and, when we are root, its jail: a uid of
/// its own (MATCHLOCK_VMM_UID_BASE + our pid: unique while we live, and the VMM never outlives
/// us), an empty root for the jail's tmpfs, the directory and console log handed to that uid.
/// MATCHLOCK_VMM_JAIL=off runs the VMM as we run (benchmarks, debugging).
Status Supervisor::prepareVmm() {
  const std::string dir = vmmDirPath(config_.run_dir);
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return makeError(Errc::System, fmt::format("creating {}", dir), errno);
  }
  const char* off = std::getenv("MATCHLOCK_VMM_JAIL");
  if (::geteuid() != 0 || (off != nullptr && std::string_view(off) == "off")) {
    ML_LOG(supervisor, info, "sandbox {}: VMM not jailed ({})", config_.sandbox_id,
           ::geteuid() != 0 ? "not root" : "MATCHLOCK_VMM_JAIL=off");
    return ok();
  }
  uint64_t base = kVmmUidBase;
  if (const char* b = std::getenv("MATCHLOCK_VMM_UID_BASE"); b != nullptr && *b != '\0') {
    uint64_t parsed = 0;
    std::string_view text(b);
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), parsed);
    if (ec != std::errc() || end != text.data() + text.size() || parsed == 0 ||
        parsed + (uint64_t{1} << 22) > 0xFFFFFFFEULL) {
      return makeError(Errc::InvalidSpec, fmt::format("MATCHLOCK_VMM_UID_BASE '{}': expected 1..{}",
                                                      b, 0xFFFFFFFEULL - (uint64_t{1} << 22)));
    }
    base = parsed;
  }
  vm::VmmJail jail;
  jail.uid = static_cast<uid_t>(base + static_cast<uint64_t>(::getpid()));
  jail.gid = static_cast<gid_t>(jail.uid);
  jail.vmm_dir = dir;
  jail.root = config_.run_dir + "/jail";
  if (::mkdir(jail.root.c_str(), 0700) != 0 && errno != EEXIST) {
    return makeError(Errc::System, fmt::format("creating {}", jail.root), errno);
  }
  // An earlier boot's VMM had another uid: everything it may open is handed to this one.
  const std::string console = consoleLogPath(config_.run_dir);
  Fd log(::open(console.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!log || ::fchown(log.get(), jail.uid, jail.gid) != 0 ||
      ::chown(dir.c_str(), jail.uid, jail.gid) != 0) {
    return makeError(Errc::System, fmt::format("handing {} to the VMM's uid", dir), errno);
  }
  // Its cgroup: the guest's RAM plus the VMM's own overhead, its threads, its vCPUs plus one CPU
  // for its I/O threads.
  sys::CgroupLimits limits;
  limits.memory_bytes = (config_.vm.memory_mib + kVmmMemoryMarginMib) << 20;
  limits.pids = static_cast<int64_t>(vm::qemu::kVmmMaxThreads);
  limits.cpu_quota_us = (vm::vcpuCount(config_.vm.cpus) + 1) * limits.cpu_period_us;
  auto cgroup = sys::SandboxCgroup::create(config_.sandbox_id, limits);
  if (cgroup) {
    cgroup_ = std::move(*cgroup);
    jail.cgroup_fds = cgroup_.procsFds();
  } else if (cgroup.error().code() == Errc::Unavailable) {
    // No cgroup filesystem in our view (`ip netns exec` remounts /sys; a container may have
    // none): the rest of the jail stands; the limits are missing, and the log says so.
    ML_LOG(supervisor, warn, "sandbox {}: VMM without a cgroup: {}", config_.sandbox_id,
           cgroup.error().message());
  } else {
    return makeError(std::move(cgroup).error().withContext(
        "the VMM's cgroup (MATCHLOCK_VMM_JAIL=off runs it unconfined)"));
  }
  ML_LOG(supervisor, info, "sandbox {}: VMM jailed as uid {} in {}, cgroup {}", config_.sandbox_id,
         jail.uid, jail.root, join(cgroup_.dirs(), ", "));
  config_.vm.jail = std::move(jail);
  return ok();
}

/// The network layer's part of the boot: the sandbox's namespace, TAP, rules, proxy and
/// resolver (net::SandboxNetwork), the NIC and its addresses for the VMM and the guest, and the
/// boot config disk.
Status Supervisor::startNetwork(sys::SpawnOptions& qemu_opts) {
  ML_ASSIGN_OR_RETURN(auto secret_values, readSecretValues(config_.secrets_fd));
  config_.secrets_fd = -1;
  nlohmann::json boot = {{"version", 1}, {"env", nlohmann::json::object()}};
  nlohmann::json hosts = nlohmann::json::array();
  for (const auto& [host, ip] : config_.add_hosts) {
    hosts.push_back({{"host", host}, {"ip", ip}});
  }
  boot["hosts"] = hosts;
  if (vfs_) {
    boot["vfs"] = vfs_->bootConfig();
  }
  if (config_.network.enabled) {
    ML_ASSIGN_OR_RETURN(network_, net::SandboxNetwork::create(config_.network, secret_values));
    if (store_) {
      const auto& n = config_.network.names;
      for (auto [kind, name] : {std::pair{state::ResourceKind::Netns, n.netns},
                                std::pair{state::ResourceKind::Tap, n.tap},
                                std::pair{state::ResourceKind::NftTable, n.table}}) {
        logIfFailed(store_->markResourceCreated(kind, name), "recording a network resource");
      }
    }
    config_.vm.tap_fd = network_->tapFd();
    config_.vm.mac = macFor(config_.sandbox_id);
    qemu_opts.inherit_fds.push_back(network_->tapFd());
    config_.vm.kernel_params.push_back(
        fmt::format("matchlock.ip={}/{}", config_.network.guest_ip, config_.network.prefix));
    config_.vm.kernel_params.push_back("matchlock.gw=" + config_.network.gateway);
    config_.vm.kernel_params.push_back(fmt::format("matchlock.mtu={}", config_.network.mtu));
    config_.vm.kernel_params.push_back("matchlock.dns=" + config_.network.gateway);
    boot["env"] = network_->guestEnv();
    boot["ca_pem"] = network_->caPem();
  }
  // Values are gone from our memory once the proxy holds them.
  for (auto& [name, value] : secret_values) {
    wipe(value);
  }
  if (!config_.boot_config_path.empty()) {
    ML_RETURN_IF_ERROR(writeBootConfig(config_.boot_config_path, boot));
    config_.vm.disks.push_back(vm::DiskSpec{config_.boot_config_path, "config", true});
    config_.vm.kernel_params.push_back("matchlock.config=serial:config");
  }
  return ok();
}

/// The VFS layer's part of the boot: every mount's host tree opened (a missing source fails the
/// start here, before the VM exists), served once the guest opens its streams.
Status Supervisor::startVfs() {
  if (config_.vfs.mounts.empty()) {
    return ok();
  }
  vfs::SandboxVfs::Channel channel;
  channel.send = [this](uint32_t stream, std::string&& bytes) {
    if (mux_) {
      (void)mux_->send(stream, bytes);
    }
  };
  channel.consumed = [this](uint32_t stream, size_t n) {
    if (mux_) {
      mux_->consumed(stream, n);
    }
  };
  channel.pending = [this](uint32_t stream) { return mux_ ? mux_->pendingBytes(stream) : 0; };
  ML_ASSIGN_OR_RETURN(vfs_, vfs::SandboxVfs::create(config_.vfs, std::move(channel)));
  if (config_.vfs.transport == vfs::Transport::VirtioFs) {
    const std::string socket = vmmDirPath(config_.run_dir) + "/vfs.sock";
    ML_RETURN_IF_ERROR(
        vfs_->serveVirtioFs(loop_, socket, fmt::format("sandbox {}", config_.sandbox_id)));
    if (config_.vm.jail &&
        ::chown(socket.c_str(), config_.vm.jail->uid, config_.vm.jail->gid) != 0) {
      return makeError(Errc::System, fmt::format("handing {} to the VMM's uid", socket), errno);
    }
    config_.vm.vhost_user_fs_socket = socket;
    config_.vm.vhost_user_fs_tag = std::string(vfs::kVirtioFsTag);
  }
  return ok();
}

/// Streams to one of the agent's ports on our mux, for a host-side layer (ports, health): opened
/// only once the guest is ready and not while stopping.
guestproto::StreamChannel Supervisor::guestChannel(uint32_t port) {
  guestproto::StreamChannel channel;
  channel.open = [this, port]() -> Result<uint32_t> {
    if (!mux_ || !ready_ || stopping_) {
      return makeError(Errc::Unavailable, "the guest is not ready");
    }
    return mux_->open(port);
  };
  channel.send = [this](uint32_t stream, std::string_view bytes) {
    if (mux_) {
      (void)mux_->send(stream, bytes);
    }
  };
  channel.consumed = [this](uint32_t stream, size_t n) {
    if (mux_) {
      mux_->consumed(stream, n);
    }
  };
  channel.pending = [this](uint32_t stream) { return mux_ ? mux_->pendingBytes(stream) : 0; };
  channel.close_write = [this](uint32_t stream) {
    if (mux_) {
      (void)mux_->closeWrite(stream);
    }
  };
  channel.reset = [this](uint32_t stream, std::string_view why) {
    if (mux_) {
      mux_->reset(stream, 8, why);
    }
  };
  channel.flush = [this] { flushChannel(); };
  return channel;
}

/// The ports layer: the published ports bound now (a taken one fails the start, before the VM
/// exists), their connections relayed once the guest is ready.
Status Supervisor::startPorts() {
  ML_ASSIGN_OR_RETURN(ports_, ports::SandboxPorts::create(loop_, config_.sandbox_id, config_.ports,
                                                          guestChannel(guestproto::kPortService)));
  return ok();
}

/// The healthcheck: probes through the agent's exec port once the guest is ready; every
/// transition is recorded (sandboxes.health) and logged as an event.
Status Supervisor::startHealth() {
  if (store_) {
    // A new supervisor starts from scratch: no status of an earlier boot survives.
    std::optional<std::string_view> initial;
    if (config_.healthcheck) {
      initial = "starting";
    }
    logIfFailed(store_->updateSandboxHealth(config_.sandbox_id, initial, std::nullopt),
                "recording health");
  }
  auto on_change = [this](std::optional<health::State> state, const std::string& detail) {
    if (!store_) {
      return;
    }
    std::optional<std::string_view> name;
    std::optional<std::string_view> why;
    if (state) {
      name = health::toString(*state);
    }
    if (!detail.empty()) {
      why = detail;
    }
    logIfFailed(store_->updateSandboxHealth(config_.sandbox_id, name, why), "recording health");
    state::Event e;
    e.sandbox_id = config_.sandbox_id;
    e.kind = fmt::format("health.{}", name.value_or("none"));
    e.message = !detail.empty() ? detail : fmt::format("healthcheck: {}", name.value_or("none"));
    logIfFailed(store_->appendEvent(e), "recording a health event");
  };
  ML_ASSIGN_OR_RETURN(
      health_, health::Checker::create(loop_, config_.healthcheck,
                                       guestChannel(guestproto::kPortExec), std::move(on_change)));
  return ok();
}

void Supervisor::onVfsData(uint32_t stream, std::string_view data) {
  // Credit goes back to the guest as requests are processed (SandboxVfs), not on arrival.
  if (Status st = vfs_->onData(stream, data); !st) {
    resetVfsStream(stream, st.error());
  }
}

void Supervisor::resetVfsStream(uint32_t stream, const Error& error) {
  // A guest that breaks the framing loses that filesystem, not the sandbox.
  ML_LOG(supervisor, warn, "sandbox {}: {}", config_.sandbox_id, error.message());
  mux_->reset(stream, 1, error.message());
  vfs_->onClosed(stream);
}

void Supervisor::tryConnectChannel() {
  auto fd = sys::connectUnixNonBlocking(config_.vm.channel_socket);
  if (!fd) {
    (void)connect_timer_.arm(std::chrono::milliseconds(5));  // QEMU has not bound it yet
    return;
  }
  channel_ = std::move(*fd);
  guestproto::Mux::Callbacks cb;
  cb.on_open = [this](uint32_t stream, uint32_t port) {
    if (port == guestproto::kPortReady) {
      ready_streams_[stream] = "";
    } else if (port == guestproto::kPortVfs && vfs_) {
      vfs_->onOpen(stream);
    } else {
      mux_->reset(stream, 3, "the host serves no ports");
    }
  };
  cb.on_data = [this](uint32_t stream, std::string_view data) {
    if (vfs_ && vfs_->owns(stream)) {
      onVfsData(stream, data);
      return;
    }
    if (ports_ && ports_->owns(stream)) {
      ports_->onData(stream, data);
      return;
    }
    if (health_ && health_->owns(stream)) {
      health_->onData(stream, data);
      return;
    }
    if (auto it = ready_streams_.find(stream); it != ready_streams_.end()) {
      it->second.append(data);
      mux_->consumed(stream, data.size());
      return;
    }
    if (Client* c = clientForStream(stream)) {
      c->out.append(data);
      c->unacked += data.size();
      pumpClient(c);
    }
  };
  cb.on_close = [this](uint32_t stream) {
    if (vfs_ && vfs_->owns(stream)) {
      (void)mux_->closeWrite(stream);
      vfs_->onClosed(stream);
      return;
    }
    if (ports_ && ports_->owns(stream)) {
      ports_->onClose(stream);
      return;
    }
    if (health_ && health_->owns(stream)) {
      health_->onClose(stream);
      return;
    }
    if (auto it = ready_streams_.find(stream); it != ready_streams_.end()) {
      std::string status = it->second;
      ready_streams_.erase(it);
      (void)mux_->closeWrite(stream);
      onReady(status);
      return;
    }
    if (Client* c = clientForStream(stream)) {
      (void)mux_->closeWrite(stream);
      c->closing = true;  // after its output is written
      pumpClient(c);
    }
  };
  cb.on_reset = [this](uint32_t stream, uint32_t, std::string_view message) {
    if (vfs_ && vfs_->owns(stream)) {
      vfs_->onClosed(stream);
      return;
    }
    if (ports_ && ports_->owns(stream)) {
      ports_->onReset(stream, message);
      return;
    }
    if (health_ && health_->owns(stream)) {
      health_->onReset(stream, message);
      return;
    }
    if (Client* c = clientForStream(stream)) {
      c->stream = 0;
      closeClient(c, fmt::format("guest reset the exec stream: {}", message));
    }
  };
  cb.on_ready = [this] {
    // The guest's clock came from a boot parameter in whole seconds and is stale by its boot
    // time: hand it ours now, so that host and guest file times agree.
    if (auto s = mux_->open(guestproto::kPortReady); s) {
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count();
      (void)mux_->send(*s, fmt::format(R"({{"op": "clock", "unix_ns": {}}})", ns));
      (void)mux_->closeWrite(*s);
    }
  };
  cb.on_goaway = [](uint32_t, std::string_view message) {
    ML_LOG(supervisor, warn, "guest closing the channel: {}", message);
  };
  guestproto::Mux::Options opts;
  opts.agent = "matchlock-supervisor";
  mux_ = std::make_unique<guestproto::Mux>(guestproto::Mux::Role::Host, std::move(cb), opts);
  mux_->start();  // the host speaks first
  auto watch = loop_.watch(channel_.get(), ev::kRead | ev::kWrite,
                           [this](uint32_t events) { onChannel(events); });
  if (!watch) {
    finish(makeError(std::move(watch).error()));
    return;
  }
  channel_watch_ = std::move(*watch);
}

void Supervisor::onChannel(uint32_t events) {
  if ((events & (ev::kRead | ev::kError)) != 0) {
    char buf[kReadChunk];
    for (int rounds = 0; rounds < 16; ++rounds) {
      ssize_t n = ::read(channel_.get(), buf, sizeof(buf));
      if (n > 0) {
        if (Status st = mux_->receive(std::string_view(buf, static_cast<size_t>(n))); !st) {
          ML_LOG(supervisor, err, "sandbox {}: {}", config_.sandbox_id, st.error().message());
          stop("protocol error on the guest channel");
          break;
        }
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        break;
      }
      // QEMU closed the chardev: the VM is going away; its exit is handled by onQemuExit.
      channel_watch_.reset();
      return;
    }
  }
  flushChannel();
}

void Supervisor::flushChannel() {
  if (!mux_ || !channel_watch_) {
    return;
  }
  channel_out_ += mux_->takeOutput();
  if (!sendSome(channel_.get(), channel_out_)) {
    channel_watch_.reset();
    return;
  }
  (void)channel_watch_.setEvents(ev::kRead | (channel_out_.empty() ? 0 : ev::kWrite));
  if (vfs_) {
    // Queued replies may have drained: paused VFS streams go on.
    for (auto& [stream, error] : vfs_->resume()) {
      resetVfsStream(stream, error);
    }
    if (mux_->hasOutput()) {
      channel_out_ += mux_->takeOutput();
      if (!sendSome(channel_.get(), channel_out_)) {
        channel_watch_.reset();
        return;
      }
      (void)channel_watch_.setEvents(ev::kRead | (channel_out_.empty() ? 0 : ev::kWrite));
    }
  }
  if (ports_) {
    ports_->onDrained();
  }
  // Output credit may have arrived: clients paused on a full guest window can go on.
  for (auto& c : clients_) {
    if (c->stream != 0 && mux_->pendingBytes(c->stream) < kReadChunk) {
      (void)c->watch.setEvents(ev::kRead | (c->out.empty() ? 0 : ev::kWrite));
    }
  }
}

void Supervisor::onReady(std::string_view status_json) {
  auto status = nlohmann::json::parse(status_json, nullptr, false);
  if (status.is_object() && !status.value("ok", true)) {
    // The guest could not set itself up (a mount failed): the boot fails with its reason.
    Error err(Errc::Unavailable,
              fmt::format("guest setup failed: {}", status.value("error", "unknown reason")));
    ML_LOG(supervisor, err, "sandbox {}: {}", config_.sandbox_id, err.message());
    boot_timer_ = ev::Timer();
    for (auto& c : clients_) {
      closeClient(c.get(), err.message());
    }
    result_ = makeError(err);
    record(state::SandboxStatus::Failed, err.message());
    (void)qemu_.signal(SIGKILL);
    return;
  }
  ready_ = true;
  boot_timer_ = ev::Timer();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                  started_at_);
  ML_LOG(supervisor, info, "sandbox {}: guest ready in {} ms: {}", config_.sandbox_id, ms.count(),
         status_json);
  record(state::SandboxStatus::Running);
  if (store_) {
    logIfFailed(store_->updateVmStatus(config_.sandbox_id, state::VmStatus::Running,
                                       sys::ProcessRef{qemu_.pid(), qemu_.startTime()}),
                "recording the VM as running");
  }
  for (auto& c : clients_) {
    if (c->have_request && c->port != 0 && c->stream == 0 && !c->closing) {
      startRelay(c.get());
    }
  }
  if (ports_) {
    ports_->ready();
  }
  if (health_) {
    health_->start();
  }
  flushChannel();
  startMainProcess();
}

void Supervisor::startMainProcess() {
  if (!config_.main_process || main_.running()) {
    return;
  }
  // A child of ours: it relays the main process through our control socket like any exec client
  // and dies with us (it asks for SIGTERM on our death).
  std::error_code ec;
  std::string self = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  sys::SpawnOptions opts;
  opts.stdout_path = mainLogPath(config_.run_dir);
  opts.stderr_path = opts.stdout_path;
  opts.parent_death_signal = SIGTERM;
  auto child = sys::ChildProcess::spawn(
      {self, "--log-level", "warn", "__main", "--config", config_.run_dir + "/vm.json"}, opts);
  if (!child) {
    // The sandbox stays up for exec, but the failure is on record, not only in our log.
    std::string why = child.error().toString();
    ML_LOG(supervisor, warn, "sandbox {}: starting the main process: {}", config_.sandbox_id, why);
    if (store_) {
      state::Event e;
      e.sandbox_id = config_.sandbox_id;
      e.kind = "main.failed";
      e.message = "the main process could not be started: " + why;
      logIfFailed(store_->appendEvent(e), "recording main.failed");
    }
    return;
  }
  main_ = std::move(*child);
}

void Supervisor::onBootTimeout() {
  if (ready_) {
    return;
  }
  std::string console = readFile(config_.vm.console_log).value_or("");
  if (console.size() > 2000) {
    console = console.substr(console.size() - 2000);
  }
  Error err(Errc::Unavailable,
            fmt::format("guest did not become ready within {} s (console tail: {})",
                        config_.boot_timeout.count() / 1000, console));
  for (auto& c : clients_) {
    closeClient(c.get(), err.message());
  }
  result_ = makeError(err);
  record(state::SandboxStatus::Failed, err.message());
  (void)qemu_.signal(SIGKILL);
}

void Supervisor::onAccept() {
  for (;;) {
    Fd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!fd) {
      return;
    }
    if (Status st = sys::requireSameUid(fd.get()); !st) {
      // The run dir's mode keeps others out already; this holds even when it does not.
      ML_LOG(supervisor, warn, "sandbox {}: control socket: {}", config_.sandbox_id,
             st.error().message());
      std::string line = nlohmann::json({{"ok", false}, {"error", st.error().message()}}).dump();
      line += "\n";
      (void)::send(fd.get(), line.data(), line.size(), MSG_NOSIGNAL);
      continue;
    }
    auto c = std::make_unique<Client>();
    c->fd = std::move(fd);
    Client* raw = c.get();
    auto watch = loop_.watch(raw->fd.get(), ev::kRead,
                             [this, raw](uint32_t events) { onClient(raw, events); });
    if (!watch) {
      continue;
    }
    raw->watch = std::move(*watch);
    clients_.push_back(std::move(c));
  }
}

void Supervisor::onClient(Client* c, uint32_t events) {
  if ((events & ev::kWrite) != 0) {
    pumpClient(c);
    if (!c->fd) {
      return;
    }
  }
  if ((events & (ev::kRead | ev::kError)) == 0) {
    return;
  }
  if (c->stream != 0 && mux_ && mux_->pendingBytes(c->stream) >= kReadChunk) {
    (void)c->watch.setEvents(c->out.empty() ? 0 : ev::kWrite);  // backpressure towards the client
    return;
  }
  char buf[kReadChunk];
  ssize_t n = ::read(c->fd.get(), buf, sizeof(buf));
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
    return;
  }
  if (n <= 0) {
    // The client went away: an exec in flight is cancelled (the guest SIGTERMs the group).
    if (c->stream != 0 && mux_) {
      mux_->reset(c->stream, 8, "client disconnected");
      c->stream = 0;
      flushChannel();
    }
    closeClient(c);
    return;
  }
  std::string_view data(buf, static_cast<size_t>(n));
  if (!c->have_request) {
    c->in.append(data);
    size_t nl = c->in.find('\n');
    if (nl == std::string::npos) {
      if (c->in.size() > 64 * 1024) {
        closeClient(c, "request line too long");
      }
      return;
    }
    std::string line = c->in.substr(0, nl);
    std::string rest = c->in.substr(nl + 1);
    c->in = rest;
    c->have_request = true;
    nlohmann::json req = nlohmann::json::parse(line, nullptr, false);
    if (!req.is_object()) {
      closeClient(c, "request is not a JSON object");
      return;
    }
    handleRequest(c, req);
    return;
  }
  if (c->stream != 0 && mux_) {
    (void)mux_->send(c->stream, data);
    flushChannel();
  } else {
    c->in.append(data);  // exec data before the guest is ready: queued
  }
}

void Supervisor::handleRequest(Client* c, const nlohmann::json& req) {
  std::string op = req.value("op", "");
  // Each layer serves its own verbs.
  std::optional<nlohmann::json> layer_reply;
  if (vfs_) {
    layer_reply = vfs_->handleControl(req);
  }
  if (!layer_reply && ports_) {
    layer_reply = ports_->handleControl(req);
  }
  if (!layer_reply && health_) {
    layer_reply = health_->handleControl(req);
  }
  if (layer_reply) {
    // served by the VFS, ports or health layer
  } else if (network_) {
    layer_reply = network_->handleControl(req);
  } else if (op == "allow_list" || op == "network_update") {
    layer_reply = nlohmann::json{
        {"ok", false}, {"error", "egress updates unavailable: the sandbox has no network"}};
  }
  if (layer_reply) {
    c->out += layer_reply->dump() + "\n";
    c->closing = true;
    pumpClient(c);
    return;
  }
  if (op == "status") {
    nlohmann::json s = {
        {"ok", true},
        {"sandbox", config_.sandbox_id},
        {"state", ready_ ? "running" : (stopping_ ? "stopping" : "booting")},
        {"vm_pid", qemu_.pid()},
        {"network", network_ != nullptr},
        {"vfs", vfs_ != nullptr},
        {"ports", ports::toJson(ports_ ? ports_->bindings() : std::vector<ports::Binding>{})},
        {"health", health_ && health_->enabled()
                       ? nlohmann::json(std::string(health::toString(health_->state())))
                       : nlohmann::json()},
        {"accel", std::string(vm::toString(config_.vm.accel))},
        // The hardening as the kernel holds it for this process (docs/threat-model.md).
        {"dumpable", ::prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)}};
    c->out += s.dump() + "\n";
    c->closing = true;
    pumpClient(c);
  } else if (op == "stop") {
    c->out += "{\"ok\": true}\n";
    c->closing = true;
    pumpClient(c);
    stop("stop requested");
  } else if (op == "exec" || op == "service") {
    // Raw relays to a new guest stream: exec messages for a process, or the same framing for
    // one of the agent's services (file write/read/list, TCP forwards).
    if (stopping_) {
      closeClient(c, "sandbox is stopping");
      return;
    }
    c->port = op == "exec" ? guestproto::kPortExec : guestproto::kPortService;
    if (ready_) {
      startRelay(c);
    }  // else: started by onReady
  } else {
    closeClient(c, fmt::format("unknown op '{}'", op));
  }
}

Status Supervisor::watchOwner() {
  if (!config_.owner) {
    return ok();
  }
  owner_pidfd_ = Fd(static_cast<int>(::syscall(SYS_pidfd_open, config_.owner->pid, 0)));
  if (!owner_pidfd_ || !sys::isAlive(*config_.owner)) {
    return makeError(Errc::Unavailable,
                     fmt::format("the owner process {} is gone", config_.owner->pid));
  }
  ML_ASSIGN_OR_RETURN(owner_watch_, loop_.watch(owner_pidfd_.get(), ev::kRead, [this](uint32_t) {
    owner_watch_.reset();
    stop("its owner process exited");
  }));
  return ok();
}

void Supervisor::startRelay(Client* c) {
  auto stream = mux_->open(c->port);
  if (!stream) {
    closeClient(c, stream.error().message());
    return;
  }
  c->stream = *stream;
  static constexpr std::string_view kOk = "{\"ok\": true}\n";
  c->out += kOk;
  c->local += kOk.size();
  if (!c->in.empty()) {
    (void)mux_->send(c->stream, c->in);
    c->in.clear();
  }
  pumpClient(c);
  flushChannel();
}

void Supervisor::pumpClient(Client* c) {
  if (!c->fd) {
    return;
  }
  size_t before = c->out.size();
  if (!sendSome(c->fd.get(), c->out)) {
    if (c->stream != 0 && mux_) {
      mux_->reset(c->stream, 8, "client disconnected");
      c->stream = 0;
    }
    closeClient(c);
    return;
  }
  size_t written = before - c->out.size();
  size_t local = std::min(written, c->local);
  c->local -= local;
  written -= local;
  if (c->stream != 0 && mux_ && written > 0) {
    // Grant the guest exactly what of its data reached the client: flow control end to end.
    size_t grant = std::min(written, c->unacked);
    c->unacked -= grant;
    mux_->consumed(c->stream, grant);
  }
  if (c->closing && c->out.empty()) {
    closeClient(c);
    return;
  }
  uint32_t want = c->out.empty() ? ev::kRead : (ev::kRead | ev::kWrite);
  if (c->out.size() > kClientHighWater) {
    want = ev::kWrite;
  }
  (void)c->watch.setEvents(want);
  flushChannel();
}

void Supervisor::closeClient(Client* c, const std::string& error) {
  if (!error.empty() && c->fd) {
    std::string line = nlohmann::json({{"ok", false}, {"error", error}}).dump() + "\n";
    (void)::send(c->fd.get(), line.data(), line.size(), MSG_NOSIGNAL);
  }
  c->watch.reset();
  c->fd.reset();
  // Removed on the next loop turn: the caller may still be inside this client's callback.
  loop_.post([this, c] {
    clients_.remove_if([c](const std::unique_ptr<Client>& p) { return p.get() == c; });
  });
}

Client* Supervisor::clientForStream(uint32_t stream) {
  for (auto& c : clients_) {
    if (c->stream == stream && c->fd) {
      return c.get();
    }
  }
  return nullptr;
}

void Supervisor::stop(const std::string& why) {
  if (stopping_) {
    return;
  }
  stopping_ = true;
  ML_LOG(supervisor, info, "sandbox {}: stopping ({})", config_.sandbox_id, why);
  if (mux_ && ready_) {
    // Ask the guest to sync and power off; QEMU exits on the guest's reboot (-no-reboot).
    if (auto s = mux_->open(guestproto::kPortReady); s) {
      (void)mux_->send(*s, R"({"op": "shutdown"})");
      (void)mux_->closeWrite(*s);
    }
    flushChannel();
    (void)stop_timer_.arm(kStopGrace);
  } else {
    (void)qemu_.signal(SIGKILL);
  }
}

void Supervisor::onQemuExit() {
  auto exit = qemu_.poll();
  qemu_watch_.reset();
  int code = exit && *exit ? (*exit)->code : -1;
  if (stopping_) {
    record(state::SandboxStatus::Stopped);
    finish(result_);
    return;
  }
  std::string qemu_log = readFile(config_.run_dir + "/qemu.log").value_or("");
  std::string why = fmt::format("VM process exited unexpectedly (code {})", code);
  if (std::string_view tail = trim(qemu_log); !tail.empty()) {
    why += fmt::format(": {}", tail.substr(0, 500));
  }
  if (result_) {
    result_ = makeError(Errc::Unavailable, why);
    record(state::SandboxStatus::Crashed, why);
  }
  finish(result_);
}

void Supervisor::finish(Status status) {
  if (finished_) {
    return;
  }
  finished_ = true;
  result_ = std::move(status);
  if (main_.running()) {
    (void)main_.terminate(std::chrono::milliseconds(500));
  }
  for (auto& c : clients_) {
    if (c->fd) {
      pumpClient(c.get());
      closeClient(c.get(), result_ ? "sandbox stopped" : result_.error().message());
    }
  }
  if (store_) {
    logIfFailed(store_->updateVmStatus(
                    config_.sandbox_id,
                    result_ ? state::VmStatus::Stopped : state::VmStatus::Crashed, std::nullopt),
                "recording the VM's end");
  }
  listener_watch_.reset();
  health_.reset();                 // no probe outlives the sandbox
  ports_.reset();                  // listeners and forwarded connections closed
  network_.reset();                // the proxy thread stops; the namespace, TAP and table go
  vfs_.reset();                    // open host files closed, overlay mounts gone with their last fd
  cgroup_ = sys::SandboxCgroup();  // QEMU has exited: its cgroup is empty
  (void)::unlink(controlSocketPath(config_.run_dir).c_str());
  (void)::unlink(config_.vm.channel_socket.c_str());
  (void)::unlink(config_.vm.control_socket.c_str());
  loop_.stop();
}

}  // namespace

Status run(const Config& config) {
  // We hold the secret values: no core dump, no ptrace by the user's other processes, and our
  // /proc files (environ, mem, maps) readable by root only.
  if (::prctl(PR_SET_DUMPABLE, 0) != 0) {
    return makeError(Errc::System, "prctl(PR_SET_DUMPABLE, 0)", errno);
  }
  // And a core taken anyway (a debugger run by root) holds no anonymous memory: no heap, stack
  // or arena, so none of the copies of a value that the proxy, OpenSSL or a JSON parser made.
  // Only the ELF headers remain (bit 4). QEMU and the main-process runner inherit the filter.
  Fd filter(::open("/proc/self/coredump_filter", O_WRONLY | O_CLOEXEC));
  if (!filter || !writeAll(filter.get(), "0x10\n")) {
    return makeError(Errc::System, "setting /proc/self/coredump_filter", errno);
  }
  if (!config.vfs.mounts.empty()) {
    // Every node the guest's kernel keeps of a host tree is an O_PATH fd here (docs/vfs.md).
    rlimit lim{};
    if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < (rlim_t{1} << 20)) {
      rlimit want{rlim_t{1} << 20, std::max<rlim_t>(lim.rlim_max, rlim_t{1} << 20)};
      if (::setrlimit(RLIMIT_NOFILE, &want) != 0) {
        lim.rlim_cur = lim.rlim_max;
        (void)::setrlimit(RLIMIT_NOFILE, &lim);
      }
    }
  }
  ML_ASSIGN_OR_RETURN(auto loop, ev::Loop::create());
  Supervisor s(config, *loop);
  if (Status st = s.start(); !st) {
    s.startFailed(st.error());
    return st;
  }
  ML_RETURN_IF_ERROR(loop->run());
  return s.result();
}

}  // namespace matchlock::supervisor
