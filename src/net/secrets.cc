// SPDX-License-Identifier: Apache-2.0
#include "net/secrets.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/rand.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "common/fd.h"
#include "common/strings.h"
#include "common/wipe.h"
#include "net/policy.h"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace matchlock::net {

namespace {

constexpr std::string_view kPlaceholderPrefix = "SANDBOX_SECRET_";
constexpr int kCommandTimeoutMs = 10000;
constexpr size_t kMaxSecretBytes = 1 << 20;

/// RFC 3986 percent-encoding of everything but unreserved characters: the value must reach the
/// server intact through its query parser ("a+b&c" would otherwise change meaning).
std::string percentEncode(std::string_view value) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(value.size() * 3);  // never reallocated, so no partial copy is left behind
  for (char c : value) {
    auto u = static_cast<unsigned char>(c);
    if ((u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || (u >= '0' && u <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~') {
      out += c;
    } else {
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 0xf];
    }
  }
  return out;
}

/// Replaces every `from` in `*s` with `to`. The result is built in a buffer of its final size
/// and the old one wiped, so no copy of a value is left behind by a reallocation.
size_t replaceAll(std::string* s, std::string_view from, std::string_view to) {
  size_t count = 0;
  for (size_t pos = 0; (pos = s->find(from, pos)) != std::string::npos; pos += from.size()) {
    ++count;
  }
  if (count == 0) {
    return 0;
  }
  std::string out;
  out.reserve(s->size() - count * from.size() + count * to.size());
  size_t start = 0;
  for (size_t pos = 0; (pos = s->find(from, start)) != std::string::npos;
       start = pos + from.size()) {
    out.append(*s, start, pos - start);
    out.append(to);
  }
  out.append(*s, start, std::string::npos);
  wipe(*s);
  s->swap(out);
  return count;
}

Result<std::string> runCommand(const spec::SecretRef& ref) {
  if (ref.command.empty()) {
    return makeError(Errc::InvalidSpec, fmt::format("secret {}: empty command", ref.name));
  }
  ML_ASSIGN_OR_RETURN(Pipe out, Pipe::create());
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out.write.get(), STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  std::vector<char*> argv;
  std::vector<std::string> args = ref.command;
  argv.reserve(args.size() + 1);
  for (std::string& a : args) {
    argv.push_back(a.data());
  }
  argv.push_back(nullptr);
  pid_t pid = 0;
  int rc = ::posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  out.write.reset();
  if (rc != 0) {
    return makeError(Errc::InvalidSpec, fmt::format("secret {}: running its command", ref.name),
                     rc);
  }
  std::string value;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kCommandTimeoutMs);
  bool timed_out = false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    pollfd pfd{out.read.get(), POLLIN, 0};
    int n = ::poll(&pfd, 1, static_cast<int>(left));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      timed_out = n == 0;
      break;
    }
    char buf[4096];
    ssize_t r = ::read(out.read.get(), buf, sizeof(buf));
    if (r <= 0) {
      break;
    }
    wipeAppend(value, std::string_view(buf, static_cast<size_t>(r)));
    wipe(buf, sizeof(buf));
    if (value.size() > kMaxSecretBytes) {
      timed_out = true;
      break;
    }
  }
  if (timed_out) {
    ::kill(pid, SIGKILL);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) {
    wipe(value);
    return makeError(Errc::Unavailable,
                     fmt::format("secret {}: command timed out or produced too much", ref.name));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    wipe(value);
    return makeError(Errc::Unavailable, fmt::format("secret {}: command failed", ref.name));
  }
  if (value.ends_with('\n')) {
    value.pop_back();
    if (value.ends_with('\r')) {
      value.pop_back();
    }
  }
  return value;
}

}  // namespace

Secret::Secret(Secret&& other) noexcept
    : name(std::move(other.name)),
      placeholder(std::move(other.placeholder)),
      value(std::move(other.value)),
      hosts(std::move(other.hosts)) {
  wipe(other.value);  // a short value is copied, not stolen: its bytes stay in `other`
}

Secret& Secret::operator=(Secret&& other) noexcept {
  if (this != &other) {
    wipe(value);
    name = std::move(other.name);
    placeholder = std::move(other.placeholder);
    value = std::move(other.value);
    hosts = std::move(other.hosts);
    wipe(other.value);
  }
  return *this;
}

Secret::~Secret() {
  wipe(value);
}

std::string generatePlaceholder() {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) {
    // RAND_bytes failing means the CSPRNG is unusable; never fall back to a weak source.
    std::abort();
  }
  return std::string(kPlaceholderPrefix) +
         toHex(std::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

Result<Secret> loadSecret(const spec::SecretRef& ref) {
  Secret s;
  s.name = ref.name;
  s.hosts = ref.hosts;
  s.placeholder = ref.placeholder.empty() ? generatePlaceholder() : ref.placeholder;
  switch (ref.kind) {
    case spec::SecretRef::Kind::Env: {
      // Secrets are loaded before the proxy threads start.
      const char* v = std::getenv(ref.env_var.c_str());  // NOLINT(concurrency-mt-unsafe)
      if (v == nullptr) {
        return makeError(Errc::NotFound, fmt::format("secret {}: environment variable {} is not "
                                                     "set (with sudo, use sudo -E)",
                                                     ref.name, ref.env_var));
      }
      s.value = v;
      break;
    }
    case spec::SecretRef::Kind::File: {
      auto content = readFile(ref.file);
      if (!content) {
        return makeError(content.error().code(),
                         fmt::format("secret {}: reading {}", ref.name, ref.file),
                         content.error().sysErrno());
      }
      s.value = std::move(*content);
      if (s.value.ends_with('\n')) {
        s.value.pop_back();
      }
      break;
    }
    case spec::SecretRef::Kind::Command: {
      ML_ASSIGN_OR_RETURN(s.value, runCommand(ref));
      break;
    }
    case spec::SecretRef::Kind::Inline:
      s.value = ref.inline_value;
      break;
  }
  if (s.value.empty()) {
    return makeError(Errc::InvalidSpec, fmt::format("secret {}: empty value", ref.name));
  }
  for (char c : s.value) {
    auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\t') || u == 0x7f) {
      // It is injected into header values: a line break would let it forge headers.
      return makeError(Errc::InvalidSpec,
                       fmt::format("secret {}: value contains control characters", ref.name));
    }
  }
  return s;
}

SubstitutionResult SecretSet::apply(http::Head* head, std::string_view host) const {
  SubstitutionResult result;
  // Decide first, then mutate, so that a blocked request is left untouched.
  std::vector<const Secret*> to_apply;
  for (const Secret& s : secrets_) {
    bool present = head->target.find(s.placeholder) != std::string::npos ||
                   std::any_of(head->headers.begin(), head->headers.end(), [&](const auto& h) {
                     return h.value.find(s.placeholder) != std::string::npos;
                   });
    if (!present) {
      continue;
    }
    bool host_ok = s.hosts.empty() || std::any_of(s.hosts.begin(), s.hosts.end(), [&](auto& p) {
                     return matchHostPattern(p, host);
                   });
    if (!host_ok) {
      result.blocked = true;
      result.reason = "secret placeholder sent to unauthorized host";
      result.secret_name = s.name;
      return result;
    }
    to_apply.push_back(&s);
  }
  for (const Secret* s : to_apply) {
    for (http::Header& h : head->headers) {
      result.replaced += static_cast<int>(replaceAll(&h.value, s->placeholder, s->value));
    }
    size_t q = head->target.find('?');
    if (q != std::string::npos) {
      std::string query = head->target.substr(q + 1);
      std::string encoded = percentEncode(s->value);
      result.replaced += static_cast<int>(replaceAll(&query, s->placeholder, encoded));
      head->target.resize(q + 1);
      wipeAppend(head->target, query);
      wipe(query);
      wipe(encoded);
    }
  }
  return result;
}

std::string SecretSet::redact(std::string_view text) const {
  std::string out(text);
  for (const Secret& s : secrets_) {
    if (!s.value.empty()) {
      replaceAll(&out, s.value, "[REDACTED:" + s.name + "]");
    }
  }
  return out;
}

}  // namespace matchlock::net
