// SPDX-License-Identifier: Apache-2.0
#include "runtime/secrets.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/random.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>

#include "common/fd.h"
#include "common/paths.h"
#include "common/sha256.h"
#include "sys/process.h"

namespace matchlock::runtime {
namespace {

constexpr std::chrono::seconds kCommandBound{10};

/// Runs a secret's command and returns its stdout (without the trailing newline). The output
/// goes through a pipe, never a file.
Result<std::string> runSecretCommand(const spec::SecretRef& s) {
  ML_ASSIGN_OR_RETURN(Pipe pipe, Pipe::create());
  sys::SpawnOptions opts;
  opts.inherit_fds = {pipe.write.get()};
  opts.stdout_path = fmt::format("/dev/fd/{}", pipe.write.get());
  ML_ASSIGN_OR_RETURN(auto child, sys::ChildProcess::spawn(s.command, opts));
  pipe.write = Fd();
  std::string out;
  auto deadline = std::chrono::steady_clock::now() + kCommandBound;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd p{pipe.read.get(), POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) {
      (void)child.terminate(std::chrono::milliseconds(0));
      return makeError(Errc::Unavailable,
                       fmt::format("secret {}: command did not finish within {} s", s.name,
                                   kCommandBound.count()));
    }
    char buf[4096];
    ssize_t n = ::read(pipe.read.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      break;
    }
    out.append(buf, static_cast<size_t>(n));
  }
  ML_ASSIGN_OR_RETURN(auto exit, child.waitFor(std::chrono::seconds(2)));
  if (!exit || exit->code != 0) {
    (void)child.terminate(std::chrono::milliseconds(0));
    return makeError(Errc::Unavailable, fmt::format("secret {}: command failed (exit {})", s.name,
                                                    exit ? exit->code : -1));
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) {
    out.pop_back();
  }
  return out;
}

}  // namespace

Result<std::map<std::string, std::string>> resolveSecretValues(const spec::SandboxSpec& spec) {
  std::map<std::string, std::string> values;
  for (const auto& s : spec.secrets) {
    switch (s.kind) {
      case spec::SecretRef::Kind::Env: {
        const char* v = std::getenv(s.env_var.c_str());
        if (v == nullptr) {
          return makeError(
              Errc::InvalidSpec,
              fmt::format("secret {}: environment variable {} is not set", s.name, s.env_var));
        }
        values[s.name] = v;
        break;
      }
      case spec::SecretRef::Kind::File: {
        auto text = readFile(s.file);
        if (!text) {
          return makeError(std::move(text).error().withContext(
              fmt::format("secret {}: reading {}", s.name, s.file)));
        }
        std::string v = std::move(*text);
        while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) {
          v.pop_back();
        }
        values[s.name] = std::move(v);
        break;
      }
      case spec::SecretRef::Kind::Command: {
        ML_ASSIGN_OR_RETURN(values[s.name], runSecretCommand(s));
        break;
      }
      case spec::SecretRef::Kind::Inline:
        values[s.name] = s.inline_value;
        break;
    }
  }
  return values;
}

Result<std::optional<std::string>> secretsHash(const std::map<std::string, std::string>& values,
                                               bool create_key) {
  if (values.empty()) {
    return std::optional<std::string>();
  }
  ML_ASSIGN_OR_RETURN(std::string home, matchlockHome());
  const std::string path = home + "/secrets.key";
  auto key = readFile(path);
  if (!key && key.error().code() == Errc::NotFound) {
    if (!create_key) {
      return std::optional<std::string>();
    }
    std::string fresh(32, '\0');
    if (::getrandom(fresh.data(), fresh.size(), 0) != static_cast<ssize_t>(fresh.size())) {
      return makeError(Errc::System, "getrandom", errno);
    }
    ML_RETURN_IF_ERROR(makeDirs(home, 0700));
    // Written in full under a private name, then link()ed into place: link never replaces, so of
    // two racing creators exactly one key wins, and nobody ever reads a half-written one.
    const std::string tmp = fmt::format("{}.{}.tmp", path, ::getpid());
    ML_RETURN_IF_ERROR(writeFileAtomic(tmp, fresh, 0600));
    int linked = ::link(tmp.c_str(), path.c_str());
    int link_errno = errno;
    (void)::unlink(tmp.c_str());
    if (linked != 0 && link_errno != EEXIST) {
      return makeError(Errc::System, fmt::format("creating {}", path), link_errno);
    }
    key = readFile(path);
  }
  if (!key) {
    return makeError(std::move(key).error());
  }
  // Length-prefixed so that no two different (name, value) lists encode alike.
  std::string data;
  for (const auto& [name, value] : values) {
    data += fmt::format("{}:{}{}:{}", name.size(), name, value.size(), value);
  }
  return std::optional<std::string>(hmacSha256Hex(*key, data));
}

}  // namespace matchlock::runtime
