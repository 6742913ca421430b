// SPDX-License-Identifier: Apache-2.0
// Composition root of the `matchlock` binary.
#include <cstdio>
#include <exception>

#include "cli/cli.h"

int main(int argc, char** argv) {
  try {
    return matchlock::cli::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "matchlock: internal error: %s\n", e.what());
    return 70;
  } catch (...) {
    std::fprintf(stderr, "matchlock: internal error\n");
    return 70;
  }
}
