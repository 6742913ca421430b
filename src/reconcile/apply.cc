// SPDX-License-Identifier: Apache-2.0
#include "reconcile/apply.h"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>

namespace matchlock::reconcile {
namespace {

enum class JobState { Waiting, Running, Done };

struct Job {
  const Action* action = nullptr;
  const Desired* desired = nullptr;
  std::vector<size_t> deps;  ///< indexes of jobs this one waits for
  bool has_dependents = false;
  JobState state = JobState::Waiting;
  Outcome outcome;
};

bool startsSomething(ActionKind kind) {
  return kind == ActionKind::Create || kind == ActionKind::Recreate || kind == ActionKind::Start;
}

}  // namespace

std::vector<Outcome> apply(const Plan& plan, const std::map<std::string, Desired>& desired,
                           Driver& driver, const ApplyOptions& options,
                           const ProgressFn& progress) {
  std::vector<Job> jobs(plan.actions.size());
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < plan.actions.size(); ++i) {
    jobs[i].action = &plan.actions[i];
    jobs[i].outcome.sandbox = plan.actions[i].sandbox;
    jobs[i].outcome.kind = plan.actions[i].kind;
    if (plan.actions[i].kind != ActionKind::Remove) {
      index[plan.actions[i].sandbox] = i;
      if (auto it = desired.find(plan.actions[i].sandbox); it != desired.end()) {
        jobs[i].desired = &it->second;
      }
    }
  }
  for (auto& job : jobs) {
    if (job.desired == nullptr) {
      continue;
    }
    for (const std::string& dep : job.desired->spec.depends_on) {
      if (auto it = index.find(dep); it != index.end()) {
        job.deps.push_back(it->second);
        jobs[it->second].has_dependents = true;
      }
    }
  }

  std::mutex mu;
  std::condition_variable cv;
  size_t remaining = jobs.size();

  auto runJob = [&](Job& job) {
    auto started = std::chrono::steady_clock::now();
    const Action& action = *job.action;
    Status status = ok();
    if (startsSomething(action.kind) && job.desired != nullptr && !job.desired->blocked.empty()) {
      status = makeError(Errc::InvalidSpec, job.desired->blocked);
    } else if (action.kind != ActionKind::Noop) {
      status = driver.apply(action, job.desired);
    }
    // Wait for readiness when asked to, or when dependents need this sandbox up. A noop
    // sandbox that runs is ready at once; asking costs one state read.
    if (status && action.kind != ActionKind::Remove && (options.wait || job.has_dependents)) {
      status = driver.waitReady(action.sandbox);
      job.outcome.ready = static_cast<bool>(status);
    }
    job.outcome.status = std::move(status);
    job.outcome.elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::steady_clock::now() - started);
  };

  auto worker = [&] {
    std::unique_lock lock(mu);
    for (;;) {
      Job* next = nullptr;
      bool settled = false;
      for (auto& job : jobs) {
        if (job.state != JobState::Waiting) {
          continue;
        }
        bool ready = true;
        const Job* failed = nullptr;
        for (size_t d : job.deps) {
          if (jobs[d].state != JobState::Done) {
            ready = false;
          } else if (!jobs[d].outcome.status) {
            failed = &jobs[d];
          }
        }
        if (failed != nullptr) {
          // A failed dependency settles this job at once (and, in turn, its dependents).
          job.state = JobState::Done;
          job.outcome.skipped = true;
          job.outcome.status =
              makeError(Errc::Unavailable,
                        fmt::format("not started: dependency {} failed", failed->outcome.sandbox));
          --remaining;
          if (progress) {
            progress(job.outcome);
          }
          cv.notify_all();
          settled = true;
          break;  // rescan from the start: states changed
        }
        if (ready) {
          next = &job;
          break;
        }
      }
      if (settled) {
        continue;
      }
      if (next == nullptr) {
        if (remaining == 0) {
          return;
        }
        bool any_waiting =
            std::ranges::any_of(jobs, [](const Job& j) { return j.state == JobState::Waiting; });
        if (!any_waiting) {
          return;  // the rest is running on other workers
        }
        cv.wait(lock);
        continue;
      }
      next->state = JobState::Running;
      lock.unlock();
      runJob(*next);
      lock.lock();
      next->state = JobState::Done;
      --remaining;
      if (progress) {
        progress(next->outcome);
      }
      cv.notify_all();
    }
  };

  size_t threads = std::clamp<size_t>(options.parallelism, 1, std::max<size_t>(jobs.size(), 1));
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (size_t i = 1; i < threads; ++i) {
    pool.emplace_back(worker);
  }
  worker();
  for (auto& t : pool) {
    t.join();
  }

  std::vector<Outcome> out;
  out.reserve(jobs.size());
  for (auto& job : jobs) {
    out.push_back(std::move(job.outcome));
  }
  return out;
}

}  // namespace matchlock::reconcile
