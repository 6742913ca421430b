// SPDX-License-Identifier: Apache-2.0
#pragma once

namespace matchlock::cli {

/// Parses the command line and runs the command. Returns the process exit code:
/// 0 success, 64 usage error, 65 invalid spec, 66 missing input, 70 internal error, others per
/// docs/error-handling.md.
int run(int argc, char** argv);

}  // namespace matchlock::cli
