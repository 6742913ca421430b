// SPDX-License-Identifier: Apache-2.0
#include "guest/agent/exec_session.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <grp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "guest/agent/log.h"
#include "guest/agent/users.h"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace matchlock::guest {
namespace {

using guestproto::ExecKind;

constexpr size_t kReadChunk = 32 * 1024;
/// Output queued in the mux beyond this pauses reading from the process.
constexpr size_t kOutputHighWater = 256 * 1024;
/// Stdin buffered beyond this stops granting the host credit.
constexpr size_t kStdinHighWater = 1024 * 1024;
/// After the process exits, how long to wait for its pipes to reach EOF (a background child may
/// hold them open).
constexpr std::chrono::milliseconds kDrainGrace{2000};
constexpr const char* kDefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

Status setNonBlocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return makeError(Errc::System, "fcntl O_NONBLOCK", errno);
  }
  return ok();
}

// Writes all of `data` to a blocking fd; child-side use only (async-signal-safe).
void writeAll(int fd, const void* data, size_t len) {
  const char* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) {
        continue;
      }
      return;
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
}

}  // namespace

ExecSession::ExecSession(ev::Loop& loop, guestproto::Mux& mux, uint32_t stream,
                         std::function<void()> activity, std::string cgroup_procs,
                         const std::map<std::string, std::string>* base_env, bool service,
                         Isolation isolation)
    : loop_(loop),
      mux_(mux),
      stream_(stream),
      activity_(std::move(activity)),
      cgroup_procs_(std::move(cgroup_procs)),
      base_env_(service ? nullptr : base_env),
      service_(service),
      isolation_(service ? Isolation::None : isolation) {}

ExecSession::~ExecSession() {
  // Watches before fds (Watch does not own the fd).
  stdin_watch_.reset();
  stdout_watch_.reset();
  stderr_watch_.reset();
}

void ExecSession::send(std::string bytes) {
  if (!stream_gone_) {
    (void)mux_.send(stream_, bytes);
  }
  activity_();
}

void ExecSession::onData(std::string_view data) {
  if (stdin_buf_.size() >= kStdinHighWater) {
    withheld_credit_ += data.size();
  } else {
    mux_.consumed(stream_, data.size());
  }
  if (Status st = reader_.feed(data); !st) {
    logLine("exec stream {}: {}", stream_, st.error().message());
    mux_.reset(stream_, 2, st.error().message());
    onReset();
    return;
  }
  while (auto msg = reader_.next()) {
    if (!started_) {
      if (msg->kind != ExecKind::Start) {
        fail(127, "first message on an exec stream must be Start");
        return;
      }
      start(msg->payload);
      continue;
    }
    switch (msg->kind) {
      case ExecKind::Stdin:
        if (!stdin_eof_ && stdin_) {
          stdin_buf_ += msg->payload;
          writeStdin();
        }
        break;
      case ExecKind::StdinEof:
        stdin_eof_ = true;
        closeStdinIfDone();
        break;
      case ExecKind::Resize:
        if (auto rc = guestproto::decodeResize(msg->payload); rc && tty_ && stdout_) {
          winsize ws{};
          ws.ws_row = rc->first;
          ws.ws_col = rc->second;
          (void)::ioctl(stdout_.get(), TIOCSWINSZ, &ws);
        }
        break;
      case ExecKind::Signal:
        if (auto sig = guestproto::decodeSignal(msg->payload); sig && pid_ > 0 && !exit_status_) {
          (void)::kill(-pid_, static_cast<int>(*sig));
        }
        break;
      default:
        logLine("exec stream {}: unexpected message kind {}", stream_, static_cast<int>(msg->kind));
        break;
    }
  }
}

Result<guestproto::ExecRequest> ExecSession::requestOf(std::string_view payload) const {
  if (!service_) {
    return guestproto::decodeStart(payload);
  }
  auto j = nlohmann::json::parse(payload, nullptr, false);
  if (!j.is_object() || !j.contains("op") || !j["op"].is_string()) {
    return makeError(Errc::InvalidSpec, "service request must be a JSON object with an op");
  }
  guestproto::ExecRequest req;
  // The helper is this very binary: a separate process, so that a service touching a
  // host-served mount never blocks the loop that relays that mount's FUSE requests.
  req.argv = {"/proc/self/exe", "__service", std::string(payload)};
  req.cwd = "/";
  req.kill_grace_seconds = 1;
  return req;
}

void ExecSession::start(std::string_view payload) {
  started_ = true;
  auto req = requestOf(payload);
  if (!req) {
    fail(127, req.error().message());
    return;
  }
  tty_ = req->tty;
  kill_grace_seconds_ = req->kill_grace_seconds;
  auto user = resolveUser(req->user);
  if (!user) {
    fail(126, user.error().message());
    return;
  }

  // Everything the child needs is prepared before fork: it only makes async-signal-safe calls.
  std::map<std::string, std::string> env = {{"PATH", kDefaultPath}, {"HOME", user->home}};
  if (tty_) {
    env["TERM"] = "xterm";
  }
  // The sandbox's own environment (CA bundle variables, secret placeholders) under the
  // request's: an explicit -e still wins.
  if (base_env_ != nullptr) {
    for (const auto& [k, v] : *base_env_) {
      env[k] = v;
    }
  }
  for (const auto& [k, v] : req->env) {
    env[k] = v;
  }
  std::vector<std::string> env_strings;
  for (const auto& [k, v] : env) {
    env_strings.push_back(k + "=" + v);
  }
  std::vector<char*> envp;
  for (std::string& s : env_strings) {
    envp.push_back(s.data());
  }
  envp.push_back(nullptr);
  std::vector<char*> argv;
  for (std::string& a : req->argv) {
    argv.push_back(a.data());
  }
  argv.push_back(nullptr);
  std::string cwd = req->cwd.empty() ? user->home : req->cwd;

  Fd child_in;
  Fd child_out;
  Fd child_err;
  Fd pty_slave;
  if (tty_) {
    Fd master(::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC));
    if (!master || ::grantpt(master.get()) != 0 || ::unlockpt(master.get()) != 0) {
      fail(126, fmt::format("cannot allocate a pty: {}", std::strerror(errno)));
      return;
    }
    char name[64];
    if (::ptsname_r(master.get(), name, sizeof(name)) != 0) {
      fail(126, "ptsname failed");
      return;
    }
    pty_slave = Fd(::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC));
    if (!pty_slave) {
      fail(126, fmt::format("cannot open {}: {}", name, std::strerror(errno)));
      return;
    }
    winsize ws{};
    ws.ws_row = req->rows;
    ws.ws_col = req->cols;
    (void)::ioctl(master.get(), TIOCSWINSZ, &ws);
    stdin_ = master.dup().value_or(Fd());
    stdout_ = std::move(master);
  } else {
    auto in = Pipe::create();
    auto out = Pipe::create();
    auto err = Pipe::create();
    if (!in || !out || !err) {
      fail(126, "cannot create pipes");
      return;
    }
    child_in = std::move(in->read);
    stdin_ = std::move(in->write);
    child_out = std::move(out->write);
    stdout_ = std::move(out->read);
    child_err = std::move(err->write);
    stderr_ = std::move(err->read);
  }
  auto errpipe = Pipe::create();
  if (!errpipe) {
    fail(126, "cannot create pipes");
    return;
  }
  std::vector<gid_t> groups = user->groups;
  const char* cgroup = cgroup_procs_.empty() ? nullptr : cgroup_procs_.c_str();
  uid_t uid = user->uid;
  gid_t gid = user->gid;
  const bool confine = isolation_ != Isolation::None;
  const bool harden = isolation_ == Isolation::Full;

  // The exec's own PID namespace: its init first, then the process below as pid 2 there (our
  // child all the same, so that its real status is ours to report).
  std::optional<ExecPidNamespace> pid_ns;
  if (confine) {
    auto ns = ExecPidNamespace::enter();
    if (!ns) {
      fail(126, fmt::format("confining the process: {}", ns.error().message()));
      return;
    }
    pid_ns.emplace(std::move(*ns));
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    fail(126, fmt::format("fork: {}", std::strerror(errno)));
    return;
  }
  if (pid == 0) {
    // Child: async-signal-safe calls only, then exec or _exit.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int sig = 1; sig < NSIG; ++sig) {
      ::signal(sig, SIG_DFL);
    }
    ::setsid();  // own session and process group: cancel signals the whole group
    if (cgroup != nullptr) {
      int cg = ::open(cgroup, O_WRONLY | O_CLOEXEC);
      if (cg >= 0) {
        writeAll(cg, "0", 1);  // "0" = the writing process: the sandbox's cgroup (cpu.max)
        (void)::close(cg);
      }
    }
    int stage = 0;
    int in_fd = tty_ ? pty_slave.get() : child_in.get();
    int out_fd = tty_ ? pty_slave.get() : child_out.get();
    int err_fd = tty_ ? pty_slave.get() : child_err.get();
    if (tty_) {
      ::ioctl(pty_slave.get(), TIOCSCTTY, 0);
    }
    if (::dup2(in_fd, 0) < 0 || ::dup2(out_fd, 1) < 0 || ::dup2(err_fd, 2) < 0) {
      ::_exit(126);
    }
    int confined = confine ? confineMounts() : 0;
    if (confined == 0 && harden) {
      confined = hardenProcess();
    }
    if (confined != 0) {
      int report[2] = {4, confined};
      writeAll(errpipe->write.get(), report, sizeof(report));
      ::_exit(126);
    }
    stage = 1;
    if (::chdir(cwd.c_str()) == 0) {
      stage = 2;
      if (::setgroups(groups.size(), groups.data()) == 0 && ::setgid(gid) == 0 &&
          ::setuid(uid) == 0) {
        stage = 3;
        environ = envp.data();
        ::execvp(argv[0], argv.data());
      }
    }
    int report[2] = {stage, errno};
    writeAll(errpipe->write.get(), report, sizeof(report));
    ::_exit(127);
  }

  // Parent: our later children are ours again; the init starts watching pid 2.
  pid_ns.reset();
  pid_ = pid;
  errpipe->write.reset();
  child_in.reset();
  child_out.reset();
  child_err.reset();
  pty_slave.reset();
  // Non-blocking from now on: stdin may arrive (and be written) before the exec report.
  for (Fd* fd : {&stdin_, &stdout_, &stderr_}) {
    if (*fd) {
      (void)setNonBlocking(fd->get());
    }
  }
  cwd_ = cwd;
  argv0_ = req->argv[0];
  report_ = std::move(errpipe->read);
  (void)setNonBlocking(report_.get());
  auto watch = loop_.watch(report_.get(), ev::kRead, [this](uint32_t) { onExecReport(); });
  if (!watch) {
    // Without a watch the report would never be read and the session would hang: give up on
    // the child instead (it is reaped as usual).
    report_.reset();
    (void)::kill(pid, SIGKILL);
    stdin_.reset();
    stdout_.reset();
    stderr_.reset();
    finished_early_ = true;
    fail(126, fmt::format("cannot watch the exec report: {}", watch.error().toString()));
    return;
  }
  report_watch_ = std::move(*watch);
}

void ExecSession::onExecReport() {
  if (!report_) {
    return;
  }
  int report[2] = {0, 0};
  ssize_t n = 0;
  do {
    n = ::read(report_.get(), report, sizeof(report));
  } while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EAGAIN) {
    return;  // spurious wake-up: the child has neither exec'd nor failed yet
  }
  report_watch_.reset();
  report_.reset();
  if (n == static_cast<ssize_t>(sizeof(report))) {
    // The child failed before exec; it exits 127 and is reaped as usual.
    const char* what = report[0] == 1   ? "chdir"
                       : report[0] == 2 ? "switching user"
                       : report[0] == 4 ? "confining"
                                        : "exec";
    std::string error =
        fmt::format("{} {}: {}", what, report[0] == 1 ? cwd_ : argv0_, std::strerror(report[1]));
    int code = (report[0] == 3 && report[1] == ENOENT) ? 127 : 126;
    stdin_.reset();
    stdout_.reset();
    stderr_.reset();
    send(guestproto::encodeExit(guestproto::ExecExit{code, 0, error}));
    if (!stream_gone_) {
      (void)mux_.closeWrite(stream_);
    }
    finished_early_ = true;
    if (exit_status_) {
      done_ = true;
    }
    return;
  }
  const pid_t pid = pid_;
  send(guestproto::encodeExecMessage(ExecKind::Started, fmt::format("{{\"pid\": {}}}", pid)));

  auto out_watch = loop_.watch(stdout_.get(), ev::kRead, [this](uint32_t) {
    readOutput(stdout_, stdout_watch_, ExecKind::Stdout);
  });
  if (out_watch) {
    stdout_watch_ = std::move(*out_watch);
  }
  if (stderr_) {
    auto err_watch = loop_.watch(stderr_.get(), ev::kRead, [this](uint32_t) {
      readOutput(stderr_, stderr_watch_, ExecKind::Stderr);
    });
    if (err_watch) {
      stderr_watch_ = std::move(*err_watch);
    }
  }
  if (stdin_ && !tty_) {
    auto in_watch = loop_.watch(stdin_.get(), 0, [this](uint32_t) { writeStdin(); });
    if (in_watch) {
      stdin_watch_ = std::move(*in_watch);
    }
  }
  if (!stdin_buf_.empty()) {
    writeStdin();  // what arrived while the child was starting
  }
  closeStdinIfDone();
}

void ExecSession::fail(int code, const std::string& error) {
  logLine("exec stream {}: {}", stream_, error);
  send(guestproto::encodeExit(guestproto::ExecExit{code, 0, error}));
  if (!stream_gone_) {
    (void)mux_.closeWrite(stream_);
  }
  done_ = true;
}

void ExecSession::readOutput(Fd& fd, ev::Watch& watch, ExecKind kind) {
  char buf[kReadChunk];
  for (int rounds = 0; rounds < 8 && fd; ++rounds) {
    if (!stream_gone_ && mux_.pendingBytes(stream_) > kOutputHighWater) {
      (void)watch.setEvents(0);  // paused until resume()
      return;
    }
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n > 0) {
      send(guestproto::encodeExecMessage(kind, std::string_view(buf, static_cast<size_t>(n))));
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && errno == EAGAIN) {
      return;
    }
    // EOF, or EIO on a pty master once the slave side is gone.
    watch.reset();
    if (tty_ && &fd == &stdout_) {
      stdin_watch_.reset();
      stdin_.reset();
    }
    fd.reset();
    maybeFinish();
    return;
  }
}

void ExecSession::resume() {
  if (stream_gone_ || mux_.pendingBytes(stream_) > kOutputHighWater) {
    return;
  }
  if (stdout_watch_ && stdout_watch_.events() == 0) {
    (void)stdout_watch_.setEvents(ev::kRead);
  }
  if (stderr_watch_ && stderr_watch_.events() == 0) {
    (void)stderr_watch_.setEvents(ev::kRead);
  }
}

void ExecSession::writeStdin() {
  while (!stdin_buf_.empty() && stdin_) {
    ssize_t n = ::write(stdin_.get(), stdin_buf_.data(), stdin_buf_.size());
    if (n > 0) {
      stdin_buf_.erase(0, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0 && errno == EAGAIN) {
      if (stdin_watch_) {
        (void)stdin_watch_.setEvents(ev::kWrite);
      }
      return;
    }
    // EPIPE: the process closed its stdin; drop what is left.
    stdin_buf_.clear();
    stdin_watch_.reset();
    stdin_.reset();
    break;
  }
  if (stdin_watch_ && stdin_buf_.empty()) {
    (void)stdin_watch_.setEvents(0);
  }
  if (withheld_credit_ > 0 && stdin_buf_.size() < kStdinHighWater / 2 && !stream_gone_) {
    mux_.consumed(stream_, withheld_credit_);
    withheld_credit_ = 0;
    // The Window frame is queued on the mux: when this runs from the stdin pipe's writable
    // event (not from onData), nothing else would flush it and the host would wait for credit
    // until unrelated traffic happened to flush the mux.
    activity_();
  }
  closeStdinIfDone();
}

void ExecSession::closeStdinIfDone() {
  if (stdin_eof_ && stdin_buf_.empty() && stdin_) {
    if (tty_) {
      // A pty has no half-close: send the terminal's EOF character (once) instead.
      if (!tty_eof_sent_) {
        char eof = 4;
        (void)::write(stdin_.get(), &eof, 1);
        tty_eof_sent_ = true;
      }
      return;
    }
    stdin_watch_.reset();
    stdin_.reset();
  }
}

void ExecSession::onRemoteClose() {
  if (!started_) {
    (void)mux_.closeWrite(stream_);
    done_ = true;
    return;
  }
  stdin_eof_ = true;
  closeStdinIfDone();
}

void ExecSession::onReset() {
  stream_gone_ = true;
  cancel();
  if (pid_ <= 0 || exit_status_) {
    done_ = true;
  }
}

void ExecSession::cancel() {
  if (pid_ <= 0 || exit_status_) {
    return;
  }
  (void)::kill(-pid_, SIGTERM);
  auto timer = loop_.timer([this] {
    if (!exit_status_) {
      (void)::kill(-pid_, SIGKILL);
    }
  });
  if (timer) {
    kill_timer_ = std::move(*timer);
    (void)kill_timer_.arm(std::chrono::seconds(kill_grace_seconds_));
  }
}

void ExecSession::onExit(int wait_status) {
  exit_status_ = wait_status;
  kill_timer_ = ev::Timer();
  onExecReport();  // the child is gone: its report (or the pipe's EOF) is there to read
  if (finished_early_) {
    done_ = true;
    return;
  }
  if (stream_gone_) {
    done_ = true;
    return;
  }
  if (stdout_ || stderr_) {
    auto timer = loop_.timer([this] {
      // Something (a background child) still holds the output open: stop waiting for it.
      stdout_watch_.reset();
      stderr_watch_.reset();
      stdout_.reset();
      stderr_.reset();
      maybeFinish();
    });
    if (timer) {
      drain_timer_ = std::move(*timer);
      (void)drain_timer_.arm(kDrainGrace);
    }
  }
  maybeFinish();
}

void ExecSession::maybeFinish() {
  if (exit_status_ && !stdout_ && !stderr_ && !done_) {
    finish();
  }
}

void ExecSession::finish() {
  guestproto::ExecExit e;
  int st = *exit_status_;
  if (WIFEXITED(st)) {
    e.code = WEXITSTATUS(st);
  } else if (WIFSIGNALED(st)) {
    e.signal = WTERMSIG(st);
    e.code = 128 + e.signal;
  }
  send(guestproto::encodeExit(e));
  if (!stream_gone_) {
    (void)mux_.closeWrite(stream_);
  }
  drain_timer_ = ev::Timer();
  stdin_watch_.reset();
  stdin_.reset();
  done_ = true;
  activity_();
}

}  // namespace matchlock::guest
