// SPDX-License-Identifier: Apache-2.0
// matchlock-guest entry point. The boot sequence (mounts, overlay root, network, exec agent) is
// built by the VM runtime issue. Today the binary proves the static toolchain works and, when it
// runs as PID 1, that the guest kernel reaches init: it reports on the console and powers off.
#include <fcntl.h>
#include <sys/reboot.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

namespace {

void writeConsole(const char* msg) {
  int fd = ::open("/dev/console", O_WRONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    fd = STDOUT_FILENO;
  }
  size_t len = std::strlen(msg);
  while (len > 0) {
    ssize_t n = ::write(fd, msg, len);
    if (n <= 0) {
      break;
    }
    msg += n;
    len -= static_cast<size_t>(n);
  }
  if (fd != STDOUT_FILENO) {
    ::close(fd);
  }
}

// PID 1 without a boot sequence yet: say so and leave. The VMM runs with -no-reboot, so a reboot
// request ends it; microvm has no ACPI power button, which makes RB_POWER_OFF merely halt.
[[noreturn]] void bootProbe() {
  writeConsole("matchlock-guest: init reached\n");
  ::sync();
  ::reboot(RB_AUTOBOOT);
  for (;;) {
    ::pause();
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (::getpid() == 1) {
    bootProbe();
  }
  if (argc >= 2 && std::strcmp(argv[1], "version") == 0) {
    std::puts("matchlock-guest 0.1.0");
    return 0;
  }
  if (argc >= 2 && std::strcmp(argv[1], "selftest") == 0) {
    std::puts("selftest: ok");
    return 0;
  }
  std::fprintf(stderr, "usage: matchlock-guest version|selftest\n");
  return 64;
}
