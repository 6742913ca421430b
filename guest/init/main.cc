// SPDX-License-Identifier: Apache-2.0
// matchlock-guest entry point. The boot sequence (mounts, overlay root, network, exec agent) is
// built by the VM runtime issue; today the binary proves the static toolchain works.
#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
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
