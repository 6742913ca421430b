// SPDX-License-Identifier: Apache-2.0
// `matchlock rpc` (docs/rpc.md): one ev::Loop drives stdin, stdout and every in-flight request.
// `create` and `close` run synchronously on the loop (as upstream, where they wait for in-flight
// work first); execs, file operations and log streams are ExecChannels to the sandbox's
// supervisor, so many run at once and a cancel reaches the guest immediately.
#include "rpc/server.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/base64.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/strings.h"
#include "ev/loop.h"
#include "guestproto/exec.h"
#include "image/image.h"
#include "image/store.h"
#include "rpc/create_params.h"
#include "rpc/jsonrpc.h"
#include "runtime/exec_channel.h"
#include "runtime/exec_client.h"
#include "runtime/port_forward.h"
#include "runtime/sandbox.h"
#include "spec/decode.h"
#include "state/store.h"
#include "supervisor/supervisor.h"
#include "sys/process_ref.h"

namespace matchlock::rpc {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using guestproto::ExecKind;

/// Input lines up to this size (upstream: 10 MiB; a 7.5 MB file is 10 MiB of base64).
constexpr size_t kMaxLine = 16ULL << 20;
/// read_file's cap, as upstream.
constexpr uint64_t kMaxReadBytes = 16ULL << 20;
/// Output queued towards the client above which every exec's output is paused (end-to-end
/// backpressure to the guest process), resumed below the low mark.
constexpr size_t kOutHigh = 8ULL << 20;
constexpr size_t kOutLow = 1ULL << 20;
/// How often log_stream and the event tail look for new bytes.
constexpr auto kTailInterval = std::chrono::milliseconds(100);
/// At most this much of a log or event file is read per tick.
constexpr size_t kTailChunk = 1ULL << 20;
/// A launched entrypoint that fails within this window fails `create` (upstream's rule).
constexpr auto kEntrypointGrace = std::chrono::milliseconds(500);

/// A JSON-RPC error as a value: `code` from ErrorCode, `message` for the client.
struct RpcFailure {
  int code;
  std::string message;
};

/// What a request handler answers: a result, a failure, or "later" (the call stays in flight).
struct Reply {
  std::optional<Json> result;
  std::optional<RpcFailure> failure;
  static Reply ok(Json r) { return Reply{std::move(r), std::nullopt}; }
  static Reply fail(int code, std::string message) {
    return Reply{std::nullopt, RpcFailure{code, std::move(message)}};
  }
  static Reply later() { return Reply{}; }
};

enum class CallKind { Exec, ExecStream, ExecPipe, ExecTty, Service, LogStream };

/// One request in flight.
struct Call {
  Json id;
  CallKind kind = CallKind::Exec;
  std::unique_ptr<runtime::ExecChannel> channel;
  Clock::time_point started = Clock::now();
  std::string out;  ///< buffered stdout (exec, services)
  std::string err;  ///< buffered stderr
  /// Services: turns the finished process into the reply.
  std::function<Reply(const guestproto::ExecExit&, Call&)> finish;
  bool finished = false;  ///< answered: late output or timer ticks are dropped
  // log_stream
  ev::Timer timer;
  std::string path;
  size_t offset = 0;
};

std::string idKey(const Json& id) {
  return id.dump();
}

/// A string param, "" when absent; InvalidParams when present with another type.
Result<std::string> stringParam(const Json& params, const char* key, bool required) {
  auto it = params.find(key);
  if (it == params.end() || it->is_null()) {
    if (required) {
      return makeError(Errc::InvalidSpec, fmt::format("{} is required", key));
    }
    return std::string();
  }
  if (!it->is_string()) {
    return makeError(Errc::InvalidSpec, fmt::format("{} must be a string", key));
  }
  return it->get<std::string>();
}

Result<int64_t> intParam(const Json& params, const char* key, int64_t fallback, int64_t min,
                         int64_t max) {
  auto it = params.find(key);
  if (it == params.end() || it->is_null()) {
    return fallback;
  }
  if (!it->is_number_integer() && !it->is_number_unsigned()) {
    return makeError(Errc::InvalidSpec, fmt::format("{} must be an integer", key));
  }
  int64_t v =
      it->is_number_unsigned()
          ? static_cast<int64_t>(std::min<uint64_t>(it->get<uint64_t>(), uint64_t{INT64_MAX}))
          : it->get<int64_t>();
  if (v < min || v > max) {
    return makeError(Errc::InvalidSpec, fmt::format("{} must be between {} and {}", key, min, max));
  }
  return v;
}

Result<std::vector<std::string>> hostsParam(const Json& params) {
  auto it = params.find("hosts");
  if (it == params.end() || !it->is_array() || it->empty()) {
    return makeError(Errc::InvalidSpec, "hosts must be a non-empty array of strings");
  }
  std::vector<std::string> hosts;
  for (const Json& h : *it) {
    if (!h.is_string() || trim(h.get<std::string>()).empty()) {
      return makeError(Errc::InvalidSpec, "hosts must be a non-empty array of strings");
    }
    hosts.push_back(toLower(std::string(trim(h.get<std::string>()))));
  }
  return hosts;
}

/// The first failed param of a handler, as an InvalidParams reply.
template <class... R>
std::optional<Reply> badParams(const R&... results) {
  std::optional<Reply> out;
  auto check = [&out](const auto& r) {
    if (!out && !r) {
      out = Reply::fail(kInvalidParams, fmt::format("Invalid params: {}", r.error().message()));
    }
  };
  (check(results), ...);
  return out;
}

/// The last stderr line of a failed guest service ("read /x: no such file"), or a fallback.
std::string serviceError(const Call& c, const guestproto::ExecExit& exit, std::string_view what) {
  if (!exit.error.empty()) {
    return fmt::format("{}: {}", what, exit.error);
  }
  std::string text(trim(c.err));
  if (size_t nl = text.rfind('\n'); nl != std::string::npos) {
    text = text.substr(nl + 1);
  }
  return text.empty() ? fmt::format("{} failed (exit {})", what, exit.code) : text;
}

/// The bytes of `path` from `offset` on (at most `max`), for tailing a log. `offset` is reset to
/// 0 when the file shrank (rotated or truncated). Empty when it does not exist (yet).
std::string readTail(const std::string& path, size_t& offset, size_t max) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st {};
  if (!fd || ::fstat(fd.get(), &st) != 0) {
    return {};
  }
  auto size = static_cast<size_t>(st.st_size);
  if (size < offset) {
    offset = 0;
  }
  std::string out(std::min(size - offset, max), '\0');
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n =
        ::pread(fd.get(), out.data() + got, out.size() - got, static_cast<off_t>(offset + got));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      break;
    }
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  offset += got;
  return out;
}

/// The sandbox this server created and owns.
struct Sandbox {
  state::SandboxRecord record;
  std::string run_root;
  std::string run_dir;
  std::string control;
  std::string workspace;  ///< upstream's vfs.workspace: the exec cwd fallback
  bool keep = false;      ///< keep_on_disconnect: outlives this server
  runtime::ExecDefaults defaults;
  std::string events_path;
  size_t events_offset = 0;
  std::string events_partial;
};

class Server {
 public:
  Server(ev::Loop& loop, const ServerOptions& options) : loop_(loop), opt_(options) {}

  Status start() {
    for (int fd : {opt_.in_fd, opt_.out_fd}) {
      int flags = ::fcntl(fd, F_GETFL);
      if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
        return makeError(Errc::System, "fcntl O_NONBLOCK on stdio", errno);
      }
      saved_flags_.emplace_back(fd, flags);
    }
    // epoll refuses regular files (`matchlock rpc <requests >replies`): those never block, so
    // stdin is then read from a posted task and stdout written directly.
    if (auto w = loop_.watch(opt_.in_fd, ev::kRead, [this](uint32_t) { onReadable(); }); w) {
      in_watch_ = std::move(*w);
    } else if (w.error().sysErrno() == EPERM) {
      loop_.post([this] { onReadable(); });
    } else {
      return makeError(std::move(w).error());
    }
    if (auto w = loop_.watch(opt_.out_fd, 0, [this](uint32_t ev) { onWritable(ev); }); w) {
      out_watch_ = std::move(*w);
    } else if (w.error().sysErrno() != EPERM) {
      return makeError(std::move(w).error());
    }
    ML_ASSIGN_OR_RETURN(events_timer_, loop_.timer([this] { tailEvents(); }));
    return events_timer_.arm(kTailInterval, kTailInterval);
  }

  /// After the loop ends: nothing of ours may outlive the process unless asked to.
  void shutdown() {
    cancelAll();
    forwarder_.reset();
    if (vm_ && !vm_->keep && !closed_) {
      dropSandbox(/*remove_record=*/true, std::chrono::seconds(10));
    }
    flushBlocking(std::chrono::seconds(2));
    // A terminal's file description is shared with the shell: give it back as it was.
    for (auto it = saved_flags_.rbegin(); it != saved_flags_.rend(); ++it) {
      (void)::fcntl(it->first, F_SETFL, it->second);
    }
  }

 private:
  // ---- Transport --------------------------------------------------------------------------

  void onReadable() {
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(opt_.in_fd, buf, sizeof buf);
      if (n > 0) {
        reader_.feed(std::string_view(buf, static_cast<size_t>(n)));
        while (auto line = reader_.next()) {
          if (closed_) {
            break;  // after close, nothing more is read
          }
          if (line->oversized) {
            send(errorLine(nullptr, kParseError,
                           fmt::format("Parse error: line longer than {} bytes", kMaxLine)));
            continue;
          }
          handleLine(line->text);
          if (transport_lost_) {
            return;
          }
        }
        if (closed_ || transport_lost_) {
          return;
        }
        if (!in_watch_) {
          loop_.post([this] { onReadable(); });  // a regular file: one chunk per turn
          return;
        }
        continue;
      }
      if (n < 0 && (errno == EINTR)) {
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return;
      }
      lose(n == 0 ? "stdin closed" : "stdin read failed");
      return;
    }
  }

  void send(std::string_view line) {
    if (out_off_ > 0 && out_off_ >= out_.size() / 2) {
      out_.erase(0, out_off_);  // compact: amortised O(1) per byte
      out_off_ = 0;
    }
    out_ += line;
    flush();
  }

  size_t pending() const { return out_.size() - out_off_; }

  void flush() {
    while (pending() > 0) {
      ssize_t n = ::write(opt_.out_fd, out_.data() + out_off_, pending());
      if (n > 0) {
        out_off_ += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        break;
      }
      out_.clear();
      out_off_ = 0;
      lose("stdout write failed");
      return;
    }
    if (pending() == 0) {
      out_.clear();
      out_off_ = 0;
    }
    if (out_watch_) {
      (void)out_watch_.setEvents(out_.empty() ? 0 : ev::kWrite);
    }
    bool pause = pending() > kOutHigh;
    bool resume = pending() < kOutLow;
    if ((pause && !output_paused_) || (resume && output_paused_)) {
      output_paused_ = pause;
      for (auto& entry : calls_) {
        if (entry.second->channel) {
          entry.second->channel->pauseOutput(output_paused_);
        }
      }
    }
    if (out_.empty() && closed_) {
      loop_.stop();
    }
  }

  void onWritable(uint32_t events) {
    if ((events & ev::kError) != 0 && (events & ev::kWrite) == 0) {
      out_.clear();
      out_off_ = 0;
      lose("stdout closed");
      return;
    }
    flush();
  }

  /// Bounded: the client may have stopped reading.
  void flushBlocking(std::chrono::milliseconds budget) {
    auto deadline = Clock::now() + budget;
    while (pending() > 0 && Clock::now() < deadline) {
      ssize_t n = ::write(opt_.out_fd, out_.data() + out_off_, pending());
      if (n > 0) {
        out_off_ += static_cast<size_t>(n);
      } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        pollfd p{opt_.out_fd, POLLOUT, 0};
        (void)::poll(&p, 1, 50);
      } else {
        break;
      }
    }
  }

  /// The client went away: cancel everything and end (shutdown() stops the sandbox).
  void lose(const char* why) {
    if (transport_lost_) {
      return;
    }
    transport_lost_ = true;
    ML_LOG(rpc, info, "client gone ({}): shutting down", why);
    loop_.stop();
  }

  // ---- Dispatch ---------------------------------------------------------------------------

  void respond(const Json& id, const Reply& r) {
    if (r.failure) {
      send(errorLine(id, r.failure->code, r.failure->message));
    } else if (r.result) {
      send(resultLine(id, *r.result));
    }
  }

  void notify(std::string_view method, const Json& id, std::string_view data) {
    send(notificationLine(method, {{"id", id}, {"data", base64Encode(data)}}));
  }

  void handleLine(const std::string& line) {
    Parsed p = parse(line);
    if (p.failure) {
      send(errorLine(p.failure->id, p.failure->code, p.failure->message));
      return;
    }
    Message& m = *p.message;
    if (!m.id) {
      handleNotification(m);
      return;
    }
    const Json id = *m.id;
    if (calls_.count(idKey(id)) != 0) {
      respond(id, Reply::fail(kInvalidRequest, "Invalid request: id is already in flight"));
      return;
    }
    Json params = m.params.is_null() ? Json::object() : m.params;
    if (!params.is_object()) {
      respond(id, Reply::fail(kInvalidParams, "Invalid params: params must be an object"));
      return;
    }
    respond(id, dispatch(m.method, id, params));
  }

  Reply dispatch(const std::string& method, const Json& id, const Json& params) {
    using Handler = Reply (Server::*)(const Json&, const Json&);
    static const std::map<std::string, Handler, std::less<>> kHandlers = {
        {"create", &Server::create},
        {"exec", &Server::exec},
        {"exec_stream", &Server::exec},
        {"exec_pipe", &Server::exec},
        {"exec_tty", &Server::exec},
        {"write_file", &Server::writeFile},
        {"read_file", &Server::readFile},
        {"list_files", &Server::listFiles},
        {"log", &Server::log},
        {"log_stream", &Server::logStream},
        {"allow_list_add", &Server::allowList},
        {"allow_list_delete", &Server::allowList},
        {"port_forward", &Server::portForward},
        {"cancel", &Server::cancel},
        {"close", &Server::close},
    };
    auto it = kHandlers.find(method);
    if (it == kHandlers.end()) {
      return Reply::fail(kMethodNotFound, fmt::format("Method not found: {}", method));
    }
    method_ = method;
    return (this->*(it->second))(id, params);
  }

  void handleNotification(const Message& m) {
    // These stream their output as notifications routed by the request's id: without one
    // nothing could be routed (upstream answers the same).
    if (m.method == "exec_pipe" || m.method == "exec_tty" || m.method == "log_stream") {
      send(errorLine(nullptr, kInvalidRequest,
                     fmt::format("Invalid request: {} requires an id", m.method)));
      return;
    }
    // Stdin feeding is inline, in order. Malformed or unknown ids are ignored (as upstream).
    const bool pipe = m.method.rfind("exec_pipe.", 0) == 0;
    const bool tty = m.method.rfind("exec_tty.", 0) == 0;
    if ((!pipe && !tty) || !m.params.is_object() || !m.params.contains("id")) {
      return;
    }
    auto it = calls_.find(idKey(m.params["id"]));
    if (it == calls_.end() || !it->second->channel ||
        it->second->kind != (pipe ? CallKind::ExecPipe : CallKind::ExecTty)) {
      return;
    }
    runtime::ExecChannel& ch = *it->second->channel;
    std::string_view verb = std::string_view(m.method).substr(m.method.find('.') + 1);
    if (verb == "stdin") {
      auto d = m.params.find("data");
      if (d == m.params.end() || !d->is_string()) {
        return;
      }
      if (auto bytes = base64Decode(d->get<std::string>()); bytes) {
        ch.sendStdin(*bytes);
      }
    } else if (verb == "stdin_eof") {
      ch.stdinEof();
    } else if (verb == "resize" && tty) {
      auto rows = intParam(m.params, "rows", 0, 1, 65535);
      auto cols = intParam(m.params, "cols", 0, 1, 65535);
      if (rows && cols && *rows > 0 && *cols > 0) {
        ch.resize(static_cast<uint16_t>(*rows), static_cast<uint16_t>(*cols));
      }
    }
  }

  // ---- Calls ------------------------------------------------------------------------------

  /// Ends a call: its reply goes out and the call (and its channel) is destroyed after the
  /// current callback returns.
  void finishCall(const Json& id, const Reply& reply) {
    auto it = calls_.find(idKey(id));
    if (it == calls_.end()) {
      return;
    }
    std::shared_ptr<Call> call = std::move(it->second);
    calls_.erase(it);
    call->finished = true;
    (void)call->timer.disarm();
    if (call->channel) {
      call->channel->close();
    }
    respond(id, reply);
    // The channel may be the one whose callback is running: destroy it on the next turn.
    loop_.post([call] {});
  }

  void cancelAll() {
    while (!calls_.empty()) {
      Json id = calls_.begin()->second->id;
      finishCall(id, Reply::fail(kCancelled, "request cancelled"));
    }
  }

  Result<Sandbox*> current() {
    if (!vm_) {
      return makeError(Errc::NotFound, "no sandbox: call create first");
    }
    return vm_.get();
  }

  /// Opens the channel of `call` and registers it. On failure nothing is registered.
  Reply openChannel(std::shared_ptr<Call> call, std::string_view op, std::string_view start,
                    int fail_code) {
    runtime::ExecChannel::Callbacks cb;
    Call* raw = call.get();
    Json id = call->id;
    cb.on_output = [this, raw](ExecKind kind, std::string_view data) {
      onOutput(*raw, kind, data);
    };
    cb.on_exit = [this, raw](const guestproto::ExecExit& exit) { onExit(*raw, exit); };
    cb.on_error = [this, id, fail_code](const Error& e) {
      finishCall(id, Reply::fail(fail_code, e.message()));
    };
    auto ch = runtime::ExecChannel::open(loop_, vm_->control, op, start, std::move(cb));
    if (!ch) {
      return Reply::fail(fail_code, ch.error().message());
    }
    call->channel = std::move(*ch);
    if (output_paused_) {
      call->channel->pauseOutput(true);
    }
    calls_[idKey(id)] = std::move(call);
    return Reply::later();
  }

  void onOutput(Call& c, ExecKind kind, std::string_view data) {
    if (c.finished) {
      return;
    }
    const bool err = kind == ExecKind::Stderr;
    switch (c.kind) {
      case CallKind::Exec:
      case CallKind::Service:
        (err ? c.err : c.out).append(data);
        break;
      case CallKind::ExecStream:
        notify(err ? "exec_stream.stderr" : "exec_stream.stdout", c.id, data);
        break;
      case CallKind::ExecPipe:
        notify(err ? "exec_pipe.stderr" : "exec_pipe.stdout", c.id, data);
        break;
      case CallKind::ExecTty:
        notify("exec_tty.stdout", c.id, data);
        break;
      case CallKind::LogStream:
        break;
    }
  }

  void onExit(Call& c, const guestproto::ExecExit& exit) {
    if (c.kind == CallKind::Service) {
      finishCall(c.id, c.finish(exit, c));
      return;
    }
    if (!exit.error.empty()) {
      finishCall(c.id, Reply::fail(kExecFailed, fmt::format("exec: {}", exit.error)));
      return;
    }
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - c.started);
    Json r = {{"exit_code", exit.code}, {"duration_ms", ms.count()}};
    if (c.kind == CallKind::Exec) {
      r["stdout"] = base64Encode(c.out);
      r["stderr"] = base64Encode(c.err);
    }
    finishCall(c.id, Reply::ok(std::move(r)));
  }

  // ---- exec, exec_stream, exec_pipe, exec_tty ---------------------------------------------

  Reply exec(const Json& id, const Json& params) {
    auto call = std::make_shared<Call>();
    call->id = id;
    call->kind = method_ == "exec"          ? CallKind::Exec
                 : method_ == "exec_stream" ? CallKind::ExecStream
                 : method_ == "exec_pipe"   ? CallKind::ExecPipe
                                            : CallKind::ExecTty;
    auto vm = current();
    if (!vm) {
      return Reply::fail(kVmFailed, vm.error().message());
    }
    auto command = stringParam(params, "command", true);
    auto cwd = stringParam(params, "working_dir", false);
    auto user = stringParam(params, "user", false);
    auto rows = intParam(params, "rows", 24, 1, 65535);
    auto cols = intParam(params, "cols", 80, 1, 65535);
    if (auto bad = badParams(command, cwd, user, rows, cols)) {
      return *bad;
    }
    if (command->empty()) {
      return Reply::fail(kInvalidParams, "Invalid params: command is required");
    }
    guestproto::ExecRequest req;
    req.argv = {"/bin/sh", "-c", *command};
    req.env = (*vm)->defaults.env;
    req.cwd = !cwd->empty()                  ? *cwd
              : !(*vm)->defaults.cwd.empty() ? (*vm)->defaults.cwd
                                             : (*vm)->workspace;
    req.user = !user->empty() ? *user : (*vm)->defaults.user;
    req.tty = call->kind == CallKind::ExecTty;
    req.rows = static_cast<uint16_t>(*rows);
    req.cols = static_cast<uint16_t>(*cols);
    req.kill_grace_seconds = 2;
    CallKind kind = call->kind;
    Reply r = openChannel(call, "exec", guestproto::startPayload(req), kExecFailed);
    if (r.failure) {
      return r;
    }
    if (kind == CallKind::ExecPipe || kind == CallKind::ExecTty) {
      send(notificationLine(kind == CallKind::ExecPipe ? "exec_pipe.ready" : "exec_tty.ready",
                            {{"id", id}}));
    } else {
      calls_[idKey(id)]->channel->stdinEof();
    }
    return r;
  }

  // ---- Files ------------------------------------------------------------------------------

  /// Runs a guest service (port 5003) for a file call: `input` is its stdin.
  Reply service(const Json& id, const Json& request, std::string_view input,
                std::function<Reply(const guestproto::ExecExit&, Call&)> finish) {
    auto vm = current();
    if (!vm) {
      return Reply::fail(kVmFailed, vm.error().message());
    }
    auto call = std::make_shared<Call>();
    call->id = id;
    call->kind = CallKind::Service;
    call->finish = std::move(finish);
    Reply r = openChannel(call, "service", request.dump(), kFileFailed);
    if (r.failure) {
      return r;
    }
    runtime::ExecChannel& ch = *calls_[idKey(id)]->channel;
    ch.sendStdin(input);
    ch.stdinEof();
    return r;
  }

  Reply writeFile(const Json& id, const Json& params) {
    auto path = stringParam(params, "path", true);
    auto content = stringParam(params, "content", false);
    auto mode = intParam(params, "mode", 0, 0, 07777);
    if (auto bad = badParams(path, content, mode)) {
      return *bad;
    }
    auto bytes = base64Decode(*content);
    if (!bytes) {
      return Reply::fail(kInvalidParams, "Invalid params: content is not valid base64");
    }
    Json req = {{"op", "write"}, {"path", *path}, {"mode", *mode}};
    return service(id, req, *bytes, [p = *path](const guestproto::ExecExit& exit, Call& c) {
      if (exit.code != 0 || !exit.error.empty()) {
        return Reply::fail(kFileFailed, serviceError(c, exit, "write " + p));
      }
      return Reply::ok(Json::object());
    });
  }

  Reply readFile(const Json& id, const Json& params) {
    auto path = stringParam(params, "path", true);
    if (auto bad = badParams(path)) {
      return *bad;
    }
    Json req = {{"op", "read"}, {"path", *path}, {"max_bytes", kMaxReadBytes}};
    return service(id, req, "", [p = *path](const guestproto::ExecExit& exit, Call& c) {
      if (exit.code != 0 || !exit.error.empty()) {
        return Reply::fail(kFileFailed, serviceError(c, exit, "read " + p));
      }
      return Reply::ok(Json{{"content", base64Encode(c.out)}});
    });
  }

  Reply listFiles(const Json& id, const Json& params) {
    auto path = stringParam(params, "path", true);
    if (auto bad = badParams(path)) {
      return *bad;
    }
    Json req = {{"op", "list"}, {"path", *path}};
    return service(id, req, "", [p = *path](const guestproto::ExecExit& exit, Call& c) {
      if (exit.code != 0 || !exit.error.empty()) {
        return Reply::fail(kFileFailed, serviceError(c, exit, "list " + p));
      }
      Json files = Json::parse(c.out, nullptr, false);
      if (!files.is_array()) {
        return Reply::fail(kFileFailed, fmt::format("list {}: the guest sent no listing", p));
      }
      return Reply::ok(Json{{"files", std::move(files)}});
    });
  }

  // ---- log, log_stream --------------------------------------------------------------------

  std::string logPath() const { return vm_ ? supervisor::mainLogPath(vm_->run_dir) : last_log_; }

  Reply log(const Json& /*id*/, const Json& /*params*/) {
    std::string path = logPath();
    if (path.empty()) {
      return Reply::fail(kVmFailed, "no sandbox: call create first");
    }
    auto text = ::matchlock::readFile(path);
    if (!text && text.error().code() != Errc::NotFound) {
      return Reply::fail(kFileFailed, text.error().message());
    }
    return Reply::ok(Json{{"content", base64Encode(text ? *text : std::string())}});
  }

  Reply logStream(const Json& id, const Json& /*params*/) {
    std::string path = logPath();
    if (path.empty()) {
      return Reply::fail(kVmFailed, "no sandbox: call create first");
    }
    auto call = std::make_shared<Call>();
    call->id = id;
    call->kind = CallKind::LogStream;
    call->path = path;
    Call* raw = call.get();
    auto timer = loop_.timer([this, raw] { pollLog(*raw); });
    if (!timer) {
      return Reply::fail(kFileFailed, timer.error().message());
    }
    call->timer = std::move(*timer);
    if (Status st = call->timer.arm(std::chrono::milliseconds(1), kTailInterval); !st) {
      return Reply::fail(kFileFailed, st.error().message());
    }
    calls_[idKey(id)] = std::move(call);
    return Reply::later();
  }

  void pollLog(Call& c) {
    if (output_paused_ || c.finished) {
      return;
    }
    std::string fresh = readTail(c.path, c.offset, kTailChunk);
    if (!fresh.empty()) {
      notify("log_stream.data", c.id, fresh);
    }
  }

  // ---- Events -----------------------------------------------------------------------------

  void tailEvents() {
    if (!vm_ || output_paused_) {
      return;
    }
    Sandbox& s = *vm_;
    size_t before = s.events_offset;
    std::string fresh = readTail(s.events_path, s.events_offset, kTailChunk);
    if (s.events_offset < before) {
      s.events_partial.clear();  // rotated: a new file
    }
    s.events_partial += fresh;
    if (s.events_partial.size() > kTailChunk) {
      s.events_partial.clear();  // no line is that long: not an event log
    }
    size_t nl = 0;
    while ((nl = s.events_partial.find('\n')) != std::string::npos) {
      Json ev = Json::parse(std::string_view(s.events_partial).substr(0, nl), nullptr, false);
      s.events_partial.erase(0, nl + 1);
      if (ev.is_object()) {
        send(notificationLine("event", ev));
      }
    }
  }

  // ---- allow_list_add / allow_list_delete -------------------------------------------------

  Reply allowList(const Json& /*id*/, const Json& params) {
    auto vm = current();
    if (!vm) {
      return Reply::fail(kVmFailed, vm.error().message());
    }
    auto hosts = hostsParam(params);
    if (!hosts) {
      return Reply::fail(kInvalidParams,
                         fmt::format("Invalid params: {}", hosts.error().message()));
    }
    const bool add = method_ == "allow_list_add";
    Json req = {{"op", "allow_list"}, {"action", add ? "add" : "delete"}, {"hosts", *hosts}};
    auto line = runtime::controlRequestLine((*vm)->control, req.dump());
    if (!line) {
      return Reply::fail(kVmFailed, fmt::format("allow-list: {}", line.error().message()));
    }
    Json reply = Json::parse(*line, nullptr, false);
    if (!reply.is_object() || !reply.value("ok", false)) {
      return Reply::fail(kVmFailed, reply.is_object() ? reply.value("error", "allow-list failed")
                                                      : std::string("allow-list failed"));
    }
    const char* key = add ? "added" : "removed";
    return Reply::ok(Json{{key, reply.value(key, Json::array())},
                          {"allowed_hosts", reply.value("allow_hosts", Json::array())}});
  }

  // ---- port_forward -----------------------------------------------------------------------

  Reply portForward(const Json& /*id*/, const Json& params) {
    auto vm = current();
    if (!vm) {
      return Reply::fail(kVmFailed, vm.error().message());
    }
    auto forwards = params.find("forwards");
    if (forwards == params.end() || !forwards->is_array() || forwards->empty()) {
      return Reply::fail(kInvalidParams, "Invalid params: forwards must be a non-empty array");
    }
    std::vector<std::string> addresses = {"127.0.0.1"};
    if (auto a = params.find("addresses"); a != params.end() && !a->is_null()) {
      if (!a->is_array() || a->empty()) {
        return Reply::fail(kInvalidParams, "Invalid params: addresses must be a non-empty array");
      }
      addresses.clear();
      for (const Json& x : *a) {
        if (!x.is_string() || x.get<std::string>().empty()) {
          return Reply::fail(kInvalidParams, "Invalid params: addresses must be strings");
        }
        addresses.push_back(x.get<std::string>());
      }
    }
    std::vector<runtime::ForwardBinding> bindings;
    for (const Json& f : *forwards) {
      if (!f.is_object()) {
        return Reply::fail(kInvalidParams, "Invalid params: forwards entries must be objects");
      }
      auto local = intParam(f, "local_port", 0, 0, 65535);
      auto remote = intParam(f, "remote_port", 0, 1, 65535);
      if (!local || !remote || *remote == 0) {
        return Reply::fail(kInvalidParams,
                           "Invalid params: forwards need remote_port 1-65535 and local_port "
                           "0-65535");
      }
      for (const std::string& addr : addresses) {
        bindings.push_back({addr, static_cast<uint16_t>(*local), static_cast<uint16_t>(*remote)});
      }
    }
    forwarder_.reset();  // replaces the previous set
    auto fw = runtime::PortForwarder::start(loop_, (*vm)->control, bindings);
    if (!fw) {
      return Reply::fail(kVmFailed,
                         fmt::format("sandbox {}: {}", (*vm)->record.id, fw.error().message()));
    }
    forwarder_ = std::move(*fw);
    Json out = Json::array();
    for (const auto& b : forwarder_->bindings()) {
      out.push_back(
          {{"address", b.address}, {"local_port", b.local_port}, {"remote_port", b.remote_port}});
    }
    return Reply::ok(Json{{"bindings", out}});
  }

  // ---- cancel, close ----------------------------------------------------------------------

  Reply cancel(const Json& /*id*/, const Json& params) {
    auto target = params.find("id");
    if (target == params.end() || target->is_null()) {
      return Reply::fail(kInvalidParams, "Invalid params: id is required");
    }
    if (calls_.count(idKey(*target)) == 0) {
      return Reply::ok(Json{{"cancelled", false}});
    }
    finishCall(*target, Reply::fail(kCancelled, "request cancelled"));
    return Reply::ok(Json{{"cancelled", true}});
  }

  Reply close(const Json& /*id*/, const Json& params) {
    double timeout = 0;
    if (auto t = params.find("timeout_seconds"); t != params.end() && !t->is_null()) {
      if (!t->is_number() || t->get<double>() < 0) {
        return Reply::fail(kInvalidParams, "Invalid params: timeout_seconds must be >= 0");
      }
      timeout = t->get<double>();
    }
    cancelAll();
    forwarder_.reset();
    closed_ = true;
    if (vm_) {
      dropSandbox(/*remove_record=*/false,
                  std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000)));
    }
    // The loop ends once this reply is written (flush()).
    loop_.post([this] { flush(); });
    return Reply::ok(Json::object());
  }

  /// Stops the current sandbox: a clean guest power-off within `grace` (0: kill at once), then
  /// optionally removes it (run dir, network, subnet, record).
  void dropSandbox(bool remove_record, std::chrono::milliseconds grace) {
    if (!vm_) {
      return;
    }
    Sandbox& s = *vm_;
    last_log_ = supervisor::mainLogPath(s.run_dir);
    if (auto st = state::Store::openDefault(); st) {
      auto rec = st->getSandbox(s.record.id);
      if (rec) {
        if (grace.count() == 0) {
          runtime::killProcesses(*st, *rec);
          (void)st->updateSandboxStatus(rec->id, state::SandboxStatus::Stopped, std::nullopt);
        } else {
          runtime::stop(*st, *rec, s.run_root);
        }
        if (remove_record) {
          if (Status r = runtime::remove(*st, *rec, s.run_root, false); !r) {
            ML_LOG(rpc, warn, "removing sandbox {}: {}", rec->id, r.error().message());
          }
          last_log_.clear();
        }
      }
    }
    vm_.reset();
  }

  // ---- create -----------------------------------------------------------------------------

  Reply create(const Json& /*id*/, const Json& params) {
    // As upstream, create first ends what is in flight; unlike upstream, the previous sandbox
    // is stopped rather than left running unowned.
    cancelAll();
    forwarder_.reset();
    if (vm_) {
      dropSandbox(/*remove_record=*/!vm_->keep, std::chrono::seconds(2));
    }
    auto decoded = decodeCreateParams(params, runtime::newSandboxId());
    if (!decoded) {
      return Reply::fail(kInvalidParams, decoded.error().message());
    }
    auto& [sb, id, keep, launch_entrypoint, workspace] = *decoded;
    auto created = launchSandbox(sb, id, keep, launch_entrypoint, workspace);
    if (!created) {
      return Reply::fail(kVmFailed, created.error().message());
    }
    return Reply::ok(Json{{"id", id}});
  }

  Status launchSandbox(spec::SandboxSpec& sb, const std::string& id, bool keep,
                       bool launch_entrypoint, const std::string& workspace) {
    ML_ASSIGN_OR_RETURN(std::string image_root, image::Store::defaultRoot());
    ML_ASSIGN_OR_RETURN(auto image_store, image::Store::open(image_root));
    ML_ASSIGN_OR_RETURN(auto prepared, image::prepareImage(image_store, sb.image, {}));
    ML_ASSIGN_OR_RETURN(runtime::BootAssets assets, runtime::resolveBootAssets(opt_.accel));
    if (sb.hostname.empty()) {
      sb.hostname = id;
    }
    // The supervisor runs the entrypoint (once, output in main.log) only when asked for.
    if (launch_entrypoint) {
      std::vector<std::string> ep = sb.entrypoint.value_or(prepared.config.entrypoint);
      std::vector<std::string> cmd = sb.command.value_or(prepared.config.cmd);
      if (ep.empty() && cmd.empty()) {
        sb.entrypoint.reset();
        sb.command.reset();
      } else {
        sb.entrypoint = ep;
        sb.command = cmd;
      }
    } else {
      sb.entrypoint.reset();
      sb.command.reset();
    }
    sb.restart = spec::RestartPolicy::No;

    ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
    ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
    runtime::LaunchOptions lo;
    lo.project = runtime::kAdhocProject;
    lo.id = id;
    lo.image_digest = prepared.record.manifest_digest;
    if (!keep) {
      ML_ASSIGN_OR_RETURN(lo.owner, sys::processRef(::getpid()));
    }
    ML_RETURN_IF_ERROR(runtime::launch(store, sb, prepared, assets, lo));
    auto fail = [&](Error e) -> Status {
      if (auto rec = store.getSandbox(id); rec) {
        runtime::stop(store, *rec, root);
        (void)runtime::remove(store, *rec, root, false);
      }
      return makeError(std::move(e));
    };
    if (Status st = runtime::waitReady(store, id, lo.boot_timeout + std::chrono::seconds(5)); !st) {
      return fail(std::move(st).error());
    }
    if (sb.entrypoint || sb.command) {
      if (Status st = checkEntrypoint(store, id); !st) {
        return fail(std::move(st).error());
      }
    }
    ML_ASSIGN_OR_RETURN(auto record, store.getSandbox(id));
    ML_ASSIGN_OR_RETURN(std::string home, matchlockHome());
    auto s = std::make_unique<Sandbox>();
    s->record = record;
    s->run_root = root;
    s->run_dir = runtime::runDirOf(root, id);
    s->control = supervisor::controlSocketPath(s->run_dir);
    s->workspace = workspace;
    s->keep = keep;
    s->defaults = runtime::execDefaults(record);
    s->events_path = supervisor::eventsPath(home, id);
    vm_ = std::move(s);
    return ok();
  }

  /// A launched entrypoint that exits non-zero within kEntrypointGrace of its start fails
  /// `create`, as upstream (its output is in the log).
  static Status checkEntrypoint(state::Store& store, const std::string& id) {
    auto deadline = Clock::now() + std::chrono::seconds(10);
    std::optional<Clock::time_point> started;
    while (Clock::now() < deadline) {
      state::EventFilter f;
      f.sandbox_id = id;
      f.limit = 1000;
      ML_ASSIGN_OR_RETURN(auto events, store.listEvents(f));
      for (const auto& e : events) {
        if (e.kind == "main.started" && !started) {
          started = Clock::now();
        }
        if (e.kind == "main.exited") {
          Json d = Json::parse(e.data_json, nullptr, false);
          int code = d.is_object() ? d.value("code", 0) : 0;
          if (code != 0) {
            return makeError(Errc::Unavailable,
                             fmt::format("sandbox {}: the entrypoint exited with code {} (see "
                                         "`log`)",
                                         id, code));
          }
          return ok();
        }
      }
      if (started && Clock::now() - *started >= kEntrypointGrace) {
        return ok();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return ok();
  }

  ev::Loop& loop_;
  ServerOptions opt_;
  LineReader reader_{kMaxLine};
  ev::Watch in_watch_;
  ev::Watch out_watch_;
  ev::Timer events_timer_;
  std::string out_;
  size_t out_off_ = 0;  ///< bytes of out_ already written
  bool output_paused_ = false;
  bool transport_lost_ = false;
  bool closed_ = false;
  std::string method_;
  std::vector<std::pair<int, int>> saved_flags_;  ///< stdio fd -> its flags before start()
  std::map<std::string, std::shared_ptr<Call>> calls_;
  std::unique_ptr<Sandbox> vm_;
  std::string last_log_;
  std::unique_ptr<runtime::PortForwarder> forwarder_;
};

}  // namespace

Status serve(const ServerOptions& options) {
  (void)std::signal(SIGPIPE, SIG_IGN);
  ML_ASSIGN_OR_RETURN(auto loop, ev::Loop::create());
  Server server(*loop, options);
  ML_RETURN_IF_ERROR(server.start());
  Status st = loop->run();
  server.shutdown();
  return st;
}

}  // namespace matchlock::rpc
