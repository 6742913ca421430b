// SPDX-License-Identifier: Apache-2.0
#include "sys/jail.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>

#include <catch2/catch.hpp>

#include "common/fd.h"
#include "sys/process.h"

using matchlock::Errc;
using matchlock::sys::JailSpec;
using matchlock::sys::planJail;

namespace {

JailSpec minimal(const std::string& root) {
  JailSpec s;
  s.root = root;
  s.uid = 65534;
  s.gid = 65534;
  s.binds.push_back({"/usr", "/usr", false});
  for (const char* top : {"/bin", "/lib", "/lib64", "/sbin"}) {
    std::error_code ec;
    if (std::filesystem::is_symlink(top, ec)) {
      s.symlinks.emplace_back(top, std::filesystem::read_symlink(top, ec).string());
    } else if (std::filesystem::is_directory(top, ec)) {
      s.binds.push_back({top, top, false});
    }
  }
  s.binds.push_back({"/dev/null", "/dev/null", true});
  return s;
}

}  // namespace

TEST_CASE("a jail plan refuses what would weaken or break it", "[sys]") {
  JailSpec s = minimal("/tmp/x");
  s.root = "relative";
  CHECK(planJail(s).error().code() == Errc::InvalidSpec);
  s = minimal("/tmp/x");
  s.uid = 0;
  CHECK(planJail(s).error().message().find("never runs as root") != std::string::npos);
  s = minimal("/tmp/x");
  s.binds.push_back({"/usr", "/usr", true});
  CHECK(planJail(s).error().message().find("'/usr'") != std::string::npos);
  s = minimal("/tmp/x");
  s.binds.push_back({"/usr", "/a/../etc", false});
  CHECK(planJail(s).error().code() == Errc::InvalidSpec);
  s = minimal("/tmp/x");
  s.binds.push_back({"/nonexistent-source", "/x", false});
  CHECK(planJail(s).error().code() == Errc::NotFound);
}

TEST_CASE("a jail plan creates parents before children and binds shallow paths first", "[sys]") {
  JailSpec s = minimal("/tmp/jr");
  s.binds.push_back({"/dev/zero", "/deep/er/zero", true});
  auto plan = planJail(s);
  REQUIRE(plan.has_value());
  auto at = [&](const std::string& d) {
    return std::find(plan->dirs.begin(), plan->dirs.end(), d) - plan->dirs.begin();
  };
  CHECK(at("/tmp/jr/deep") < at("/tmp/jr/deep/er"));
  CHECK(at("/tmp/jr/usr") < static_cast<long>(plan->dirs.size()));
  CHECK(plan->mounts.front().target.size() <= plan->mounts.back().target.size());
}

TEST_CASE("a jailed child sees only its binds, as an unprivileged uid without capabilities",
          "[sys]") {
  if (::geteuid() != 0) {
    SUCCEED("needs root: namespaces, pivot_root and the uid switch");
    return;
  }
  char tmpl[] = "/tmp/ml-jail-test-XXXXXX";
  REQUIRE(::mkdtemp(tmpl) != nullptr);
  const std::string dir = tmpl;
  const std::string root = dir + "/root";
  REQUIRE(::mkdir(root.c_str(), 0700) == 0);
  JailSpec spec = minimal(root);
  spec.rlimits = {{RLIMIT_NPROC, 64}};
  auto plan = planJail(spec);
  REQUIRE(plan.has_value());
  matchlock::sys::SpawnOptions o;
  o.stdout_path = dir + "/out";
  o.stderr_path = o.stdout_path;
  o.jail = &*plan;
  o.env = std::vector<std::string>{"PATH=/usr/bin:/bin"};
  auto c = matchlock::sys::ChildProcess::spawn(
      {"/bin/sh", "-c",
       "ls /; id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status 2>&1; echo $$; "
       "touch /usr/x 2>/dev/null || echo ro; echo done"},
      o);
  REQUIRE(c.has_value());
  auto e = c->waitFor(std::chrono::seconds(20));
  REQUIRE(e.has_value());
  REQUIRE(e->has_value());
  auto out = matchlock::readFile(dir + "/out");
  REQUIRE(out.has_value());
  INFO(*out);
  CHECK((*e)->code == 0);
  // No /proc in the jail: the grep fails; the shell is PID 1 of its namespace.
  CHECK(out->find("etc") == std::string::npos);
  CHECK(out->find("usr\n") != std::string::npos);
  CHECK(out->find("65534\n") != std::string::npos);
  CHECK(out->find("\n1\n") != std::string::npos);
  CHECK(out->find("ro\ndone") != std::string::npos);
  // Nothing of the jail is left mounted on the host.
  CHECK(std::filesystem::is_empty(root));
  std::filesystem::remove_all(dir);
}
