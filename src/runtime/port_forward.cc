// SPDX-License-Identifier: Apache-2.0
#include "runtime/port_forward.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "runtime/exec_channel.h"
#include "sys/socket_util.h"

namespace matchlock::runtime {
namespace {

/// Bytes buffered in either direction beyond this stop reading the other side.
constexpr size_t kHighWater = 1024 * 1024;

bool isWildcard(const std::string& ip) {
  return ip == "0.0.0.0" || ip == "::";
}

}  // namespace

struct PortForwarder::Listener {
  Fd fd;
  ev::Watch watch;
  ForwardBinding binding;
};

struct PortForwarder::Conn {
  Fd tcp;
  ev::Watch watch;
  std::unique_ptr<ExecChannel> channel;
  std::string to_tcp;       // guest bytes not yet written to the host connection
  bool tcp_eof = false;     // the host side sent its EOF
  bool guest_done = false;  // the guest side ended
  bool dropping = false;
  uint16_t remote_port = 0;
};

Result<std::unique_ptr<PortForwarder>> PortForwarder::start(
    ev::Loop& loop, std::string control_socket, const std::vector<ForwardBinding>& bindings) {
  std::unique_ptr<PortForwarder> pf(new PortForwarder(loop, std::move(control_socket)));
  for (const ForwardBinding& b : bindings) {
    auto addr = sys::SockAddr::parse(b.address);
    if (!addr) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("port forward: '{}' is not an IP address", b.address));
    }
    addr->setPort(b.local_port);
    auto fd = sys::listenTcp(*addr, 128, isWildcard(addr->ip()));
    if (!fd) {
      return makeError(Errc::Conflict,
                       fmt::format("port forward {}:{} -> guest port {}: {}", b.address,
                                   b.local_port, b.remote_port, fd.error().toString()));
    }
    auto local = sys::localAddress(fd->get());
    auto l = std::make_unique<Listener>();
    l->fd = std::move(*fd);
    l->binding = b;
    l->binding.address = addr->ip();
    l->binding.local_port = local ? local->port() : b.local_port;
    Listener* raw = l.get();
    PortForwarder* self = pf.get();
    ML_ASSIGN_OR_RETURN(l->watch, loop.watch(l->fd.get(), ev::kRead,
                                             [self, raw](uint32_t) { self->onAccept(*raw); }));
    pf->bound_.push_back(l->binding);
    pf->listeners_.push_back(std::move(l));
  }
  return pf;
}

PortForwarder::PortForwarder(ev::Loop& loop, std::string control_socket)
    : loop_(loop), control_(std::move(control_socket)) {}

PortForwarder::~PortForwarder() {
  for (auto& c : conns_) {
    c->watch.reset();
    if (c->channel) {
      c->channel->close();
    }
  }
  for (auto& l : listeners_) {
    l->watch.reset();
  }
}

void PortForwarder::onAccept(Listener& l) {
  for (int i = 0; i < 16; ++i) {
    auto fd = sys::acceptNonBlocking(l.fd.get());
    if (!fd || !*fd) {
      return;
    }
    auto c = std::make_unique<Conn>();
    c->tcp = std::move(*fd);
    c->remote_port = l.binding.remote_port;
    Conn* conn = c.get();
    ExecChannel::Callbacks cb;
    cb.on_output = [this, conn](guestproto::ExecKind kind, std::string_view data) {
      if (kind == guestproto::ExecKind::Stderr) {
        ML_LOG(runtime, info, "port forward to guest port {}: {}", conn->remote_port, data);
        return;
      }
      conn->to_tcp.append(data);
      pump(*conn);
    };
    cb.on_exit = [this, conn](const guestproto::ExecExit&) {
      conn->guest_done = true;
      pump(*conn);
    };
    cb.on_error = [this, conn](const Error& e) {
      ML_LOG(runtime, info, "port forward to guest port {}: {}", conn->remote_port, e.message());
      drop(conn);
    };
    cb.on_drained = [this, conn] { pump(*conn); };
    std::string request =
        nlohmann::json({{"op", "forward"}, {"port", l.binding.remote_port}}).dump();
    auto ch = ExecChannel::open(loop_, control_, "service", request, std::move(cb));
    if (!ch) {
      ML_LOG(runtime, warn, "port forward: {}", ch.error().message());
      continue;  // the connection is closed by c going out of scope
    }
    c->channel = std::move(*ch);
    auto w = loop_.watch(c->tcp.get(), ev::kRead, [this, conn](uint32_t) { pump(*conn); });
    if (!w) {
      continue;
    }
    c->watch = std::move(*w);
    conns_.push_back(std::move(c));
  }
}

void PortForwarder::pump(Conn& c) {
  if (c.dropping) {
    return;
  }
  // Host -> guest.
  char buf[64 * 1024];
  while (!c.tcp_eof && c.channel && c.channel->pendingInput() < kHighWater) {
    ssize_t n = ::read(c.tcp.get(), buf, sizeof(buf));
    if (n > 0) {
      c.channel->sendStdin(std::string_view(buf, static_cast<size_t>(n)));
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && errno == EAGAIN) {
      break;
    }
    c.tcp_eof = true;  // EOF, or a reset: either way nothing more comes from the host side
    c.channel->stdinEof();
  }
  // Guest -> host.
  if (!sendSome(c.tcp.get(), c.to_tcp)) {
    drop(&c);  // the host side is gone
    return;
  }
  if (c.channel) {
    c.channel->pauseOutput(c.to_tcp.size() > kHighWater);
  }
  if (c.guest_done && c.to_tcp.empty()) {
    drop(&c);
    return;
  }
  uint32_t want = 0;
  if (!c.tcp_eof && c.channel && c.channel->pendingInput() < kHighWater) {
    want |= ev::kRead;
  }
  if (!c.to_tcp.empty()) {
    want |= ev::kWrite;
  }
  (void)c.watch.setEvents(want);
}

void PortForwarder::drop(Conn* c) {
  if (c->dropping) {
    return;
  }
  c->dropping = true;
  c->watch.reset();
  if (c->channel) {
    c->channel->close();
  }
  ::shutdown(c->tcp.get(), SHUT_RDWR);
  loop_.post([this, c, alive = std::weak_ptr<int>(alive_)] {
    if (alive.expired()) {
      return;  // the forwarder is gone, and the connection with it
    }
    conns_.remove_if([c](const std::unique_ptr<Conn>& p) { return p.get() == c; });
  });
}

}  // namespace matchlock::runtime
