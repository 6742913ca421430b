// SPDX-License-Identifier: Apache-2.0
#include "runtime/main_process.h"

#include <fmt/format.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/strings.h"
#include "runtime/exec_client.h"
#include "state/store.h"

namespace matchlock::runtime {
namespace {

constexpr std::chrono::seconds kMaxBackoff{30};
constexpr std::chrono::seconds kHealthyRun{10};

bool shouldRestart(const std::string& policy, int code) {
  if (policy == "always" || policy == "unless-stopped") {
    return true;
  }
  return policy == "on-failure" && code != 0;
}

void note(const std::string& line) {
  // Interleaved with the process's own output in main.log, clearly marked.
  fmt::print(stderr, "[matchlock] {}\n", line);
  std::fflush(stderr);
}

}  // namespace

Status runMainProcess(const supervisor::Config& config) {
  if (!config.main_process) {
    return ok();
  }
  // Die with the supervisor: the main process is part of the sandbox, never an orphan.
  (void)::prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (::getppid() == 1) {
    return ok();
  }
  const supervisor::MainProcess& main = *config.main_process;
  std::optional<state::Store> store;
  if (!config.state_db.empty()) {
    if (auto s = state::Store::open(config.state_db); s) {
      store.emplace(std::move(*s));
    }
  }
  auto event = [&](const std::string& kind, const std::string& message, nlohmann::json data) {
    if (!store) {
      return;
    }
    state::Event e;
    e.sandbox_id = config.sandbox_id;
    e.kind = kind;
    e.message = message;
    e.data_json = data.dump();
    (void)store->appendEvent(e);
  };

  const std::string control = supervisor::controlSocketPath(config.run_dir);
  auto backoff = std::chrono::seconds(1);
  for (int run = 1;; ++run) {
    ExecClientOptions eo;
    eo.request.argv = main.argv;
    eo.request.env = main.env;
    eo.request.cwd = main.cwd;
    eo.request.user = main.user;
    eo.request.kill_grace_seconds = 5;
    eo.connect_timeout_ms = 2000;
    note(fmt::format("starting (run {}): {}", run, join(main.argv, " ")));
    event("main.started", fmt::format("main process started (run {})", run), {{"run", run}});
    auto started = std::chrono::steady_clock::now();
    auto r = runExec(control, eo);
    if (!r) {
      // The sandbox is going away (or was never reachable): nothing to restart into.
      note(fmt::format("stopped: {}", r.error().message()));
      return ok();
    }
    int code = *r;
    bool restart = shouldRestart(main.restart, code);
    event("main.exited", fmt::format("main process exited with code {}", code),
          {{"run", run}, {"code", code}, {"restart", restart}});
    if (!restart) {
      note(fmt::format("exited with code {} (restart: {})", code, main.restart));
      return ok();
    }
    if (std::chrono::steady_clock::now() - started >= kHealthyRun) {
      backoff = std::chrono::seconds(1);
    }
    note(fmt::format("exited with code {}; restarting in {} s (restart: {})", code, backoff.count(),
                     main.restart));
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, kMaxBackoff);
    if (::getppid() == 1) {
      return ok();
    }
  }
}

}  // namespace matchlock::runtime
