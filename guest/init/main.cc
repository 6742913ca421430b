// SPDX-License-Identifier: Apache-2.0
// matchlock-guest: PID 1 of every sandbox VM, and the exec agent.
//   (PID 1)                 boot: mount the pseudo filesystems, find the host channel (the
//                           virtio-serial port named matchlock.0), serve it until the host asks
//                           for a shutdown, then sync and power off.
//   matchlock-guest agent --fd N   serve the protocol on an inherited fd (tests)
//   matchlock-guest version|selftest
// The image root (overlay of the image disk and the upper disk), networking and /etc files join
// the boot sequence with the VM runtime issue's remaining steps.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "common/fd.h"
#include "ev/loop.h"
#include "guest/agent/agent.h"
#include "guest/agent/log.h"

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

/// /dev/vportNpM whose sysfs name is `name`, or "" (no udev in the guest to make the symlink).
std::string findVirtioPort(const std::string& name) {
  DIR* dir = ::opendir("/sys/class/virtio-ports");
  if (dir == nullptr) {
    return {};
  }
  std::string found;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') {
      continue;
    }
    std::ifstream in(std::string("/sys/class/virtio-ports/") + e->d_name + "/name");
    std::string port_name;
    std::getline(in, port_name);
    if (port_name == name) {
      found = std::string("/dev/") + e->d_name;
      break;
    }
  }
  ::closedir(dir);
  return found;
}

int serve(Fd channel, bool reconnectable) {
  auto loop = ev::Loop::create();
  if (!loop) {
    logLine("event loop: {}", loop.error().toString());
    return 70;
  }
  Agent::Options opts;
  opts.reconnectable = reconnectable;
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

[[noreturn]] void powerOff() {
  ::sync();
  // The VMM runs with -no-reboot: a reboot request ends it. microvm has no ACPI power button,
  // so RB_POWER_OFF would merely halt.
  ::reboot(RB_AUTOBOOT);
  for (;;) {
    ::pause();
  }
}

[[noreturn]] void init() {
  logLine("init reached");
  ::mkdir("/proc", 0555);
  if (::mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) == 0 &&
      kernelParam("matchlock.probe") == "1") {
    // Boot probe (tests and the bare-boot benchmark baseline): prove init runs, then leave.
    powerOff();
  }
  mountOne("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  mountOne("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  mountOne("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  mountOne("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666,mode=0620");
  mountOne("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mountOne("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mountOne("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
  std::string hostname = kernelParam("matchlock.hostname");
  if (!hostname.empty()) {
    (void)::sethostname(hostname.data(), hostname.size());
  }
  ::setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
  // The device announces its ports after the driver probes: wait for ours, bounded.
  std::string port;
  for (int i = 0; i < 250 && port.empty(); ++i) {
    port = findVirtioPort(kChannelName);
    if (port.empty()) {
      ::usleep(20000);
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
  int rc = serve(std::move(channel), true);
  logLine("agent finished ({}); powering off", rc);
  powerOff();
}

}  // namespace
}  // namespace matchlock::guest

int main(int argc, char** argv) {
  using matchlock::guest::logLine;
  if (::getpid() == 1) {
    matchlock::guest::init();
  }
  if (argc >= 2 && std::strcmp(argv[1], "version") == 0) {
    std::printf("matchlock-guest %s\n", matchlock::guest::kVersion);
    return 0;
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
    return matchlock::guest::serve(matchlock::Fd(fd), false);
  }
  std::fprintf(stderr, "usage: matchlock-guest version | selftest | agent --fd N\n");
  return 64;
}
