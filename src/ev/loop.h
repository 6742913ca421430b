// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <sys/epoll.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common/fd.h"
#include "common/result.h"

namespace matchlock::ev {

/// Interest and readiness bits (epoll's, level-triggered).
inline constexpr uint32_t kRead = EPOLLIN;
inline constexpr uint32_t kWrite = EPOLLOUT;
/// Reported on errors and hang-ups whatever the interest was.
inline constexpr uint32_t kError = EPOLLERR | EPOLLHUP;

class Loop;

/// Called with the ready bits (a subset of kRead | kWrite | kError | EPOLLRDHUP).
using FdCallback = std::function<void(uint32_t events)>;

/// An fd registered with a Loop. RAII: destroying or resetting it unregisters the fd, and no
/// callback for it runs afterwards, even for events already fetched in the current batch. The
/// Watch does not own the fd; the owner must reset the Watch before closing the fd. A Watch must
/// not outlive its Loop.
class Watch {
 public:
  Watch() = default;
  Watch(const Watch&) = delete;
  Watch& operator=(const Watch&) = delete;
  Watch(Watch&& other) noexcept { *this = std::move(other); }
  Watch& operator=(Watch&& other) noexcept;
  ~Watch() { reset(); }

  /// Changes the interest set (kRead | kWrite); a no-op when unchanged.
  Status setEvents(uint32_t events);
  uint32_t events() const { return events_; }
  void reset();
  explicit operator bool() const { return loop_ != nullptr; }

 private:
  friend class Loop;
  Loop* loop_ = nullptr;
  int fd_ = -1;
  uint64_t id_ = 0;
  uint32_t events_ = 0;
};

/// A one-shot or periodic timer on a timerfd. RAII like Watch.
class Timer {
 public:
  Timer() = default;
  Timer(Timer&&) noexcept = default;
  Timer& operator=(Timer&&) noexcept = default;
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  ~Timer() = default;

  /// Arms the timer: fires after `delay`, then every `interval` if non-zero.
  Status arm(std::chrono::milliseconds delay,
             std::chrono::milliseconds interval = std::chrono::milliseconds(0));
  Status disarm();
  explicit operator bool() const { return static_cast<bool>(fd_); }

 private:
  friend class Loop;
  Fd fd_;
  Watch watch_;
};

/// A thin single-threaded epoll loop (STYLE.md 7.6). All methods except post() and stop() must be
/// called on the loop thread.
class Loop {
 public:
  static Result<std::unique_ptr<Loop>> create();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;
  Loop(Loop&&) = delete;
  Loop& operator=(Loop&&) = delete;
  ~Loop();

  /// Registers `fd` (not owned) with the interest set `events`.
  Result<Watch> watch(int fd, uint32_t events, FdCallback callback);

  /// Creates a disarmed timer that runs `callback` on expiry.
  Result<Timer> timer(std::function<void()> callback);

  /// Queues `fn` to run on the loop thread. Thread-safe.
  void post(std::function<void()> fn);

  /// Runs until stop(). Thread-safe stop.
  Status run();
  void stop();

  /// Waits up to `timeout_ms` (-1 forever) for one batch of events and dispatches it.
  Status runOnce(int timeout_ms);

  /// Number of live watches (tests, diagnostics).
  size_t watchCount() const { return entries_.size(); }

 private:
  struct Entry {
    int fd;
    FdCallback callback;
  };
  Loop(Fd epoll, Fd wake);
  void unregister(Watch& w);
  Status modify(Watch& w, uint32_t events);
  void drainPosted();

  Fd epoll_;
  Fd wake_;
  Watch wake_watch_;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<Entry>> entries_;
  std::mutex posted_mutex_;
  std::vector<std::function<void()>> posted_;
  bool stop_ = false;
  std::mutex stop_mutex_;

  friend class Watch;
};

}  // namespace matchlock::ev
