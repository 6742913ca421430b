// SPDX-License-Identifier: Apache-2.0
// `rpc`, `cp` and `port-forward`: the SDK surface and the CLI commands that reach into a running
// sandbox through its guest services (docs/rpc.md).
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <csignal>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "common/fd.h"
#include "common/strings.h"
#include "ev/loop.h"
#include "rpc/server.h"
#include "runtime/exec_channel.h"
#include "runtime/exec_client.h"
#include "runtime/port_forward.h"
#include "runtime/sandbox.h"
#include "state/store.h"
#include "supervisor/supervisor.h"
#include "sys/socket_util.h"

namespace matchlock::cli {
namespace {

namespace fs = std::filesystem;

/// The control socket of a recorded sandbox (`ref`: id, project/name or name).
Result<std::pair<std::string, std::string>> controlOf(const std::string& ref) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_ASSIGN_OR_RETURN(auto rec, runtime::findSandbox(store, ref));
  ML_ASSIGN_OR_RETURN(std::string root, runtime::runRoot());
  return std::pair{rec.id, supervisor::controlSocketPath(runtime::runDirOf(root, rec.id))};
}

/// `ID:/path` (ID: an id, project/name or name) or a host path. As docker cp: a path starting
/// with `/` or `.` is always the host's, so a host path holding ':' is written `./a:b`.
struct CpEnd {
  std::string sandbox;
  std::string path;
};
CpEnd parseCpEnd(const std::string& arg) {
  size_t colon = arg.find(':');
  if (colon == std::string::npos || colon == 0 || arg[0] == '/' || arg[0] == '.') {
    return {"", arg};
  }
  return {arg.substr(0, colon), arg.substr(colon + 1)};
}

std::string serviceFailure(const std::string& id, const runtime::ServiceResult& r,
                           std::string_view what) {
  std::string err(trim(r.err));
  if (!r.exit.error.empty()) {
    err = r.exit.error;
  }
  return fmt::format("sandbox {}: {}", id, err.empty() ? std::string(what) + " failed" : err);
}

/// `cp SRC DST`: one file, host to sandbox or sandbox to host (docker cp's `ID:/path` habit).
/// The copy is streamed; a guest→host copy lands in a temporary file renamed into place, so a
/// failed copy never leaves a half-written destination.
Status cpCommand(const std::string& src_arg, const std::string& dst_arg) {
  CpEnd src = parseCpEnd(src_arg);
  CpEnd dst = parseCpEnd(dst_arg);
  if (src.sandbox.empty() == dst.sandbox.empty()) {
    return makeError(Errc::InvalidSpec,
                     "cp: exactly one of SRC and DST must be a sandbox path (ID:/path)");
  }
  const CpEnd& guest = src.sandbox.empty() ? dst : src;
  if (guest.path.empty() || guest.path[0] != '/') {
    return makeError(Errc::InvalidSpec,
                     fmt::format("cp: {}: the sandbox path must be absolute", guest.path));
  }
  ML_ASSIGN_OR_RETURN(auto control, controlOf(guest.sandbox));
  const std::string& id = control.first;  // named: clang-14 cannot capture bindings
  const std::string& socket = control.second;
  constexpr auto kTimeout = std::chrono::minutes(10);
  if (!dst.sandbox.empty()) {
    // Host -> sandbox.
    std::error_code ec;
    if (fs::is_directory(src.path, ec)) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("cp: {} is a directory (only files are copied)", src.path));
    }
    Fd in(::open(src.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!in) {
      return makeError(Errc::NotFound, fmt::format("cp: {}", src.path), errno);
    }
    struct stat st {};
    if (::fstat(in.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
      return makeError(Errc::InvalidSpec, fmt::format("cp: {} is not a regular file", src.path));
    }
    std::string target = dst.path;
    if (target.back() == '/') {
      target += fs::path(src.path).filename().string();
    }
    nlohmann::json req = {{"op", "write"}, {"path", target}, {"mode", st.st_mode & 07777}};
    ML_ASSIGN_OR_RETURN(auto r,
                        runtime::callService(
                            socket, req.dump(), in.get(), [](std::string_view) {}, kTimeout));
    if (r.exit.code != 0 || !r.exit.error.empty()) {
      return makeError(Errc::Unavailable, serviceFailure(id, r, "write " + target));
    }
    return ok();
  }
  // Sandbox -> host.
  std::string target = dst.path;
  std::error_code ec;
  if (fs::is_directory(target, ec)) {
    target = (fs::path(target) / fs::path(src.path).filename()).string();
  }
  std::string partial = target + ".matchlock-partial";
  Fd out(::open(partial.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!out) {
    return makeError(Errc::System, fmt::format("cp: {}", partial), errno);
  }
  int fd = out.get();
  std::optional<Error> write_error;
  nlohmann::json req = {{"op", "read"}, {"path", src.path}, {"max_bytes", uint64_t{1} << 40}};
  auto r = runtime::callService(
      socket, req.dump(), -1,
      [fd, &write_error, &partial](std::string_view data) {
        if (!write_error && !writeAll(fd, data)) {
          write_error = Error(Errc::System, fmt::format("cp: writing {}", partial), errno);
        }
      },
      kTimeout);
  out.reset();
  auto fail = [&](Error e) -> Status {
    ::unlink(partial.c_str());
    return makeError(std::move(e));
  };
  if (!r) {
    return fail(std::move(r).error());
  }
  if (write_error) {
    return fail(std::move(*write_error));
  }
  if (r->exit.code != 0 || !r->exit.error.empty()) {
    return fail(Error(Errc::Unavailable, serviceFailure(id, *r, "read " + src.path)));
  }
  if (::rename(partial.c_str(), target.c_str()) != 0) {
    return fail(Error(Errc::System, fmt::format("cp: {}", target), errno));
  }
  return ok();
}

/// `port-forward ID [LOCAL:]REMOTE... [--address A]`: host listeners relayed to the guest's
/// 127.0.0.1:REMOTE until SIGINT or SIGTERM.
Status portForwardCommand(const std::string& ref, const std::vector<std::string>& specs,
                          const std::vector<std::string>& address_args) {
  ML_ASSIGN_OR_RETURN(auto published, parsePublished("port-forward", specs, address_args, false));
  std::vector<runtime::ForwardBinding> bindings;
  for (const auto& p : published) {
    bindings.push_back({p.address, p.local, p.remote});
  }
  ML_ASSIGN_OR_RETURN(auto control, controlOf(ref));
  const std::string& id = control.first;  // named: clang-14 cannot capture bindings
  const std::string& socket = control.second;
  if (auto st = runtime::controlRequest(socket, "status", 3000); !st) {
    return makeError(Errc::Unavailable, fmt::format("sandbox {} is not running", id));
  }
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  if (::sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) {
    return makeError(Errc::System, "sigprocmask", errno);
  }
  Fd sfd(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sfd) {
    return makeError(Errc::System, "signalfd", errno);
  }
  ML_ASSIGN_OR_RETURN(auto loop, ev::Loop::create());
  ML_ASSIGN_OR_RETURN(auto fw, runtime::PortForwarder::start(*loop, socket, bindings));
  for (const auto& b : fw->bindings()) {
    fmt::print(stderr, "Forwarding {}:{} -> {}\n", b.address, b.local_port, b.remote_port);
  }
  ML_ASSIGN_OR_RETURN(auto watch,
                      loop->watch(sfd.get(), ev::kRead, [&](uint32_t) { loop->stop(); }));
  // The sandbox going away ends the command too.
  ML_ASSIGN_OR_RETURN(auto check, loop->timer([&] {
    if (!runtime::controlRequest(socket, "status", 3000)) {
      fmt::print(stderr, "sandbox {} stopped\n", id);
      loop->stop();
    }
  }));
  ML_RETURN_IF_ERROR(check.arm(std::chrono::seconds(2), std::chrono::seconds(2)));
  return loop->run();
}

}  // namespace

void addRpcCommands(CLI::App& app, CommandContext& ctx) {
  auto accel = std::make_shared<std::string>("auto");
  auto* r = app.add_subcommand("rpc",
                               "Serve upstream matchlock's JSON-RPC 2.0 on stdin/stdout (for the "
                               "SDKs)");
  r->add_option("--accel", *accel, "kvm, tcg or auto (MATCHLOCK_ACCEL)")
      ->check(CLI::IsMember({"kvm", "tcg", "auto"}));
  r->callback([accel, &ctx] {
    rpc::ServerOptions o;
    o.accel = *accel;
    ctx.finish(rpc::serve(o));
  });

  auto cp_src = std::make_shared<std::string>();
  auto cp_dst = std::make_shared<std::string>();
  auto* cp = app.add_subcommand("cp", "Copy a file between the host and a sandbox (ID:/path)");
  cp->add_option("src", *cp_src, "Source: a host path or ID:/path")->required();
  cp->add_option("dst", *cp_dst, "Destination: a host path or ID:/path")->required();
  cp->callback([cp_src, cp_dst, &ctx] { ctx.finish(cpCommand(*cp_src, *cp_dst)); });

  auto pf_id = std::make_shared<std::string>();
  auto pf_specs = std::make_shared<std::vector<std::string>>();
  auto pf_addresses = std::make_shared<std::vector<std::string>>();
  auto* pf = app.add_subcommand("port-forward",
                                "Forward host ports to the sandbox's 127.0.0.1 until interrupted");
  pf->add_option("id", *pf_id, "Sandbox ID, project/name or name")->required();
  pf->add_option("ports", *pf_specs, "[LOCAL:]REMOTE (repeatable)")->required();
  pf->add_option("--address", *pf_addresses,
                 "Host address to listen on (repeatable, comma lists; default 127.0.0.1)")
      ->allow_extra_args(false);
  pf->callback([pf_id, pf_specs, pf_addresses, &ctx] {
    ctx.finish(portForwardCommand(*pf_id, *pf_specs, *pf_addresses));
  });
}

Result<std::vector<PublishedPort>> parsePublished(std::string_view flag,
                                                  const std::vector<std::string>& specs,
                                                  const std::vector<std::string>& address_args,
                                                  bool dedupe_addresses) {
  std::vector<std::string> addresses;
  for (const std::string& a : address_args) {
    for (const std::string& x : split(a, ',')) {
      std::string addr(trim(x));
      if (addr.empty()) {
        continue;
      }
      auto parsed = sys::SockAddr::parse(addr == "localhost" ? "127.0.0.1" : addr);
      if (!parsed) {
        return makeError(
            Errc::InvalidSpec,
            fmt::format("{}: --address {}: not an IP address or 'localhost'", flag, addr));
      }
      std::string norm = parsed->ip();
      if (std::find(addresses.begin(), addresses.end(), norm) != addresses.end()) {
        if (dedupe_addresses) {
          continue;
        }
        return makeError(Errc::InvalidSpec,
                         fmt::format("{}: --address {} given twice", flag, addr));
      }
      addresses.push_back(norm);
    }
  }
  if (addresses.empty()) {
    addresses.emplace_back("127.0.0.1");
  }
  std::vector<PublishedPort> out;
  for (const std::string& arg : specs) {
    auto port = [&](std::string_view s) -> Result<uint16_t> {
      int v = 0;
      auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
      if (ec != std::errc() || end != s.data() + s.size() || v < 1 || v > 65535) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("{} {}: ports must be 1-65535 ([LOCAL:]REMOTE)", flag, arg));
      }
      return static_cast<uint16_t>(v);
    };
    size_t colon = arg.find(':');
    uint16_t local = 0;
    uint16_t remote = 0;
    if (colon == std::string::npos) {
      ML_ASSIGN_OR_RETURN(local, port(arg));
      remote = local;
    } else {
      ML_ASSIGN_OR_RETURN(local, port(std::string_view(arg).substr(0, colon)));
      ML_ASSIGN_OR_RETURN(remote, port(std::string_view(arg).substr(colon + 1)));
    }
    for (const std::string& addr : addresses) {
      bool taken = std::any_of(out.begin(), out.end(), [&](const PublishedPort& p) {
        return p.address == addr && p.local == local;
      });
      if (taken) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("{}: host port {}:{} is published twice", flag, addr, local));
      }
      out.push_back({addr, local, remote});
    }
  }
  return out;
}

}  // namespace matchlock::cli
