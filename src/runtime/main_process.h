// SPDX-License-Identifier: Apache-2.0
#pragma once

#include "common/result.h"
#include "supervisor/supervisor.h"

namespace matchlock::runtime {

/// `matchlock __main`: runs the sandbox's main process through the supervisor's control socket
/// (stdout/stderr go to ours, which the supervisor points at main.log) and restarts it as
/// config.main_process->restart says, with backoff (1 s doubling to 30 s; back to 1 s after a run
/// of 10 s or more). Records `main.started` / `main.exited` events. Ends when the policy says so,
/// when the supervisor's socket is gone (the sandbox is stopping), or when its parent dies.
Status runMainProcess(const supervisor::Config& config);

}  // namespace matchlock::runtime
