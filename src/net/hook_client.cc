// SPDX-License-Identifier: Apache-2.0
#include "net/hook_client.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include <nlohmann/json.hpp>

#include "sys/socket_util.h"

namespace matchlock::net {

Result<std::unique_ptr<HookClient>> HookClient::start(ev::Loop& loop, const std::string& socket,
                                                      std::string request,
                                                      std::chrono::milliseconds timeout,
                                                      Done done) {
  ML_ASSIGN_OR_RETURN(Fd fd, sys::connectUnixNonBlocking(socket));
  request += '\n';
  std::unique_ptr<HookClient> c(new HookClient(std::move(fd), std::move(request), std::move(done)));
  HookClient* self = c.get();
  ML_ASSIGN_OR_RETURN(c->watch_, loop.watch(c->fd_.get(), ev::kRead | ev::kWrite,
                                            [self](uint32_t events) { self->onEvent(events); }));
  ML_ASSIGN_OR_RETURN(c->timer_, loop.timer([self, timeout] {
    self->finish(
        makeError(Errc::Unavailable, fmt::format("no answer within {} ms", timeout.count())));
  }));
  ML_RETURN_IF_ERROR(c->timer_.arm(timeout));
  return c;
}

void HookClient::onEvent(uint32_t events) {
  if (!out_.empty() && (events & ev::kWrite) != 0) {
    if (!sendSome(fd_.get(), out_)) {
      finish(makeError(Errc::Unavailable, "the callback socket closed before the request was sent",
                       errno));
      return;
    }
  }
  if (out_.empty() && !shut_) {
    shut_ = true;
    ::shutdown(fd_.get(), SHUT_WR);
    (void)watch_.setEvents(ev::kRead);
  }
  if ((events & (ev::kRead | ev::kError)) == 0) {
    return;
  }
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd_.get(), buf, sizeof(buf));
    if (n > 0) {
      in_.append(buf, static_cast<size_t>(n));
      if (in_.size() > kMaxAnswer) {
        finish(makeError(Errc::Protocol,
                         fmt::format("the answer is larger than {} bytes", kMaxAnswer)));
        return;
      }
      // One JSON value, then a newline: done without waiting for the peer to close. Checked
      // only when the data so far ends with a newline (pretty-printed answers have others).
      if (in_.back() == '\n' && nlohmann::json::accept(in_)) {
        in_.pop_back();
        finish(std::move(in_));
        return;
      }
      continue;
    }
    if (n == 0) {
      if (in_.empty()) {
        finish(
            makeError(Errc::Unavailable, "the callback closed the connection without answering"));
      } else {
        finish(std::move(in_));
      }
      return;
    }
    if (errno == EINTR) {
      continue;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return;
    }
    finish(makeError(Errc::Unavailable, "reading the callback's answer", errno));
    return;
  }
}

void HookClient::finish(Result<std::string> r) {
  watch_.reset();
  timer_ = ev::Timer();
  fd_.reset();
  Done done = std::move(done_);
  done_ = nullptr;
  if (done) {
    done(std::move(r));  // may destroy this client: nothing after it
  }
}

}  // namespace matchlock::net
