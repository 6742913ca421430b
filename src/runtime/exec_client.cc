// SPDX-License-Identifier: Apache-2.0
#include "runtime/exec_client.h"

#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/fd.h"

namespace matchlock::runtime {
namespace {
using guestproto::ExecKind;
}  // namespace

Result<Fd> connectControl(const std::string& path, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return makeError(Errc::InvalidSpec, fmt::format("socket path too long: {}", path));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  for (;;) {
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) {
      return makeError(Errc::System, "socket", errno);
    }
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      return fd;
    }
    int err = errno;
    if (std::chrono::steady_clock::now() >= deadline) {
      return makeError(Errc::Unavailable,
                       fmt::format("sandbox supervisor not reachable at {}", path), err);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

namespace {

/// Writes all of `data` to a blocking fd: send(MSG_NOSIGNAL) for the socket (a vanished
/// supervisor must not kill us with SIGPIPE), write() for our stdout/stderr.
bool writeFully(int fd, std::string_view data, bool socket) {
  while (!data.empty()) {
    ssize_t n = socket ? ::send(fd, data.data(), data.size(), MSG_NOSIGNAL)
                       : ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return false;
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

bool writeAll(int fd, std::string_view data) {
  return writeFully(fd, data, true);
}
bool writeOut(int fd, std::string_view data) {
  return writeFully(fd, data, false);
}

/// Puts the local terminal in raw mode for a TTY exec; restores it on destruction.
class RawTerminal {
 public:
  RawTerminal() {
    if (::tcgetattr(STDIN_FILENO, &saved_) == 0) {
      termios raw = saved_;
      ::cfmakeraw(&raw);
      active_ = ::tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
    }
  }
  RawTerminal(const RawTerminal&) = delete;
  RawTerminal& operator=(const RawTerminal&) = delete;
  RawTerminal(RawTerminal&&) = delete;
  RawTerminal& operator=(RawTerminal&&) = delete;
  ~RawTerminal() {
    if (active_) {
      ::tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
    }
  }

 private:
  termios saved_{};
  bool active_ = false;
};

}  // namespace

Result<std::string> controlRequest(const std::string& control_socket, const std::string& op,
                                   int timeout_ms) {
  return controlRequestLine(control_socket, nlohmann::json({{"op", op}}).dump(), timeout_ms);
}

Result<std::string> controlRequestLine(const std::string& control_socket,
                                       const std::string& request, int timeout_ms) {
  ML_ASSIGN_OR_RETURN(Fd fd, connectControl(control_socket, timeout_ms));
  if (!writeAll(fd.get(), request + "\n")) {
    return makeError(Errc::Unavailable, "supervisor closed the control connection", errno);
  }
  std::string reply;
  char buf[4096];
  pollfd p{fd.get(), POLLIN, 0};
  while (reply.find('\n') == std::string::npos && ::poll(&p, 1, timeout_ms) > 0) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n <= 0) {
      break;
    }
    reply.append(buf, static_cast<size_t>(n));
  }
  if (reply.empty()) {
    return makeError(Errc::Unavailable, "no reply from the sandbox supervisor");
  }
  return reply.substr(0, reply.find('\n'));
}

Result<int> runExec(const std::string& control_socket, const ExecClientOptions& options) {
  ML_ASSIGN_OR_RETURN(Fd sock, connectControl(control_socket, options.connect_timeout_ms));
  bool tty = options.request.tty;
  guestproto::ExecRequest req = options.request;
  if (tty) {
    winsize ws{};
    if (::ioctl(STDIN_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 0) {
      req.rows = ws.ws_row;
      req.cols = ws.ws_col;
    }
  }
  std::string hello = "{\"op\": \"exec\"}\n" + guestproto::encodeStart(req);
  if (!options.forward_stdin) {
    hello += guestproto::encodeExecMessage(ExecKind::StdinEof, "");
  }
  if (!writeAll(sock.get(), hello)) {
    return makeError(Errc::Unavailable, "supervisor closed the control connection", errno);
  }

  // Signals arrive through a signalfd so that the poll loop sees them in order with the data.
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGWINCH);
  sigset_t old;
  ::sigprocmask(SIG_BLOCK, &mask, &old);
  Fd sfd(::signalfd(-1, &mask, SFD_CLOEXEC));
  struct Restore {
    sigset_t* old;
    ~Restore() { ::sigprocmask(SIG_SETMASK, old, nullptr); }
  } restore{&old};
  std::optional<RawTerminal> raw;
  if (tty && ::isatty(STDIN_FILENO) != 0) {
    raw.emplace();
  }

  std::string in;
  bool have_reply = false;
  bool stdin_open = options.forward_stdin;
  guestproto::ExecMessageReader reader;
  for (;;) {
    pollfd fds[3] = {{sock.get(), POLLIN, 0}, {sfd.get(), POLLIN, 0}, {STDIN_FILENO, 0, 0}};
    if (stdin_open && have_reply) {
      fds[2].events = POLLIN;
    }
    if (::poll(fds, 3, -1) < 0) {
      if (errno == EINTR) {
        continue;
      }
      return makeError(Errc::System, "poll", errno);
    }
    if ((fds[1].revents & POLLIN) != 0) {
      signalfd_siginfo si{};
      if (::read(sfd.get(), &si, sizeof(si)) == static_cast<ssize_t>(sizeof(si))) {
        if (si.ssi_signo == SIGWINCH && tty) {
          winsize ws{};
          if (::ioctl(STDIN_FILENO, TIOCGWINSZ, &ws) == 0) {
            (void)writeAll(sock.get(), guestproto::encodeResize(ws.ws_row, ws.ws_col));
          }
        } else if (si.ssi_signo == SIGINT || si.ssi_signo == SIGTERM) {
          // Cancel: closing the connection makes the guest terminate the process group.
          return makeError(Errc::Unavailable, fmt::format("cancelled by signal {}", si.ssi_signo));
        }
      }
    }
    if ((fds[2].revents & (POLLIN | POLLHUP)) != 0) {
      char buf[32 * 1024];
      ssize_t n = ::read(STDIN_FILENO, buf, sizeof(buf));
      if (n > 0) {
        if (!writeAll(sock.get(),
                      guestproto::encodeExecMessage(
                          ExecKind::Stdin, std::string_view(buf, static_cast<size_t>(n))))) {
          return makeError(Errc::Unavailable, "sandbox connection lost");
        }
      } else if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) {
        stdin_open = false;
        (void)writeAll(sock.get(), guestproto::encodeExecMessage(ExecKind::StdinEof, ""));
      }
    }
    if ((fds[0].revents & (POLLIN | POLLHUP | POLLERR)) == 0) {
      continue;
    }
    char buf[64 * 1024];
    ssize_t n = ::read(sock.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return makeError(Errc::Unavailable, "the sandbox supervisor closed the connection");
    }
    std::string_view data(buf, static_cast<size_t>(n));
    if (!have_reply) {
      in.append(data);
      size_t nl = in.find('\n');
      if (nl == std::string::npos) {
        continue;
      }
      auto reply = nlohmann::json::parse(in.substr(0, nl), nullptr, false);
      if (!reply.is_object() || !reply.value("ok", false)) {
        std::string error = reply.is_object() ? reply.value("error", "") : in.substr(0, nl);
        return makeError(Errc::Unavailable, fmt::format("exec failed: {}", error));
      }
      have_reply = true;
      data = std::string_view(in).substr(nl + 1);
      std::string rest(data);
      in.clear();
      ML_RETURN_IF_ERROR(reader.feed(rest));
    } else {
      ML_RETURN_IF_ERROR(reader.feed(data));
    }
    while (auto msg = reader.next()) {
      switch (msg->kind) {
        case ExecKind::Stdout:
          (void)writeOut(STDOUT_FILENO, msg->payload);
          break;
        case ExecKind::Stderr:
          (void)writeOut(STDERR_FILENO, msg->payload);
          break;
        case ExecKind::Exit: {
          ML_ASSIGN_OR_RETURN(auto exit, guestproto::decodeExit(msg->payload));
          if (!exit.error.empty()) {
            raw.reset();
            fmt::print(stderr, "matchlock: {}\n", exit.error);
          }
          return exit.code;
        }
        default:
          break;
      }
    }
  }
}

}  // namespace matchlock::runtime
