// SPDX-License-Identifier: Apache-2.0
#include "ports/sandbox_ports.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "common/log.h"
#include "guestproto/exec.h"
#include "sys/socket_util.h"

namespace matchlock::ports {
namespace {

constexpr size_t kReadChunk = 64 * 1024;

bool isWildcard(const std::string& ip) {
  return ip == "0.0.0.0" || ip == "::";
}

bool sameListener(const Binding& a, const Binding& b) {
  return a.address == b.address && a.host_port == b.host_port && a.host_port != 0;
}

nlohmann::json failure(const std::string& message) {
  return nlohmann::json{{"ok", false}, {"error", message}};
}

}  // namespace

nlohmann::json toJson(const std::vector<Binding>& bindings) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& b : bindings) {
    out.push_back(
        {{"address", b.address}, {"host_port", b.host_port}, {"guest_port", b.guest_port}});
  }
  return out;
}

Result<std::vector<Binding>> bindingsFromJson(const nlohmann::json& j) {
  if (!j.is_array()) {
    return makeError(Errc::InvalidSpec, "ports: expected an array");
  }
  std::vector<Binding> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const auto& e = j[i];
    auto port = [&](const char* key, bool zero_ok) -> Result<uint16_t> {
      auto it = e.find(key);
      if (it == e.end() || !it->is_number_integer() || it->get<int64_t>() < (zero_ok ? 0 : 1) ||
          it->get<int64_t>() > 65535) {
        return makeError(Errc::InvalidSpec, fmt::format("ports[{}].{}: expected a port {}-65535", i,
                                                        key, zero_ok ? 0 : 1));
      }
      return static_cast<uint16_t>(it->get<int64_t>());
    };
    if (!e.is_object()) {
      return makeError(Errc::InvalidSpec, fmt::format("ports[{}]: expected an object", i));
    }
    Binding b;
    b.address = e.value("address", b.address);
    ML_ASSIGN_OR_RETURN(b.host_port, port("host_port", true));
    ML_ASSIGN_OR_RETURN(b.guest_port, port("guest_port", false));
    out.push_back(std::move(b));
  }
  return out;
}

struct SandboxPorts::Listener {
  Fd fd;
  ev::Watch watch;
  Binding binding;
};

struct SandboxPorts::Conn {
  Fd tcp;
  ev::Watch watch;
  uint16_t guest_port = 0;
  uint32_t stream = 0;  // 0: waiting for the guest to be ready
  guestproto::ExecMessageReader reader;
  std::string to_tcp;         // guest bytes not yet written to the host connection
  size_t unacked = 0;         // guest stream bytes not yet granted back
  bool tcp_eof = false;       // the host side sent its EOF
  bool guest_done = false;    // the guest side ended (Exit, Close or Reset)
  bool guest_closed = false;  // the guest sent Close (and we answered it)
  bool guest_exited = false;  // the guest sent Exit: its Close follows
  bool dropping = false;
};

Result<std::unique_ptr<SandboxPorts>> SandboxPorts::create(ev::Loop& loop, std::string sandbox,
                                                           const std::vector<Binding>& initial,
                                                           Channel channel) {
  std::unique_ptr<SandboxPorts> p(new SandboxPorts(loop, std::move(sandbox), std::move(channel)));
  ML_RETURN_IF_ERROR(p->set(initial));
  return p;
}

SandboxPorts::SandboxPorts(ev::Loop& loop, std::string sandbox, Channel channel)
    : loop_(loop), sandbox_(std::move(sandbox)), channel_(std::move(channel)) {}

SandboxPorts::~SandboxPorts() {
  for (auto& c : conns_) {
    c->watch.reset();
  }
  for (auto& l : listeners_) {
    l->watch.reset();
  }
}

Result<std::unique_ptr<SandboxPorts::Listener>> SandboxPorts::listen(const Binding& b) {
  auto addr = sys::SockAddr::parse(b.address == "localhost" ? "127.0.0.1" : b.address);
  if (!addr) {
    return makeError(Errc::InvalidSpec,
                     fmt::format("sandbox {}: port {}: '{}' is not an IP address", sandbox_,
                                 b.host_port, b.address));
  }
  addr->setPort(b.host_port);
  auto fd = sys::listenTcp(*addr, 128, isWildcard(addr->ip()));
  if (!fd) {
    std::string why = fd.error().sysErrno() == EADDRINUSE ? "the port is already in use on the host"
                                                          : fd.error().toString();
    return makeError(Errc::Conflict,
                     fmt::format("sandbox {}: cannot publish {}:{} (guest port {}): {}", sandbox_,
                                 addr->ip(), b.host_port, b.guest_port, why));
  }
  auto l = std::make_unique<Listener>();
  l->fd = std::move(*fd);
  l->binding = b;
  l->binding.address = addr->ip();
  if (auto local = sys::localAddress(l->fd.get()); local) {
    l->binding.host_port = local->port();
  }
  Listener* raw = l.get();
  ML_ASSIGN_OR_RETURN(
      l->watch, loop_.watch(l->fd.get(), ev::kRead, [this, raw](uint32_t) { onAccept(*raw); }));
  return l;
}

Status SandboxPorts::set(const std::vector<Binding>& wanted) {
  for (size_t i = 0; i < wanted.size(); ++i) {
    for (size_t k = 0; k < i; ++k) {
      if (sameListener(wanted[i], wanted[k])) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("sandbox {}: {}:{} is published twice", sandbox_,
                                     wanted[i].address, wanted[i].host_port));
      }
    }
  }
  // New listeners first, all or nothing: on any failure the ones just bound close again and
  // the running forwards are untouched.
  std::list<std::unique_ptr<Listener>> added;
  std::vector<std::pair<Listener*, uint16_t>> retargeted;
  std::vector<Listener*> kept;
  for (const Binding& b : wanted) {
    auto it = std::ranges::find_if(listeners_, [&](const auto& l) {
      return sameListener(l->binding, b) ||
             (b.address == "localhost" && l->binding.address == "127.0.0.1" &&
              l->binding.host_port == b.host_port && b.host_port != 0);
    });
    if (it != listeners_.end()) {
      kept.push_back(it->get());
      retargeted.emplace_back(it->get(), b.guest_port);
      continue;
    }
    ML_ASSIGN_OR_RETURN(auto l, listen(b));
    added.push_back(std::move(l));
  }
  for (auto [l, port] : retargeted) {
    l->binding.guest_port = port;
  }
  std::erase_if(listeners_,
                [&](const auto& l) { return std::ranges::find(kept, l.get()) == kept.end(); });
  for (auto& l : added) {
    ML_LOG(ports, info, "sandbox {}: forwarding {}:{} -> guest port {}", sandbox_,
           l->binding.address, l->binding.host_port, l->binding.guest_port);
    listeners_.push_back(std::move(l));
  }
  return ok();
}

std::vector<Binding> SandboxPorts::bindings() const {
  std::vector<Binding> out;
  for (const auto& l : listeners_) {
    out.push_back(l->binding);
  }
  return out;
}

void SandboxPorts::onAccept(Listener& l) {
  for (int i = 0; i < 16; ++i) {
    auto fd = sys::acceptNonBlocking(l.fd.get());
    if (!fd || !*fd) {
      return;
    }
    auto c = std::make_unique<Conn>();
    c->tcp = std::move(*fd);
    c->guest_port = l.binding.guest_port;
    Conn* conn = c.get();
    auto w = loop_.watch(conn->tcp.get(), 0, [this, conn](uint32_t) { pump(*conn); });
    if (!w) {
      continue;  // closed by c going out of scope
    }
    c->watch = std::move(*w);
    conns_.push_back(std::move(c));
    if (ready_) {
      startStream(*conn);
    }
  }
}

void SandboxPorts::ready() {
  ready_ = true;
  for (auto& c : conns_) {
    if (c->stream == 0 && !c->dropping) {
      startStream(*c);
    }
  }
}

void SandboxPorts::startStream(Conn& c) {
  auto stream = channel_.open();
  if (!stream) {
    ML_LOG(ports, warn, "sandbox {}: forward to guest port {}: {}", sandbox_, c.guest_port,
           stream.error().message());
    drop(&c);
    return;
  }
  c.stream = *stream;
  std::string request = nlohmann::json({{"op", "forward"}, {"port", c.guest_port}}).dump();
  channel_.send(c.stream, guestproto::encodeExecMessage(guestproto::ExecKind::Start, request));
  pump(c);
}

bool SandboxPorts::owns(uint32_t stream) const {
  return draining_.contains(stream) ||
         std::ranges::any_of(conns_, [stream](const auto& c) { return c->stream == stream; });
}

SandboxPorts::Conn* SandboxPorts::connOf(uint32_t stream) {
  for (auto& c : conns_) {
    if (c->stream == stream) {
      return c.get();
    }
  }
  return nullptr;
}

void SandboxPorts::onData(uint32_t stream, std::string_view data) {
  Conn* c = connOf(stream);
  if (c == nullptr) {
    return;
  }
  c->unacked += data.size();
  if (Status st = c->reader.feed(data); !st) {
    ML_LOG(ports, warn, "sandbox {}: forward to guest port {}: {}", sandbox_, c->guest_port,
           st.error().message());
    drop(c);
    return;
  }
  while (auto m = c->reader.next()) {
    switch (m->kind) {
      case guestproto::ExecKind::Stdout:
        c->to_tcp += m->payload;
        break;
      case guestproto::ExecKind::Stderr:
        // The guest could not connect (nothing listens there): the service says why.
        ML_LOG(ports, info, "sandbox {}: forward to guest port {}: {}", sandbox_, c->guest_port,
               m->payload);
        break;
      case guestproto::ExecKind::Exit:
        c->guest_done = true;
        c->guest_exited = true;
        break;
      default:
        break;
    }
  }
  pump(*c);
}

void SandboxPorts::onClose(uint32_t stream) {
  if (draining_.erase(stream) > 0) {
    channel_.close_write(stream);
    channel_.flush();
    return;
  }
  if (Conn* c = connOf(stream)) {
    channel_.close_write(stream);
    c->guest_done = true;
    c->guest_closed = true;
    pump(*c);
  }
}

void SandboxPorts::onReset(uint32_t stream, std::string_view message) {
  if (draining_.erase(stream) > 0) {
    return;
  }
  if (Conn* c = connOf(stream)) {
    ML_LOG(ports, info, "sandbox {}: forward to guest port {} reset: {}", sandbox_, c->guest_port,
           message);
    c->stream = 0;  // ended: nothing more may be sent on it
    drop(c);
  }
}

void SandboxPorts::onDrained() {
  for (auto& c : conns_) {
    // Only re-armed here: pump() itself flushes the channel, and a pump from inside a flush
    // would recurse for as long as the host side has data.
    if (c->stream != 0 && !c->tcp_eof && !c->dropping && channel_.pending(c->stream) < kHighWater) {
      (void)c->watch.setEvents(ev::kRead | (c->to_tcp.empty() ? 0 : ev::kWrite));
    }
  }
}

void SandboxPorts::grant(Conn& c) {
  // Credit goes back only while the host side keeps up: a host reader that stops pushes back
  // into the guest's socket.
  if (c.stream != 0 && c.unacked > 0 && c.to_tcp.size() < kHighWater) {
    channel_.consumed(c.stream, c.unacked);
    c.unacked = 0;
  }
}

void SandboxPorts::pump(Conn& c) {
  if (c.dropping || c.stream == 0) {
    return;
  }
  bool sent = false;
  // Host -> guest.
  char buf[kReadChunk];
  while (!c.tcp_eof && channel_.pending(c.stream) < kHighWater) {
    ssize_t n = ::read(c.tcp.get(), buf, sizeof(buf));
    if (n > 0) {
      channel_.send(c.stream,
                    guestproto::encodeExecMessage(guestproto::ExecKind::Stdin,
                                                  std::string_view(buf, static_cast<size_t>(n))));
      sent = true;
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && errno == EAGAIN) {
      break;
    }
    c.tcp_eof = true;  // EOF, or a reset: either way nothing more comes from the host side
    channel_.send(c.stream, guestproto::encodeExecMessage(guestproto::ExecKind::StdinEof, ""));
    sent = true;
  }
  // Guest -> host.
  if (!sendSome(c.tcp.get(), c.to_tcp)) {
    drop(&c);  // the host side is gone
    return;
  }
  size_t before = c.unacked;
  grant(c);
  if (sent || before != c.unacked) {
    channel_.flush();
  }
  if (c.guest_done && c.to_tcp.empty()) {
    drop(&c);
    return;
  }
  uint32_t want = 0;
  if (!c.tcp_eof && channel_.pending(c.stream) < kHighWater) {
    want |= ev::kRead;
  }
  if (!c.to_tcp.empty()) {
    want |= ev::kWrite;
  }
  (void)c.watch.setEvents(want);
}

void SandboxPorts::drop(Conn* c) {
  if (c->dropping) {
    return;
  }
  c->dropping = true;
  c->watch.reset();
  if (c->stream != 0 && !c->guest_closed) {
    if (c->guest_exited) {
      draining_.insert(c->stream);  // its Close is on the way: answered then, not reset
    } else {
      channel_.reset(c->stream, "host connection closed");
      channel_.flush();
    }
  }
  ::shutdown(c->tcp.get(), SHUT_RDWR);
  loop_.post([this, c, alive = std::weak_ptr<int>(alive_)] {
    if (alive.expired()) {
      return;  // the component is gone, and the connection with it
    }
    conns_.remove_if([c](const std::unique_ptr<Conn>& p) { return p.get() == c; });
  });
}

std::optional<nlohmann::json> SandboxPorts::handleControl(const nlohmann::json& request) {
  if (request.value("op", "") != "ports") {
    return std::nullopt;
  }
  const std::string action = request.value("action", "list");
  if (action == "set") {
    auto wanted = bindingsFromJson(request.value("ports", nlohmann::json()));
    if (!wanted) {
      return failure(wanted.error().message());
    }
    if (Status st = set(*wanted); !st) {
      return failure(st.error().message());
    }
  } else if (action != "list") {
    return failure(fmt::format("ports: unknown action '{}'", action));
  }
  return nlohmann::json{{"ok", true}, {"ports", toJson(bindings())}};
}

}  // namespace matchlock::ports
