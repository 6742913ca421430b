// SPDX-License-Identifier: Apache-2.0
#include "ev/loop.h"

#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <array>
#include <cerrno>

namespace matchlock::ev {

Watch& Watch::operator=(Watch&& other) noexcept {
  if (this != &other) {
    reset();
    loop_ = other.loop_;
    fd_ = other.fd_;
    id_ = other.id_;
    events_ = other.events_;
    other.loop_ = nullptr;
    other.fd_ = -1;
    other.id_ = 0;
    other.events_ = 0;
  }
  return *this;
}

Status Watch::setEvents(uint32_t events) {
  if (loop_ == nullptr) {
    return makeError(Errc::Internal, "setEvents on an empty watch");
  }
  if (events == events_) {
    return ok();
  }
  return loop_->modify(*this, events);
}

void Watch::reset() {
  if (loop_ != nullptr) {
    loop_->unregister(*this);
    loop_ = nullptr;
    fd_ = -1;
    id_ = 0;
    events_ = 0;
  }
}

Status Timer::arm(std::chrono::milliseconds delay, std::chrono::milliseconds interval) {
  itimerspec spec{};
  // A zero it_value would disarm: round up to 1 ns.
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(delay).count();
  if (ns <= 0) {
    ns = 1;
  }
  spec.it_value.tv_sec = static_cast<time_t>(ns / 1000000000);
  spec.it_value.tv_nsec = static_cast<long>(ns % 1000000000);  // NOLINT(google-runtime-int)
  auto ins = std::chrono::duration_cast<std::chrono::nanoseconds>(interval).count();
  spec.it_interval.tv_sec = static_cast<time_t>(ins / 1000000000);
  spec.it_interval.tv_nsec = static_cast<long>(ins % 1000000000);  // NOLINT(google-runtime-int)
  if (::timerfd_settime(fd_.get(), 0, &spec, nullptr) != 0) {
    return makeError(Errc::System, "timerfd_settime", errno);
  }
  return ok();
}

Status Timer::disarm() {
  itimerspec spec{};
  if (::timerfd_settime(fd_.get(), 0, &spec, nullptr) != 0) {
    return makeError(Errc::System, "timerfd_settime", errno);
  }
  return ok();
}

Result<std::unique_ptr<Loop>> Loop::create() {
  Fd ep(::epoll_create1(EPOLL_CLOEXEC));
  if (!ep) {
    return makeError(Errc::System, "epoll_create1", errno);
  }
  Fd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) {
    return makeError(Errc::System, "eventfd", errno);
  }
  std::unique_ptr<Loop> loop(new Loop(std::move(ep), std::move(wake)));
  int wake_fd = loop->wake_.get();
  Loop* raw = loop.get();
  ML_ASSIGN_OR_RETURN(loop->wake_watch_, loop->watch(wake_fd, kRead, [raw, wake_fd](uint32_t) {
    uint64_t value = 0;
    if (::read(wake_fd, &value, sizeof(value)) < 0) {
      // EAGAIN: another wake-up already drained the counter.
    }
    raw->drainPosted();
  }));
  return loop;
}

Loop::Loop(Fd epoll, Fd wake) : epoll_(std::move(epoll)), wake_(std::move(wake)) {}

Loop::~Loop() {
  wake_watch_.reset();
}

Result<Watch> Loop::watch(int fd, uint32_t events, FdCallback callback) {
  uint64_t id = next_id_++;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    return makeError(Errc::System, "epoll_ctl ADD", errno);
  }
  entries_[id] = std::make_shared<Entry>(Entry{fd, std::move(callback)});
  Watch w;
  w.loop_ = this;
  w.fd_ = fd;
  w.id_ = id;
  w.events_ = events;
  return w;
}

Result<Timer> Loop::timer(std::function<void()> callback) {
  Timer t;
  t.fd_.reset(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!t.fd_) {
    return makeError(Errc::System, "timerfd_create", errno);
  }
  int fd = t.fd_.get();
  ML_ASSIGN_OR_RETURN(t.watch_, watch(fd, kRead, [fd, cb = std::move(callback)](uint32_t) {
                        uint64_t expirations = 0;
                        if (::read(fd, &expirations, sizeof(expirations)) == sizeof(expirations)) {
                          cb();
                        }
                      }));
  return t;
}

void Loop::post(std::function<void()> fn) {
  {
    std::lock_guard lock(posted_mutex_);
    posted_.push_back(std::move(fn));
  }
  uint64_t one = 1;
  if (::write(wake_.get(), &one, sizeof(one)) < 0) {
    // EAGAIN only when the counter is saturated, which still wakes the loop.
  }
}

void Loop::drainPosted() {
  std::vector<std::function<void()>> batch;
  {
    std::lock_guard lock(posted_mutex_);
    batch.swap(posted_);
  }
  for (auto& fn : batch) {
    fn();
  }
}

void Loop::stop() {
  {
    std::lock_guard lock(stop_mutex_);
    stop_ = true;
  }
  uint64_t one = 1;
  if (::write(wake_.get(), &one, sizeof(one)) < 0) {
    // EAGAIN only when the counter is saturated, which still wakes the loop.
  }
}

Status Loop::run() {
  for (;;) {
    {
      std::lock_guard lock(stop_mutex_);
      if (stop_) {
        stop_ = false;
        return ok();
      }
    }
    ML_RETURN_IF_ERROR(runOnce(-1));
  }
}

Status Loop::runOnce(int timeout_ms) {
  std::array<epoll_event, 64> events{};
  int n = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeout_ms);
  if (n < 0) {
    if (errno == EINTR) {
      return ok();
    }
    return makeError(Errc::System, "epoll_wait", errno);
  }
  for (int i = 0; i < n; ++i) {
    // epoll_event is packed on x86-64: copy the fields instead of binding references to them.
    const uint64_t id = events[static_cast<size_t>(i)].data.u64;
    const uint32_t ready = events[static_cast<size_t>(i)].events;
    // Look the id up for every event: a callback earlier in this batch may have removed (and the
    // owner closed, and the kernel reused) the fd. Ids are never reused, so stale events are
    // dropped here instead of reaching the wrong owner.
    auto it = entries_.find(id);
    if (it == entries_.end()) {
      continue;
    }
    // Keep the entry alive while its callback runs: the callback may reset its own Watch.
    std::shared_ptr<Entry> entry = it->second;
    entry->callback(ready);
  }
  return ok();
}

void Loop::unregister(Watch& w) {
  (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, w.fd_, nullptr);
  entries_.erase(w.id_);
}

Status Loop::modify(Watch& w, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = w.id_;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, w.fd_, &ev) != 0) {
    return makeError(Errc::System, "epoll_ctl MOD", errno);
  }
  w.events_ = events;
  return ok();
}

}  // namespace matchlock::ev
