// SPDX-License-Identifier: Apache-2.0
#include "sys/process.h"

#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include <catch2/catch.hpp>

#include "common/fd.h"

using matchlock::Errc;
using matchlock::Fd;
using matchlock::sys::ChildProcess;
using matchlock::sys::SpawnOptions;

namespace {

/// Forks an intermediate process that spawns `sleep 100` with `options` and reports its pid,
/// then waits to be killed. Returns {intermediate, sleeper}.
std::pair<pid_t, pid_t> spawnFromIntermediate(const SpawnOptions& options) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  pid_t mid = ::fork();
  REQUIRE(mid >= 0);
  if (mid == 0) {
    ::close(fds[0]);
    auto c = ChildProcess::spawn({"sleep", "100"}, options);
    pid_t pid = c ? c->pid() : -1;
    (void)!::write(fds[1], &pid, sizeof(pid));
    if (c) {
      c->detach();
    }
    ::pause();
    ::_exit(0);
  }
  ::close(fds[1]);
  pid_t sleeper = -1;
  REQUIRE(::read(fds[0], &sleeper, sizeof(sleeper)) == static_cast<ssize_t>(sizeof(sleeper)));
  ::close(fds[0]);
  REQUIRE(sleeper > 0);
  return {mid, sleeper};
}

/// True when `pid` exits (or is already gone) within `ms`.
bool exitsWithin(pid_t pid, int ms) {
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) {
    return true;  // already reaped
  }
  pollfd p{pidfd.get(), POLLIN, 0};
  return ::poll(&p, 1, ms) == 1;
}

}  // namespace

TEST_CASE("a child asked to die with its parent does, a plain one outlives it", "[sys]") {
  SpawnOptions with;
  with.parent_death_signal = SIGKILL;
  auto [mid, sleeper] = spawnFromIntermediate(with);
  REQUIRE(::kill(mid, SIGKILL) == 0);
  REQUIRE(::waitpid(mid, nullptr, 0) == mid);
  CHECK(exitsWithin(sleeper, 5000));

  auto [mid2, orphan] = spawnFromIntermediate(SpawnOptions{});
  REQUIRE(::kill(mid2, SIGKILL) == 0);
  REQUIRE(::waitpid(mid2, nullptr, 0) == mid2);
  CHECK_FALSE(exitsWithin(orphan, 300));
  ::kill(orphan, SIGKILL);
}

TEST_CASE("spawn sets up stdio, inherited fds and the environment", "[sys]") {
  char dir_tmpl[] = "/tmp/ml-process-test-XXXXXX";
  REQUIRE(::mkdtemp(dir_tmpl) != nullptr);
  const std::string out = std::string(dir_tmpl) + "/out";
  auto p = matchlock::Pipe::create();
  REQUIRE(p.has_value());
  SpawnOptions o;
  o.stdout_path = out;
  o.stderr_path = out;
  o.inherit_fds = {p->write.get()};
  o.env = std::vector<std::string>{"ONLY=this"};
  o.new_session = true;
  auto c = ChildProcess::spawn(
      {"/bin/sh", "-c",
       "echo \"$ONLY ${HOME:-nohome}\"; echo err >&2; echo via-fd >&" +
           std::to_string(p->write.get()) + "; echo $$; cut -d' ' -f6 /proc/$$/stat"},
      o);
  REQUIRE(c.has_value());
  p->write.reset();
  auto e = c->waitFor(std::chrono::seconds(10));
  REQUIRE(e.has_value());
  REQUIRE(e->has_value());
  CHECK((*e)->code == 0);
  auto text = matchlock::readFile(out);
  REQUIRE(text.has_value());
  CHECK(text->rfind("this nohome\nerr\n", 0) == 0);
  char buf[16] = {};
  CHECK(::read(p->read.get(), buf, sizeof(buf)) == 7);
  CHECK(std::string(buf) == "via-fd\n");
  // Its own session: the session id is its own pid.
  std::string rest = text->substr(std::string("this nohome\nerr\n").size());
  auto nl = rest.find('\n');
  REQUIRE(nl != std::string::npos);
  CHECK(rest.substr(0, nl + 1) == rest.substr(nl + 1));
  (void)::unlink(out.c_str());
  (void)::rmdir(dir_tmpl);
}

TEST_CASE("spawn reports a missing binary and a failed set-up as errors", "[sys]") {
  CHECK(ChildProcess::spawn({"definitely-not-a-binary-xyz"}).error().code() == Errc::NotFound);
  CHECK(ChildProcess::spawn({"/nonexistent/bin"}).error().code() == Errc::NotFound);
  SpawnOptions o;
  o.stdout_path = "/nonexistent-dir/out";
  auto c = ChildProcess::spawn({"true"}, o);
  REQUIRE_FALSE(c.has_value());
  CHECK(c.error().toString().find("spawning true") != std::string::npos);
}
