// SPDX-License-Identifier: Apache-2.0
#include "vm/qemu/qemu.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdlib>

#include "common/fd.h"
#include "common/log.h"
#include "common/sha256.h"
#include "common/strings.h"
#include "sys/process.h"

namespace matchlock::vm {

Result<Accel> parseAccel(std::string_view text) {
  if (text == "auto") {
    return Accel::Auto;
  }
  if (text == "kvm") {
    return Accel::Kvm;
  }
  if (text == "tcg") {
    return Accel::Tcg;
  }
  return makeError(Errc::InvalidSpec,
                   fmt::format("invalid accelerator '{}': expected kvm, tcg or auto", text));
}

std::string_view toString(Accel accel) {
  switch (accel) {
    case Accel::Auto:
      return "auto";
    case Accel::Kvm:
      return "kvm";
    case Accel::Tcg:
      return "tcg";
  }
  return "auto";
}

int vcpuCount(double cpus) {
  return std::max(1, static_cast<int>(std::ceil(cpus)));
}

Result<BackendPtr> makeBackend(std::string_view name) {
  if (name == "qemu") {
    return BackendPtr(std::make_unique<qemu::QemuBackend>());
  }
  return makeError(Errc::NotFound,
                   fmt::format("VM backend '{}' is not available (this build has: qemu)", name));
}

namespace qemu {

namespace {

constexpr const char* kJailVmmDir = "/run/vmm";
constexpr const char* kJailKernel = "/boot/kernel";
constexpr const char* kJailInitramfs = "/boot/initramfs";

/// A path as the VMM sees it: inside the jail, the VMM directory is /run/vmm.
std::string vmmPath(const VmConfig& c, const std::string& path) {
  if (!c.jail) {
    return path;
  }
  const std::string& dir = c.jail->vmm_dir;
  if (path.size() > dir.size() && path.starts_with(dir) && path[dir.size()] == '/') {
    return kJailVmmDir + path.substr(dir.size());
  }
  return path;  // not reachable in the jail: the VMM reports it
}

/// The jail's contents: the system's /usr and library links (QEMU is a dynamic binary that
/// loads its firmware from /usr/share), a few devices, the kernel and initramfs read-only, and
/// the VMM directory; disks arrive as inherited descriptors. Nothing else of the host.
Result<sys::JailSpec> jailFor(const VmConfig& c, const std::string& binary) {
  const VmmJail& j = *c.jail;
  sys::JailSpec spec;
  spec.root = j.root;
  spec.uid = j.uid;
  spec.gid = j.gid;
  spec.cgroup_fds = j.cgroup_fds;
  spec.hostname = "vmm";
  spec.binds.push_back({"/usr", "/usr", false});
  for (const char* top : {"/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"}) {
    struct stat st {};
    if (::lstat(top, &st) != 0) {
      continue;
    }
    if (S_ISLNK(st.st_mode)) {
      std::array<char, 4096> target{};
      ssize_t n = ::readlink(top, target.data(), target.size() - 1);
      if (n > 0) {
        spec.symlinks.emplace_back(top, std::string(target.data(), static_cast<size_t>(n)));
      }
    } else if (S_ISDIR(st.st_mode)) {
      spec.binds.push_back({top, top, false});
    }
  }
  if (!binary.starts_with("/usr/")) {
    spec.binds.push_back({binary, binary, false});
  }
  for (const char* dev : {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"}) {
    spec.binds.push_back({dev, dev, true});
  }
  if (c.accel == Accel::Kvm) {
    struct stat st {};
    if (::stat("/dev/kvm", &st) != 0) {
      return makeError(Errc::Unavailable, "/dev/kvm", errno);
    }
    spec.binds.push_back({"/dev/kvm", "/dev/kvm", true});
    spec.groups.push_back(st.st_gid);
  }
  spec.binds.push_back({c.kernel, kJailKernel, false});
  spec.binds.push_back({c.initramfs, kJailInitramfs, false});
  spec.binds.push_back({j.vmm_dir, kJailVmmDir, true});
  // Files: the console log and the writable disks may grow to the largest disk, no further.
  rlim_t max_file = rlim_t{64} << 20;
  for (const DiskSpec& d : c.disks) {
    struct stat st {};
    if (!d.readonly && ::stat(d.path.c_str(), &st) == 0) {
      max_file = std::max(max_file, static_cast<rlim_t>(st.st_size));
    }
  }
  spec.rlimits = {{RLIMIT_NOFILE, 4096},
                  {RLIMIT_NPROC, kVmmMaxThreads},
                  {RLIMIT_FSIZE, max_file},
                  {RLIMIT_CORE, 0}};
  return spec;
}

}  // namespace

Result<sys::ChildProcess> QemuBackend::start(const VmConfig& config, const sys::SpawnOptions& io) {
  if (config.accel == Accel::Auto) {
    return makeError(Errc::Internal, "QemuBackend::start needs a resolved accelerator");
  }
  if (!config.jail) {
    return sys::ChildProcess::spawn(buildArgv(config, binary_), io);
  }
  // A jailed VMM opens no host path: the disks come as descriptors (QEMU fd sets).
  VmConfig c = config;
  sys::SpawnOptions opts = io;
  std::vector<Fd> disk_fds;
  for (DiskSpec& d : c.disks) {
    // QEMU opens a writable disk read-only first, then read-write: its fd set holds both.
    for (int mode : {O_RDONLY, O_RDWR}) {
      if (mode == O_RDWR && d.readonly) {
        continue;
      }
      Fd fd(::open(d.path.c_str(), mode | O_CLOEXEC));
      if (!fd) {
        return makeError(Errc::System, fmt::format("opening disk {}", d.path), errno);
      }
      (mode == O_RDONLY ? d.fd : d.rw_fd) = fd.get();
      opts.inherit_fds.push_back(fd.get());
      disk_fds.push_back(std::move(fd));
    }
  }
  std::string binary = binary_;
  if (binary.find('/') == std::string::npos) {
    ML_ASSIGN_OR_RETURN(binary, sys::findExecutable(binary));
  }
  ML_ASSIGN_OR_RETURN(sys::JailSpec spec, jailFor(c, binary));
  ML_ASSIGN_OR_RETURN(sys::JailPlan plan, sys::planJail(spec));
  opts.jail = &plan;
  return sys::ChildProcess::spawn(buildArgv(c, binary), opts);
}

std::vector<std::string> buildArgv(const VmConfig& c, const std::string& qemu_binary) {
  const bool shared_memory = !c.vhost_user_fs_socket.empty();
  std::vector<std::string> argv = {
      qemu_binary,
      "-name",
      c.id.empty() ? std::string("matchlock") : c.id,
      "-M",
      fmt::format("microvm,x-option-roms=off,rtc=off,acpi=off{}",
                  shared_memory ? ",memory-backend=mem" : ""),
      "-nodefaults",
      "-no-user-config",
      "-nographic",
      "-no-reboot",
      "-smp",
      std::to_string(vcpuCount(c.cpus)),
      "-m",
      fmt::format("{}M", c.memory_mib),
  };
  if (c.accel == Accel::Kvm) {
    // microvm under QEMU 7.2 with KVM wants the host CPU without arch-capabilities.
    argv.insert(argv.end(), {"-accel", "kvm", "-cpu", "host,arch-capabilities=off"});
  } else {
    // The translation cache bounded (QEMU's default is 1 GiB): it counts towards the VMM's
    // memory margin (supervisor: kVmmMemoryMarginMib).
    argv.insert(argv.end(), {"-accel", "tcg,tb-size=256"});
  }
  if (shared_memory) {
    // A vhost-user backend maps the guest's RAM: it must be a shared memfd. Modern virtio-mmio:
    // virtio-fs wants VIRTIO_F_VERSION_1, which the legacy transport (microvm's default) lacks.
    argv.insert(
        argv.end(),
        {"-object", fmt::format("memory-backend-memfd,id=mem,size={}M,share=on", c.memory_mib),
         "-global", "virtio-mmio.force-legacy=false"});
  }
  if (c.jail) {
    // QEMU's own seccomp filter on top of the jail: no obsolete calls, no setuid, no fork or
    // exec, no scheduler or resource changes.
    argv.insert(argv.end(), {"-sandbox",
                             "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
                             "resourcecontrol=deny"});
  }
  argv.insert(argv.end(), {"-kernel", c.jail ? kJailKernel : c.kernel, "-initrd",
                           c.jail ? kJailInitramfs : c.initramfs});
  std::vector<std::string> params = {"console=ttyS0", "reboot=t", "panic=-1", "quiet"};
  params.insert(params.end(), c.kernel_params.begin(), c.kernel_params.end());
  argv.insert(argv.end(), {"-append", join(params, " ")});
  if (!c.console_log.empty()) {
    argv.insert(argv.end(), {"-serial", "file:" + vmmPath(c, c.console_log)});
  }
  for (size_t i = 0; i < c.disks.size(); ++i) {
    const DiskSpec& d = c.disks[i];
    std::string file = d.path;
    if (d.fd >= 0) {
      // An inherited descriptor in fd set i+1; QEMU opens "/dev/fdset/N" by duplicating it.
      argv.insert(argv.end(), {"-add-fd", fmt::format("fd={},set={}", d.fd, i + 1)});
      if (d.rw_fd >= 0) {
        argv.insert(argv.end(), {"-add-fd", fmt::format("fd={},set={}", d.rw_fd, i + 1)});
      }
      file = fmt::format("/dev/fdset/{}", i + 1);
    }
    argv.insert(argv.end(),
                {"-drive",
                 fmt::format("file={},if=none,id=disk{},format=raw{}", file, i,
                             d.readonly ? ",readonly=on" : ""),
                 "-device", fmt::format("virtio-blk-device,drive=disk{},serial={}", i, d.serial)});
  }
  if (c.tap_fd >= 0) {
    argv.insert(argv.end(), {"-netdev", fmt::format("tap,id=net0,fd={}", c.tap_fd), "-device",
                             fmt::format("virtio-net-device,netdev=net0{}",
                                         c.mac.empty() ? "" : ",mac=" + c.mac)});
  }
  if (!c.channel_socket.empty()) {
    argv.insert(argv.end(), {"-device", "virtio-serial-device", "-chardev",
                             fmt::format("socket,id=channel,path={},server=on,wait=off",
                                         vmmPath(c, c.channel_socket)),
                             "-device", "virtserialport,chardev=channel,name=matchlock.0"});
  }
  if (shared_memory) {
    // queue-size 1024: the driver caps a request at (queue size - 4) pages, so 1024 lets a READ
    // or WRITE carry a whole MiB (FUSE's 256-page maximum) in one chain.
    argv.insert(
        argv.end(),
        {"-chardev", fmt::format("socket,id=vfs,path={}", vmmPath(c, c.vhost_user_fs_socket)),
         "-device",
         fmt::format("vhost-user-fs-device,chardev=vfs,tag={},queue-size=1024",
                     c.vhost_user_fs_tag)});
  }
  if (!c.control_socket.empty()) {
    argv.insert(argv.end(),
                {"-qmp", fmt::format("unix:{},server=on,wait=off", vmmPath(c, c.control_socket))});
  }
  return argv;
}

ProbeResult probeKvm(const std::string& qemu_binary, const std::string& kernel,
                     const std::string& initramfs, const std::string& cache_file,
                     std::chrono::milliseconds bound) {
  if (auto cached = readFile(cache_file); cached) {
    std::string_view v = trim(*cached);
    if (v == "kvm" || v.rfind("tcg", 0) == 0) {
      return ProbeResult{v == "kvm", std::string(v)};
    }
  }
  ProbeResult result;
  if (::access("/dev/kvm", R_OK | W_OK) != 0) {
    result.detail = "tcg: /dev/kvm is missing or not accessible";
  } else {
    char dir_tmpl[] = "/tmp/matchlock-kvm-probe-XXXXXX";
    if (::mkdtemp(dir_tmpl) == nullptr) {
      return ProbeResult{false, "tcg: cannot create a probe directory"};
    }
    std::string dir = dir_tmpl;
    VmConfig c;
    c.kernel = kernel;
    c.initramfs = initramfs;
    c.memory_mib = 128;
    c.console_log = dir + "/console.log";
    c.kernel_params = {"matchlock.probe=1"};
    c.accel = Accel::Kvm;
    sys::SpawnOptions opts;
    opts.stdout_path = dir + "/qemu.log";
    opts.stderr_path = opts.stdout_path;
    auto child = sys::ChildProcess::spawn(buildArgv(c, qemu_binary), opts);
    if (!child) {
      result.detail = "tcg: " + child.error().toString();
    } else {
      auto exit = child->waitFor(bound);
      std::string console = readFile(c.console_log).value_or("");
      if (!exit || !*exit) {
        (void)child->terminate(std::chrono::milliseconds(0));
        result.detail = fmt::format("tcg: a KVM boot did not finish within {} ms", bound.count());
      } else if ((*exit)->code != 0 || console.find("init reached") == std::string::npos) {
        std::string log = readFile(opts.stdout_path).value_or("");
        result.detail = fmt::format("tcg: KVM boot failed (exit {}): {}", (*exit)->code,
                                    trim(log.substr(0, 200)));
      } else {
        result.kvm_works = true;
        result.detail = "kvm";
      }
    }
    (void)::unlink(c.console_log.c_str());
    (void)::unlink(opts.stdout_path.c_str());
    (void)::rmdir(dir.c_str());
  }
  (void)writeFileAtomic(cache_file, result.kvm_works ? "kvm\n" : result.detail + "\n");
  return result;
}

Accel resolveAccel(Accel requested, const std::string& qemu_binary, const std::string& kernel,
                   const std::string& initramfs, const std::string& cache_dir) {
  if (requested == Accel::Auto) {
    if (const char* env = std::getenv("MATCHLOCK_ACCEL"); env != nullptr && *env != '\0') {
      if (auto a = parseAccel(env); a) {
        requested = *a;
      }
    }
  }
  if (requested != Accel::Auto) {
    return requested;
  }
  // One probe per kernel: the answer depends on host, QEMU and kernel, not on the sandbox.
  std::string key = sha256Hex(qemu_binary + "\n" + kernel).substr(0, 16);
  ProbeResult r = probeKvm(qemu_binary, kernel, initramfs,
                           fmt::format("{}/accel-{}", cache_dir, key), std::chrono::seconds(10));
  ML_LOG(vm, info, "accelerator auto: {}", r.detail);
  return r.kvm_works ? Accel::Kvm : Accel::Tcg;
}

}  // namespace qemu
}  // namespace matchlock::vm
