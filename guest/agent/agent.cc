// SPDX-License-Identifier: Apache-2.0
#include "guest/agent/agent.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>

#include <nlohmann/json.hpp>

#include "guest/agent/log.h"

namespace matchlock::guest {
namespace {

constexpr size_t kReadChunk = 64 * 1024;
constexpr std::chrono::milliseconds kReconnectPoll{50};

}  // namespace

Result<std::unique_ptr<Agent>> Agent::create(ev::Loop& loop, Fd channel, Options options) {
  int flags = ::fcntl(channel.get(), F_GETFL);
  if (flags < 0 || ::fcntl(channel.get(), F_SETFL, flags | O_NONBLOCK) < 0) {
    return makeError(Errc::System, "fcntl O_NONBLOCK on the channel", errno);
  }
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);
  if (::sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) {
    return makeError(Errc::System, "sigprocmask", errno);
  }
  Fd sfd(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sfd) {
    return makeError(Errc::System, "signalfd", errno);
  }
  std::unique_ptr<Agent> agent(new Agent(loop, std::move(channel), std::move(sfd), options));
  ML_RETURN_IF_ERROR(agent->init());
  return agent;
}

Agent::Agent(ev::Loop& loop, Fd channel, Fd sigchld, Options options)
    : loop_(loop), channel_(std::move(channel)), sigchld_(std::move(sigchld)), options_(options) {}

Agent::~Agent() {
  channel_watch_.reset();
  sigchld_watch_.reset();
  sessions_.clear();
  orphaned_.clear();
}

Status Agent::init() {
  ML_ASSIGN_OR_RETURN(sigchld_watch_,
                      loop_.watch(sigchld_.get(), ev::kRead, [this](uint32_t) { reap(); }));
  ML_ASSIGN_OR_RETURN(channel_watch_, loop_.watch(channel_.get(), ev::kRead,
                                                  [this](uint32_t ev) { onReadable(ev); }));
  ML_ASSIGN_OR_RETURN(reconnect_timer_, loop_.timer([this] {
    (void)channel_watch_.setEvents(ev::kRead | (out_.empty() ? 0 : ev::kWrite));
  }));
  newMux();
  return ok();
}

void Agent::newMux() {
  guestproto::Mux::Callbacks cb;
  cb.on_ready = [this] {
    logLine("host connected ({})", mux_->peerAgent());
    std::string vfs_error = startVfs();
    // Readiness: one guest-opened stream on port 5002 with a status object.
    auto id = mux_->open(guestproto::kPortReady);
    if (id) {
      nlohmann::json status = {{"ok", vfs_error.empty()}, {"version", options_.version}};
      if (!vfs_error.empty()) {
        status["error"] = vfs_error;
      }
      (void)mux_->send(*id, status.dump());
      (void)mux_->closeWrite(*id);
    }
  };
  cb.on_open = [this](uint32_t stream, uint32_t port) {
    if (port == guestproto::kPortExec) {
      sessions_[stream] = std::make_unique<ExecSession>(
          loop_, *mux_, stream, [this] { scheduleFlush(); }, options_.cgroup_procs,
          &options_.base_env, false, options_.isolation);
    } else if (port == guestproto::kPortService) {
      sessions_[stream] = std::make_unique<ExecSession>(
          loop_, *mux_, stream, [this] { scheduleFlush(); }, options_.cgroup_procs, nullptr, true);
    } else if (port == guestproto::kPortReady) {
      control_[stream] = "";
    } else {
      mux_->reset(stream, 3, fmt::format("no service on port {}", port));
    }
  };
  cb.on_data = [this](uint32_t stream, std::string_view data) {
    if (VfsRelay* relay = relayFor(stream)) {
      relay->onData(data);
      return;
    }
    if (auto it = sessions_.find(stream); it != sessions_.end()) {
      it->second->onData(data);
    } else if (control_.contains(stream)) {
      mux_->consumed(stream, data.size());
      onControl(stream, data);
    }
  };
  cb.on_close = [this](uint32_t stream) {
    if (VfsRelay* relay = relayFor(stream)) {
      relay->detach();
      return;
    }
    if (auto it = sessions_.find(stream); it != sessions_.end()) {
      it->second->onRemoteClose();
    } else if (auto c = control_.find(stream); c != control_.end()) {
      (void)mux_->closeWrite(stream);
      control_.erase(c);
    }
  };
  cb.on_reset = [this](uint32_t stream, uint32_t, std::string_view message) {
    if (VfsRelay* relay = relayFor(stream)) {
      logLine("vfs {}: the host reset the stream: {}", relay->spec().target, message);
      relay->detach();
      return;
    }
    if (auto it = sessions_.find(stream); it != sessions_.end()) {
      it->second->onReset();
    }
    control_.erase(stream);
  };
  guestproto::Mux::Options opts;
  opts.agent = "matchlock-guest " + options_.version;
  mux_ = std::make_unique<guestproto::Mux>(guestproto::Mux::Role::Guest, std::move(cb), opts);
  // The guest speaks second: its Hello answers the host's. A virtio-serial port does not tell the
  // guest when a host connects, and a Hello written before that would be lost or stale.
  mux_started_ = false;
}

std::string Agent::startVfs() {
  std::string error;
  if (!vfs_mounted_ && !options_.vfs.empty() && !options_.vfs.front().virtiofs.empty()) {
    // virtio-fs: the kernel speaks to the host's device itself; nothing to relay.
    vfs_mounted_ = true;
    if (Status st = mountVirtioFs(options_.vfs); !st) {
      error = st.error().toString();
      logLine("vfs: {}", error);
    }
    return error;
  }
  if (!vfs_mounted_) {
    vfs_mounted_ = true;
    for (const VfsRelay::Spec& spec : options_.vfs) {
      auto relay = VfsRelay::mount(loop_, spec);
      if (!relay) {
        error = fmt::format("mount {}: {}", spec.target, relay.error().toString());
        logLine("vfs: {}", error);
        break;
      }
      relays_.push_back(std::move(*relay));
    }
  }
  for (auto& relay : relays_) {
    if (relay->stream() != 0) {
      continue;  // attached to an earlier connection, and aborted with it
    }
    auto id = mux_->open(guestproto::kPortVfs);
    Status st = id ? relay->attach(*mux_, *id, [this] { scheduleFlush(); })
                   : Status(makeError(std::move(id).error()));
    if (!st && error.empty()) {
      error = fmt::format("mount {}: {}", relay->spec().target, st.error().toString());
    }
  }
  return error;
}

VfsRelay* Agent::relayFor(uint32_t stream) {
  for (auto& relay : relays_) {
    if (relay->attached() && relay->stream() == stream) {
      return relay.get();
    }
  }
  return nullptr;
}

void Agent::onControl(uint32_t stream, std::string_view data) {
  std::string& buf = control_[stream];
  buf.append(data);
  if (buf.find("\"clock\"") != std::string::npos) {
    // The host's wall clock once the channel is up: the boot parameter carried whole seconds
    // and went stale while the guest booted; host and guest file times must agree.
    auto j = nlohmann::json::parse(buf, nullptr, false);
    if (j.is_object() && j.value("op", "") == "clock") {
      int64_t ns = j.value("unix_ns", int64_t{0});
      timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
      if (ns > 0 && ::clock_settime(CLOCK_REALTIME, &ts) != 0) {
        logLine("clock: {}", std::strerror(errno));
      }
      buf.clear();
    }
    return;
  }
  if (buf.find("\"shutdown\"") != std::string::npos) {
    logLine("shutdown requested by the host");
    shutdown_ = true;
    for (auto& [id, session] : sessions_) {
      session->onReset();
    }
    (void)mux_->closeWrite(stream);
    flush();
    loop_.stop();
  }
}

void Agent::onReadable(uint32_t events) {
  if ((events & ev::kWrite) != 0) {
    flush();
  }
  if ((events & (ev::kRead | ev::kError)) == 0) {
    return;
  }
  char buf[kReadChunk];
  for (int rounds = 0; rounds < 16; ++rounds) {
    ssize_t n = ::read(channel_.get(), buf, sizeof(buf));
    if (n > 0) {
      if (!mux_started_) {
        mux_->start();
        mux_started_ = true;
      }
      if (Status st = mux_->receive(std::string_view(buf, static_cast<size_t>(n))); !st) {
        logLine("{}", st.error().message());
        out_ += mux_->takeOutput();  // the GoAway explaining why
        flush();
        onDisconnected();
        return;
      }
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && errno == EAGAIN) {
      break;
    }
    onDisconnected();
    return;
  }
  sweep();
  flush();
}

void Agent::onDisconnected() {
  // Every process of the lost connection is cancelled: nobody can read its output any more.
  // Sessions still running move aside (keyed by pid) until reaped: they no longer touch the mux.
  for (auto& [stream, session] : sessions_) {
    session->onReset();
    if (!session->done() && session->pid() > 0) {
      orphaned_[session->pid()] = std::move(session);
    }
  }
  sessions_.clear();
  sweep();
  control_.clear();
  for (auto& relay : relays_) {
    relay->detach();  // its FUSE connection was bound to the lost host session
  }
  out_.clear();
  if (!options_.reconnectable) {
    logLine("channel closed");
    loop_.stop();
    return;
  }
  newMux();
  // A virtio-serial port without a host reports HUP continuously: poll instead of spinning.
  (void)channel_watch_.setEvents(0);
  (void)reconnect_timer_.arm(kReconnectPoll);
}

void Agent::flush() {
  if (mux_) {
    for (auto& [stream, session] : sessions_) {
      session->resume();
    }
    for (auto& relay : relays_) {
      relay->resume();
    }
    out_ += mux_->takeOutput();
  }
  while (!out_.empty()) {
    ssize_t n = ::write(channel_.get(), out_.data(), out_.size());
    if (n > 0) {
      out_.erase(0, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    break;  // EAGAIN (or an error the next read reports)
  }
  (void)channel_watch_.setEvents(ev::kRead | (out_.empty() ? 0 : ev::kWrite));
}

void Agent::reap() {
  signalfd_siginfo info{};
  while (::read(sigchld_.get(), &info, sizeof(info)) == static_cast<ssize_t>(sizeof(info))) {
  }
  // As PID 1 this also collects orphans re-parented to init.
  for (;;) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) {
      break;
    }
    for (auto& [stream, session] : sessions_) {
      if (session->pid() == pid) {
        session->onExit(status);
      }
    }
    if (auto it = orphaned_.find(pid); it != orphaned_.end()) {
      it->second->onExit(status);
    }
  }
  sweep();
  flush();
}

void Agent::scheduleFlush() {
  if (flush_scheduled_) {
    return;
  }
  flush_scheduled_ = true;
  loop_.post([this] {
    flush_scheduled_ = false;
    sweep();
    flush();
  });
}

void Agent::sweep() {
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    it = it->second->done() ? sessions_.erase(it) : std::next(it);
  }
  for (auto it = orphaned_.begin(); it != orphaned_.end();) {
    it = it->second->done() ? orphaned_.erase(it) : std::next(it);
  }
}

}  // namespace matchlock::guest
