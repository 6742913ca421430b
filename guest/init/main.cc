// SPDX-License-Identifier: Apache-2.0
// matchlock-guest: PID 1 of every sandbox VM, and the exec agent.
//   (PID 1)                 boot: mount the pseudo filesystems, find the host channel (the
//                           virtio-serial port named matchlock.0), serve it until the host asks
//                           for a shutdown, then sync and power off.
//   matchlock-guest agent --fd N   serve the protocol on an inherited fd (tests)
//   matchlock-guest version|selftest
// Kernel parameters: matchlock.root=serial:NAME or /dev/vdX (image disk),
// matchlock.rootfs=ext4|erofs, matchlock.upper=serial:NAME or /dev/vdX (writable disk),
// matchlock.hostname, matchlock.time=<unix seconds> (the host's clock at boot),
// matchlock.dns=ip[,ip], matchlock.workdir=/abs/path (created if missing, as an image's WORKDIR
// is), matchlock.probe=1 (power off right after init starts: boot benchmark),
// matchlock.ip=ADDR/PREFIX matchlock.gw=ADDR matchlock.mtu=N (the NIC; absent = no network),
// matchlock.config=serial:NAME (the boot config disk: one JSON document with the environment
// of every process, the sandbox CA and /etc/hosts additions; see docs/egress.md),
// matchlock.disk.<serial>=<mount>[,ro] (a named volume or raw ext4 disk, mounted before the agent
// starts; see docs/vm-runtime.md), matchlock.privileged=1 (execs keep every capability: no
// capability cut, no_new_privs or seccomp; see docs/threat-model.md).
#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "common/strings.h"
#include "ev/loop.h"
#include "guest/agent/agent.h"
#include "guest/agent/log.h"
#include "guest/agent/service.h"
#include "guest/init/net.h"

namespace matchlock::guest {
namespace {

constexpr const char* kVersion = "0.1.0";
constexpr const char* kChannelName = "matchlock.0";

void mountOne(const char* source, const char* target, const char* type, unsigned long flags,
              const char* data) {  // NOLINT(google-runtime-int)
  ::mkdir(target, 0755);
  if (::mount(source, target, type, flags, data) != 0 && errno != EBUSY) {
    logLine("mount {} on {}: {}", type, target, std::strerror(errno));
  }
}

std::string kernelParam(const std::string& name) {
  std::ifstream in("/proc/cmdline");
  std::string word;
  while (in >> word) {
    if (word.rfind(name + "=", 0) == 0) {
      return word.substr(name.size() + 1);
    }
  }
  return {};
}

/// "/dev/<entry>" for the entry of sysfs directory `dir` whose `attribute` file reads `value`,
/// or "" (there is no udev in the guest to make by-name links).
std::string findDevice(const std::string& dir, const std::string& attribute,
                       const std::string& value) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    return {};
  }
  std::string found;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') {
      continue;
    }
    std::ifstream in(dir + "/" + e->d_name + "/" + attribute);
    std::string content;
    std::getline(in, content);
    if (content == value) {
      found = std::string("/dev/") + e->d_name;
      break;
    }
  }
  ::closedir(d);
  return found;
}

/// The virtio-serial port named `name` (/dev/vportNpM).
std::string findVirtioPort(const std::string& name) {
  return findDevice("/sys/class/virtio-ports", "name", name);
}

int serve(Fd channel, Agent::Options opts) {
  auto loop = ev::Loop::create();
  if (!loop) {
    logLine("event loop: {}", loop.error().toString());
    return 70;
  }
  opts.version = kVersion;
  auto agent = Agent::create(**loop, std::move(channel), opts);
  if (!agent) {
    logLine("agent: {}", agent.error().toString());
    return 70;
  }
  if (Status st = (*loop)->run(); !st) {
    logLine("event loop: {}", st.error().toString());
    return 70;
  }
  return 0;
}

/// Mount points of the named volumes and raw disks, unmounted at power-off so that their ext4
/// is clean (no journal to replay) for the next sandbox, which may mount it read-only.
std::vector<std::string>& extraDiskMounts() {
  static std::vector<std::string> mounts;
  return mounts;
}

[[noreturn]] void powerOff() {
  ::sync();
  for (auto it = extraDiskMounts().rbegin(); it != extraDiskMounts().rend(); ++it) {
    if (::umount2(it->c_str(), 0) != 0 &&
        ::mount(nullptr, it->c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr) != 0) {
      logLine("disk {}: unmount at power-off: {}", *it, std::strerror(errno));
    }
  }
  // Best effort: a read-only root flushes the overlay before the VM ends. Processes that still
  // hold files open for writing make this fail with EBUSY; sync() above already persisted data.
  (void)::mount(nullptr, "/", nullptr, MS_REMOUNT | MS_RDONLY, nullptr);
  // The VMM runs with -no-reboot: a reboot request ends it. microvm has no ACPI power button,
  // so RB_POWER_OFF would merely halt.
  ::reboot(RB_AUTOBOOT);
  for (;;) {
    ::pause();
  }
}

/// `serial:NAME` names the virtio disk whose serial is NAME (the VMM sets it; device order is
/// not stable across VMMs); anything else is a device path.
std::string resolveDisk(const std::string& spec) {
  if (spec.rfind("serial:", 0) != 0) {
    return spec;
  }
  return findDevice("/sys/block", "serial", spec.substr(7));
}

/// Waits (bounded) for a disk: the driver probes asynchronously and devtmpfs adds the node.
std::string waitForDisk(const std::string& spec) {
  struct stat st {};
  for (int i = 0; i < 1000; ++i) {
    std::string path = resolveDisk(spec);
    if (!path.empty() && ::stat(path.c_str(), &st) == 0) {
      return path;
    }
    ::usleep(5000);  // 5 s in all
  }
  return {};
}

/// The sandbox root: the image disk (read-only) under an overlay whose upper layer lives on the
/// per-sandbox writable disk. Then the root moves to "/" (initramfs cannot pivot_root) and the
/// pseudo filesystems come along. Returns false, with a console message, on any failure.
bool assembleRoot(const std::string& image_spec, const std::string& fstype,
                  const std::string& upper_spec) {
  std::string image_dev = waitForDisk(image_spec);
  std::string upper_dev = waitForDisk(upper_spec);
  if (image_dev.empty() || upper_dev.empty()) {
    logLine("root: disk {} or {} did not appear", image_spec, upper_spec);
    return false;
  }
  for (const char* d : {"/mnt", "/mnt/lower", "/mnt/upper", "/mnt/root"}) {
    ::mkdir(d, 0755);
  }
  if (::mount(image_dev.c_str(), "/mnt/lower", fstype.c_str(), MS_RDONLY, nullptr) != 0) {
    logLine("root: mount {} ({}) read-only: {}", image_dev, fstype, std::strerror(errno));
    return false;
  }
  if (::mount(upper_dev.c_str(), "/mnt/upper", "ext4", MS_NOATIME, nullptr) != 0) {
    logLine("root: mount upper {}: {}", upper_dev, std::strerror(errno));
    return false;
  }
  ::mkdir("/mnt/upper/upper", 0755);
  ::mkdir("/mnt/upper/work", 0755);
  if (::mount("overlay", "/mnt/root", "overlay", 0,
              "lowerdir=/mnt/lower,upperdir=/mnt/upper/upper,workdir=/mnt/upper/work") != 0) {
    logLine("root: overlay: {}", std::strerror(errno));
    return false;
  }
  for (const char* d : {"/dev", "/proc", "/sys"}) {
    std::string target = std::string("/mnt/root") + d;
    ::mkdir(target.c_str(), 0755);
    if (::mount(d, target.c_str(), nullptr, MS_MOVE, nullptr) != 0) {
      logLine("root: move {}: {}", d, std::strerror(errno));
      return false;
    }
  }
  if (::chdir("/mnt/root") != 0 || ::mount(".", "/", nullptr, MS_MOVE, nullptr) != 0 ||
      ::chroot(".") != 0 || ::chdir("/") != 0) {
    logLine("root: switching root: {}", std::strerror(errno));
    return false;
  }
  return true;
}

/// Named volumes and raw disks: every `matchlock.disk.<serial>=<mount>[,ro]` parameter is a
/// virtio disk holding ext4, mounted at <mount> (created if missing). Returns false, with a
/// console message, when one cannot be mounted: the sandbox would write into its root instead.
bool mountExtraDisks() {
  std::ifstream in("/proc/cmdline");
  std::string word;
  constexpr std::string_view kPrefix = "matchlock.disk.";
  while (in >> word) {
    if (!word.starts_with(kPrefix)) {
      continue;
    }
    size_t eq = word.find('=');
    if (eq == std::string::npos || eq == kPrefix.size()) {
      logLine("disk: malformed parameter {}", word);
      return false;
    }
    std::string serial = word.substr(kPrefix.size(), eq - kPrefix.size());
    std::vector<std::string> opts = split(word.substr(eq + 1), ',');
    std::string target = opts.empty() ? "" : opts[0];
    bool read_only = false;
    for (size_t i = 1; i < opts.size(); ++i) {
      if (opts[i] == "ro" || opts[i] == "readonly") {
        read_only = true;
      } else if (opts[i] != "rw") {
        logLine("disk {}: unknown option {}", serial, opts[i]);
        return false;
      }
    }
    if (!target.starts_with("/")) {
      logLine("disk {}: mount point {} is not absolute", serial, target);
      return false;
    }
    std::string dev = waitForDisk("serial:" + serial);
    if (dev.empty()) {
      logLine("disk {}: the device did not appear", serial);
      return false;
    }
    std::error_code ec;
    std::filesystem::create_directories(target, ec);
    if (ec) {
      logLine("disk {}: creating {}: {}", serial, target, ec.message());
      return false;
    }
    unsigned long flags = MS_NOATIME;  // NOLINT(google-runtime-int)
    if (read_only) {
      flags |= MS_RDONLY;
    }
    int rc = ::mount(dev.c_str(), target.c_str(), "ext4", flags, nullptr);
    if (rc != 0 && read_only && (errno == EROFS || errno == EINVAL)) {
      // A read-only device cannot replay the journal a killed sandbox left: mount without it.
      rc = ::mount(dev.c_str(), target.c_str(), "ext4", flags, "noload");
    }
    if (rc != 0) {
      logLine("disk {}: mount {} (ext4{}) on {}: {}", serial, dev, read_only ? ", read-only" : "",
              target, std::strerror(errno));
      return false;
    }
    extraDiskMounts().push_back(target);
  }
  return true;
}

void writeFile(const std::string& path, const std::string& content) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) {
    logLine("write {}: {}", path, std::strerror(errno));
    return;
  }
  if (::write(fd.get(), content.data(), content.size()) != static_cast<ssize_t>(content.size())) {
    logLine("write {}: short write", path);
  }
}

/// /etc/hostname, /etc/hosts and /etc/resolv.conf for the sandbox (on the overlay's upper layer).
void writeEtc(const std::string& hostname, const std::string& dns) {
  struct stat st {};
  if (::stat("/etc", &st) != 0) {
    ::mkdir("/etc", 0755);
  }
  std::string name = hostname.empty() ? "matchlock" : hostname;
  writeFile("/etc/hostname", name + "\n");
  writeFile("/etc/hosts", fmt::format("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
                                      "127.0.1.1\t{}\n",
                                      name));
  if (!dns.empty()) {
    std::string resolv;
    for (const std::string& server : split(dns, ',')) {
      resolv += "nameserver " + server + "\n";
    }
    writeFile("/etc/resolv.conf", resolv);
  }
}

/// A whole file (or device) read with plain read(2); "" when it cannot be opened.
std::string readAll(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  std::string out;
  if (!fd) {
    return out;
  }
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return out;
    }
    out.append(buf, static_cast<size_t>(n));
  }
}

/// The boot config disk's JSON (a raw device, padded with spaces), or a null json when there is
/// none. A config disk that is named but unreadable is a boot failure: the sandbox would start
/// without its CA or environment.
bool readBootConfig(const std::string& spec, nlohmann::json* out) {
  if (spec.empty()) {
    return true;
  }
  std::string dev = waitForDisk(spec);
  if (dev.empty()) {
    logLine("boot config: disk {} did not appear", spec);
    return false;
  }
  *out = nlohmann::json::parse(readAll(dev), nullptr, false);
  if (!out->is_object()) {
    logLine("boot config: {} does not hold a JSON object", dev);
    return false;
  }
  return true;
}

/// The sandbox CA: its own file, and appended (once, replacing an earlier boot's) to the
/// system bundle so that every TLS client trusts the proxy without flags.
void installCa(const std::string& pem) {
  constexpr std::string_view kMarker = "# matchlock sandbox CA (replaced at every boot)\n";
  std::error_code ec;
  std::filesystem::create_directories("/etc/ssl/certs", ec);
  writeFile("/etc/ssl/certs/matchlock-ca.crt", pem);
  std::string bundle = readAll("/etc/ssl/certs/ca-certificates.crt");
  if (size_t at = bundle.find(kMarker); at != std::string::npos) {
    bundle.resize(at);
  }
  if (!bundle.empty() && bundle.back() != '\n') {
    bundle += '\n';
  }
  bundle += std::string(kMarker) + pem;
  writeFile("/etc/ssl/certs/ca-certificates.crt", bundle);
}

/// Sandbox processes run in one cgroup (v2); a fractional CPU request becomes its cpu.max quota
/// (vCPUs are the ceiling of the request). Returns the cgroup.procs path, or "" on failure.
std::string setupCgroup(const std::string& cpus) {
  mountOne("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  writeFile("/sys/fs/cgroup/cgroup.subtree_control", "+cpu +pids +memory");
  if (::mkdir("/sys/fs/cgroup/sandbox", 0755) != 0 && errno != EEXIST) {
    logLine("cgroup: {}", std::strerror(errno));
    return {};
  }
  double n = cpus.empty() ? 0 : std::strtod(cpus.c_str(), nullptr);
  if (n > 0) {
    long quota = std::max(1000L, static_cast<long>(n * 100000));  // NOLINT(google-runtime-int)
    writeFile("/sys/fs/cgroup/sandbox/cpu.max", fmt::format("{} 100000", quota));
  }
  return "/sys/fs/cgroup/sandbox/cgroup.procs";
}

[[noreturn]] void init() {
  logLine("init reached");
  ::mkdir("/proc", 0555);
  if (::mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) == 0 &&
      kernelParam("matchlock.probe") == "1") {
    // Boot probe (tests and the bare-boot benchmark baseline): prove init runs, then leave.
    powerOff();
  }
  mountOne("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  mountOne("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  std::string image_dev = kernelParam("matchlock.root");
  if (!image_dev.empty()) {
    std::string fstype = kernelParam("matchlock.rootfs");
    if (!assembleRoot(image_dev, fstype.empty() ? "ext4" : fstype,
                      kernelParam("matchlock.upper"))) {
      logLine("cannot assemble the sandbox root; powering off");
      powerOff();
    }
  }
  mountOne("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666,mode=0620");
  mountOne("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mountOne("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mountOne("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
  // No RTC on microvm: the host passes its wall clock, without which TLS validation, make and
  // every timestamp in the guest would live in 1970.
  if (std::string now = kernelParam("matchlock.time"); !now.empty()) {
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(std::strtoll(now.c_str(), nullptr, 10));
    if (ts.tv_sec > 0 && ::clock_settime(CLOCK_REALTIME, &ts) != 0) {
      logLine("clock: {}", std::strerror(errno));
    }
  }
  if (!mountExtraDisks()) {
    logLine("cannot mount the sandbox's disks; powering off");
    powerOff();
  }
  std::string hostname = kernelParam("matchlock.hostname");
  if (!hostname.empty()) {
    (void)::sethostname(hostname.data(), hostname.size());
  }
  writeEtc(hostname, kernelParam("matchlock.dns"));
  nlohmann::json boot;
  if (!readBootConfig(kernelParam("matchlock.config"), &boot)) {
    logLine("cannot read the boot config; powering off");
    powerOff();
  }
  std::map<std::string, std::string> base_env;
  std::vector<VfsRelay::Spec> vfs;
  if (boot.is_object()) {
    if (auto mounts = boot.find("vfs"); mounts != boot.end() && mounts->is_array()) {
      for (const auto& m : *mounts) {
        VfsRelay::Spec spec;
        spec.index = m.value("index", 0U);
        spec.target = m.value("target", "");
        spec.read_only = m.value("ro", false);
        spec.file = m.value("file", false);
        spec.virtiofs = m.value("virtiofs", "");
        if (spec.target.starts_with("/")) {
          vfs.push_back(std::move(spec));
        }
      }
    }
    if (auto ca = boot.find("ca_pem"); ca != boot.end() && ca->is_string() && !ca->empty()) {
      installCa(ca->get<std::string>());
    }
    if (auto env = boot.find("env"); env != boot.end() && env->is_object()) {
      for (const auto& [k, v] : env->items()) {
        if (v.is_string()) {
          base_env[k] = v.get<std::string>();
        }
      }
    }
    if (auto hosts = boot.find("hosts"); hosts != boot.end() && hosts->is_array()) {
      std::string etc_hosts = readAll("/etc/hosts");
      for (const auto& h : *hosts) {
        etc_hosts += fmt::format("{}\t{}\n", h.value("ip", ""), h.value("host", ""));
      }
      writeFile("/etc/hosts", etc_hosts);
    }
  }
  if (std::string workdir = kernelParam("matchlock.workdir"); workdir.starts_with("/")) {
    std::error_code ec;
    std::filesystem::create_directories(workdir, ec);
    if (ec) {
      logLine("workdir {}: {}", workdir, ec.message());
    }
  }
  if (Status st = bringUpLoopback(); !st) {
    logLine("network: {}", st.error().toString());
  }
  if (std::string ip = kernelParam("matchlock.ip"); !ip.empty()) {
    NetConfig net;
    net.address = ip;
    net.gateway = kernelParam("matchlock.gw");
    if (std::string mtu = kernelParam("matchlock.mtu"); !mtu.empty()) {
      net.mtu = std::atoi(mtu.c_str());
    }
    if (Status st = configureInterface(net); !st) {
      logLine("network: {}", st.error().toString());
    }
  }
  std::string cgroup_procs = setupCgroup(kernelParam("matchlock.cpus"));
  ::setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
  // The device announces its ports after the driver probes: wait for ours, bounded.
  std::string port;
  for (int i = 0; i < 1000 && port.empty(); ++i) {
    port = findVirtioPort(kChannelName);
    if (port.empty()) {
      ::usleep(5000);  // 5 s in all
    }
  }
  if (port.empty()) {
    logLine("no host channel ({} not found); powering off", kChannelName);
    powerOff();
  }
  Fd channel(::open(port.c_str(), O_RDWR | O_CLOEXEC | O_NONBLOCK));
  if (!channel) {
    logLine("open {}: {}", port, std::strerror(errno));
    powerOff();
  }
  Agent::Options opts;
  opts.reconnectable = true;
  opts.cgroup_procs = cgroup_procs;
  opts.base_env = std::move(base_env);
  opts.vfs = std::move(vfs);
  opts.isolation =
      kernelParam("matchlock.privileged") == "1" ? Isolation::Namespaces : Isolation::Full;
  int rc = serve(std::move(channel), std::move(opts));
  logLine("agent finished ({}); powering off", rc);
  powerOff();
}

}  // namespace
}  // namespace matchlock::guest

int main(int argc, char** argv) {
  using matchlock::guest::logLine;
  if (argc >= 1 && std::strcmp(argv[0], matchlock::guest::kExecInitName) == 0) {
    matchlock::guest::runExecInit();  // before the PID-1 check: it is PID 1 of its namespace
  }
  if (::getpid() == 1) {
    matchlock::guest::init();
  }
  if (argc >= 2 && std::strcmp(argv[1], "version") == 0) {
    std::printf("matchlock-guest %s\n", matchlock::guest::kVersion);
    return 0;
  }
  if (argc == 3 && std::strcmp(argv[1], "__service") == 0) {
    return matchlock::guest::runService(argv[2]);
  }
  if (argc >= 2 && std::strcmp(argv[1], "selftest") == 0) {
    std::puts("selftest: ok");
    return 0;
  }
  if (argc == 4 && std::strcmp(argv[1], "agent") == 0 && std::strcmp(argv[2], "--fd") == 0) {
    int fd = std::atoi(argv[3]);
    if (fd < 3 || ::fcntl(fd, F_GETFD) < 0) {
      logLine("agent: --fd {} is not an open descriptor", argv[3]);
      return 64;
    }
    (void)::fcntl(fd, F_SETFD, FD_CLOEXEC);
    return matchlock::guest::serve(matchlock::Fd(fd), matchlock::guest::Agent::Options{});
  }
  std::fprintf(stderr, "usage: matchlock-guest version | selftest | agent --fd N\n");
  return 64;
}
