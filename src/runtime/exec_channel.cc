// SPDX-License-Identifier: Apache-2.0
#include "runtime/exec_channel.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <optional>

#include <nlohmann/json.hpp>

#include "runtime/exec_client.h"

namespace matchlock::runtime {
namespace {

using guestproto::ExecKind;

/// Stdin is sent in messages of at most this size (the protocol allows 1 MiB).
constexpr size_t kStdinChunk = 256 * 1024;

}  // namespace

Result<std::unique_ptr<ExecChannel>> ExecChannel::open(ev::Loop& loop,
                                                       const std::string& control_socket,
                                                       std::string_view op, std::string_view start,
                                                       Callbacks callbacks) {
  ML_ASSIGN_OR_RETURN(Fd fd, connectControl(control_socket, 2000));
  int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) < 0) {
    return makeError(Errc::System, "fcntl O_NONBLOCK", errno);
  }
  std::unique_ptr<ExecChannel> ch(new ExecChannel(loop, std::move(fd), std::move(callbacks)));
  ch->queue(nlohmann::json({{"op", std::string(op)}}).dump() + "\n" +
            guestproto::encodeExecMessage(ExecKind::Start, start));
  ExecChannel* self = ch.get();
  ML_ASSIGN_OR_RETURN(ch->watch_, loop.watch(ch->fd_.get(), ev::kRead | ev::kWrite,
                                             [self](uint32_t events) { self->onEvents(events); }));
  return ch;
}

ExecChannel::~ExecChannel() {
  watch_.reset();
}

void ExecChannel::queue(std::string bytes) {
  if (!fd_) {
    return;
  }
  out_ += bytes;
  updateInterest();
}

void ExecChannel::sendStdin(std::string_view data) {
  while (!data.empty()) {
    size_t n = std::min(data.size(), kStdinChunk);
    queue(guestproto::encodeExecMessage(ExecKind::Stdin, data.substr(0, n)));
    data.remove_prefix(n);
  }
}

void ExecChannel::stdinEof() {
  queue(guestproto::encodeExecMessage(ExecKind::StdinEof, ""));
}

void ExecChannel::resize(uint16_t rows, uint16_t cols) {
  queue(guestproto::encodeResize(rows, cols));
}

void ExecChannel::signal(uint32_t signo) {
  queue(guestproto::encodeSignal(signo));
}

void ExecChannel::close() {
  watch_.reset();
  fd_.reset();
  out_.clear();
}

void ExecChannel::pauseOutput(bool paused) {
  if (paused_ != paused) {
    paused_ = paused;
    updateInterest();
  }
}

void ExecChannel::updateInterest() {
  if (!watch_) {
    return;
  }
  uint32_t want = (paused_ ? 0 : ev::kRead) | (out_.empty() ? 0 : ev::kWrite);
  (void)watch_.setEvents(want);
}

void ExecChannel::fail(Error error) {
  close();
  if (cb_.on_error) {
    cb_.on_error(error);
  }
}

void ExecChannel::onEvents(uint32_t events) {
  if ((events & ev::kWrite) != 0) {
    flush();
  }
  if (fd_ && (events & (ev::kRead | ev::kError)) != 0) {
    onReadable();
  }
}

void ExecChannel::flush() {
  while (fd_ && !out_.empty()) {
    ssize_t n = ::send(fd_.get(), out_.data(), out_.size(), MSG_NOSIGNAL);
    if (n > 0) {
      out_.erase(0, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && errno == EAGAIN) {
      break;
    }
    fail(Error(Errc::Unavailable, "the sandbox supervisor closed the connection"));
    return;
  }
  updateInterest();
  if (fd_ && out_.empty() && cb_.on_drained) {
    cb_.on_drained();
  }
}

void ExecChannel::onReadable() {
  char buf[64 * 1024];
  for (int round = 0; round < 4 && fd_ && !paused_; ++round) {
    ssize_t n = ::read(fd_.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && errno == EAGAIN) {
      return;
    }
    if (n <= 0) {
      fail(Error(Errc::Unavailable, "the sandbox supervisor closed the connection"));
      return;
    }
    std::string_view data(buf, static_cast<size_t>(n));
    std::string rest;
    if (!have_reply_) {
      line_.append(data);
      size_t nl = line_.find('\n');
      if (nl == std::string::npos) {
        if (line_.size() > 64 * 1024) {
          fail(Error(Errc::Unavailable, "the sandbox supervisor sent no reply line"));
        }
        continue;
      }
      auto reply = nlohmann::json::parse(line_.substr(0, nl), nullptr, false);
      if (!reply.is_object() || !reply.value("ok", false)) {
        std::string why = reply.is_object() ? reply.value("error", "") : line_.substr(0, nl);
        fail(Error(Errc::Unavailable, why.empty() ? "the sandbox refused the request" : why));
        return;
      }
      have_reply_ = true;
      rest = line_.substr(nl + 1);
      line_.clear();
      data = rest;
    }
    if (Status st = reader_.feed(data); !st) {
      fail(st.error());
      return;
    }
    while (fd_) {
      auto msg = reader_.next();
      if (!msg) {
        break;
      }
      switch (msg->kind) {
        case ExecKind::Started:
          if (cb_.on_started) {
            cb_.on_started();
          }
          break;
        case ExecKind::Stdout:
        case ExecKind::Stderr:
          if (cb_.on_output) {
            cb_.on_output(msg->kind, msg->payload);
          }
          break;
        case ExecKind::Exit: {
          auto exit = guestproto::decodeExit(msg->payload);
          close();
          if (!exit) {
            if (cb_.on_error) {
              cb_.on_error(exit.error());
            }
          } else if (cb_.on_exit) {
            cb_.on_exit(*exit);
          }
          return;
        }
        default:
          break;
      }
    }
  }
}

Result<ServiceResult> callService(const std::string& control_socket, std::string_view request,
                                  int input_fd, const std::function<void(std::string_view)>& sink,
                                  std::chrono::milliseconds timeout) {
  ML_ASSIGN_OR_RETURN(auto loop, ev::Loop::create());
  ServiceResult result;
  std::optional<Error> failure;
  bool done = false;
  std::unique_ptr<ExecChannel> channel;
  ExecChannel::Callbacks cb;
  cb.on_output = [&](ExecKind kind, std::string_view data) {
    if (kind == ExecKind::Stdout) {
      sink(data);
    } else if (result.err.size() < 64 * 1024) {
      result.err.append(data);
    }
  };
  cb.on_exit = [&](const guestproto::ExecExit& exit) {
    result.exit = exit;
    done = true;
    loop->stop();
  };
  cb.on_error = [&](const Error& e) {
    failure = e;
    done = true;
    loop->stop();
  };
  // Stdin in chunks, each read once the previous one reached the supervisor.
  cb.on_drained = [&] {
    if (input_fd < 0 || !channel) {
      return;
    }
    std::string chunk(kStdinChunk, '\0');
    ssize_t n = 0;
    do {
      n = ::read(input_fd, chunk.data(), chunk.size());
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      failure = Error(Errc::System, "reading the input", errno);
      loop->stop();
      return;
    }
    if (n == 0) {
      input_fd = -1;
      channel->stdinEof();
      return;
    }
    chunk.resize(static_cast<size_t>(n));
    channel->sendStdin(chunk);
  };
  ML_ASSIGN_OR_RETURN(channel, ExecChannel::open(*loop, control_socket, "service", request, cb));
  if (input_fd < 0) {
    channel->stdinEof();
  }
  ML_ASSIGN_OR_RETURN(ev::Timer deadline, loop->timer([&] {
    failure = Error(Errc::Unavailable, "the guest did not finish in time");
    loop->stop();
  }));
  ML_RETURN_IF_ERROR(deadline.arm(timeout));
  ML_RETURN_IF_ERROR(loop->run());
  channel.reset();
  if (failure) {
    return makeError(std::move(*failure));
  }
  (void)done;
  return result;
}

}  // namespace matchlock::runtime
