// SPDX-License-Identifier: Apache-2.0
#include "vm/qemu/qemu.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

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

Result<sys::ChildProcess> QemuBackend::start(const VmConfig& config, const sys::SpawnOptions& io) {
  if (config.accel == Accel::Auto) {
    return makeError(Errc::Internal, "QemuBackend::start needs a resolved accelerator");
  }
  return sys::ChildProcess::spawn(buildArgv(config, binary_), io);
}

std::vector<std::string> buildArgv(const VmConfig& c, const std::string& qemu_binary) {
  const bool shared_memory = !c.vhost_user_fs_socket.empty();
  std::vector<std::string> argv = {
      qemu_binary,
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
    argv.insert(argv.end(), {"-accel", "tcg"});
  }
  if (shared_memory) {
    // A vhost-user backend maps the guest's RAM: it must be a shared memfd. Modern virtio-mmio:
    // virtio-fs wants VIRTIO_F_VERSION_1, which the legacy transport (microvm's default) lacks.
    argv.insert(
        argv.end(),
        {"-object", fmt::format("memory-backend-memfd,id=mem,size={}M,share=on", c.memory_mib),
         "-global", "virtio-mmio.force-legacy=false"});
  }
  argv.insert(argv.end(), {"-kernel", c.kernel, "-initrd", c.initramfs});
  std::vector<std::string> params = {"console=ttyS0", "reboot=t", "panic=-1", "quiet"};
  params.insert(params.end(), c.kernel_params.begin(), c.kernel_params.end());
  argv.insert(argv.end(), {"-append", join(params, " ")});
  if (!c.console_log.empty()) {
    argv.insert(argv.end(), {"-serial", "file:" + c.console_log});
  }
  for (size_t i = 0; i < c.disks.size(); ++i) {
    const DiskSpec& d = c.disks[i];
    argv.insert(argv.end(),
                {"-drive",
                 fmt::format("file={},if=none,id=disk{},format=raw{}", d.path, i,
                             d.readonly ? ",readonly=on" : ""),
                 "-device", fmt::format("virtio-blk-device,drive=disk{},serial={}", i, d.serial)});
  }
  if (c.tap_fd >= 0) {
    argv.insert(argv.end(), {"-netdev", fmt::format("tap,id=net0,fd={}", c.tap_fd), "-device",
                             fmt::format("virtio-net-device,netdev=net0{}",
                                         c.mac.empty() ? "" : ",mac=" + c.mac)});
  }
  if (!c.channel_socket.empty()) {
    argv.insert(argv.end(),
                {"-device", "virtio-serial-device", "-chardev",
                 fmt::format("socket,id=channel,path={},server=on,wait=off", c.channel_socket),
                 "-device", "virtserialport,chardev=channel,name=matchlock.0"});
  }
  if (shared_memory) {
    // queue-size 1024: the driver caps a request at (queue size - 4) pages, so 1024 lets a READ
    // or WRITE carry a whole MiB (FUSE's 256-page maximum) in one chain.
    argv.insert(
        argv.end(),
        {"-chardev", fmt::format("socket,id=vfs,path={}", c.vhost_user_fs_socket), "-device",
         fmt::format("vhost-user-fs-device,chardev=vfs,tag={},queue-size=1024",
                     c.vhost_user_fs_tag)});
  }
  if (!c.control_socket.empty()) {
    argv.insert(argv.end(), {"-qmp", fmt::format("unix:{},server=on,wait=off", c.control_socket)});
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
