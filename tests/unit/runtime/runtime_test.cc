// SPDX-License-Identifier: Apache-2.0
// The pure parts of the runtime: the main process a spec declares (Docker's ENTRYPOINT/CMD
// rules), secret resolution and the keyed rotation hash.
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include <catch2/catch.hpp>

#include "runtime/sandbox.h"
#include "runtime/secrets.h"

using namespace matchlock;  // NOLINT(google-build-using-namespace)

namespace {

namespace fs = std::filesystem;

/// A private MATCHLOCK_HOME for one test case.
struct TempHome {
  TempHome() {
    std::string tmpl = (fs::temp_directory_path() / "ml-runtime-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
    REQUIRE(::setenv("MATCHLOCK_HOME", path.c_str(), 1) == 0);
  }
  ~TempHome() {
    std::error_code ec;
    fs::remove_all(path, ec);
    (void)::unsetenv("MATCHLOCK_HOME");
  }
  TempHome(const TempHome&) = delete;
  TempHome& operator=(const TempHome&) = delete;
  std::string path;
};

image::ImageConfig imageWith(std::vector<std::string> entrypoint, std::vector<std::string> cmd) {
  image::ImageConfig c;
  c.entrypoint = std::move(entrypoint);
  c.cmd = std::move(cmd);
  c.env = {"PATH=/usr/bin:/bin", "LANG=C.UTF-8"};
  c.working_dir = "/app";
  c.user = "1000";
  return c;
}

spec::SecretRef envSecret(const std::string& name, const std::string& var) {
  spec::SecretRef s;
  s.name = name;
  s.kind = spec::SecretRef::Kind::Env;
  s.env_var = var;
  return s;
}

}  // namespace

TEST_CASE("the main process follows Docker's ENTRYPOINT/CMD rules") {
  spec::SandboxSpec s;
  s.name = "web";
  auto img = imageWith({"/entry.sh"}, {"serve"});

  SECTION("no command and no entrypoint: the sandbox idles (the image's CMD is not run)") {
    CHECK_FALSE(runtime::mainProcessOf(s, img).has_value());
  }
  SECTION("command: appended to the image's entrypoint; image env, cwd and user") {
    s.command = std::vector<std::string>{"run", "--fast"};
    s.env = {{"LANG", "en_US.UTF-8"}, {"ROLE", "web"}};
    auto m = runtime::mainProcessOf(s, img);
    REQUIRE(m.has_value());
    CHECK(m->argv == std::vector<std::string>{"/entry.sh", "run", "--fast"});
    CHECK(m->env.at("PATH") == "/usr/bin:/bin");
    CHECK(m->env.at("LANG") == "en_US.UTF-8");  // the spec wins
    CHECK(m->env.at("ROLE") == "web");
    CHECK(m->cwd == "/app");
    CHECK(m->user == "1000");
    CHECK(m->restart == "no");
  }
  SECTION("entrypoint: drops the image's entrypoint and CMD; spec workdir/user/restart win") {
    s.entrypoint = std::vector<std::string>{"python3", "-m"};
    s.command = std::vector<std::string>{"http.server"};
    s.workdir = "/srv";
    s.user = "root";
    s.restart = spec::RestartPolicy::OnFailure;
    auto m = runtime::mainProcessOf(s, img);
    REQUIRE(m.has_value());
    CHECK(m->argv == std::vector<std::string>{"python3", "-m", "http.server"});
    CHECK(m->cwd == "/srv");
    CHECK(m->user == "root");
    CHECK(m->restart == "on-failure");
  }
  SECTION("a command with no entrypoint anywhere runs as given; an empty one is nothing") {
    auto bare = imageWith({}, {"sh"});
    s.command = std::vector<std::string>{"sleep", "5"};
    CHECK(runtime::mainProcessOf(s, bare)->argv == std::vector<std::string>{"sleep", "5"});
    s.command = std::vector<std::string>{};
    CHECK_FALSE(runtime::mainProcessOf(s, bare).has_value());
  }
}

TEST_CASE("secret values resolve from env, file and command; a missing source names itself") {
  TempHome home;
  spec::SandboxSpec s;
  REQUIRE(::setenv("ML_TEST_SECRET_A", "alpha", 1) == 0);
  std::string file = home.path + "/b.txt";
  std::ofstream(file) << "bravo\n";
  spec::SecretRef b;
  b.name = "B";
  b.kind = spec::SecretRef::Kind::File;
  b.file = file;
  spec::SecretRef c;
  c.name = "C";
  c.kind = spec::SecretRef::Kind::Command;
  c.command = {"/bin/echo", "charlie"};
  s.secrets = {envSecret("A", "ML_TEST_SECRET_A"), b, c};
  auto values = runtime::resolveSecretValues(s);
  REQUIRE(values.has_value());
  CHECK(*values ==
        std::map<std::string, std::string>{{"A", "alpha"}, {"B", "bravo"}, {"C", "charlie"}});

  s.secrets = {envSecret("D", "ML_TEST_SECRET_UNSET")};
  (void)::unsetenv("ML_TEST_SECRET_UNSET");
  auto missing = runtime::resolveSecretValues(s);
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().message() ==
        "secret D: environment variable ML_TEST_SECRET_UNSET is not set");

  spec::SecretRef fails;
  fails.name = "E";
  fails.kind = spec::SecretRef::Kind::Command;
  fails.command = {"/bin/false"};
  s.secrets = {fails};
  auto failed = runtime::resolveSecretValues(s);
  REQUIRE_FALSE(failed.has_value());
  CHECK(failed.error().message() == "secret E: command failed (exit 1)");
}

TEST_CASE("the rotation hash is keyed, stable, value-sensitive and never the value") {
  TempHome home;
  std::map<std::string, std::string> v1 = {{"API_KEY", "sk-one"}};
  std::map<std::string, std::string> v2 = {{"API_KEY", "sk-two"}};

  // A dry run does not create the key, so it cannot hash.
  auto dry = runtime::secretsHash(v1, false);
  REQUIRE(dry.has_value());
  CHECK_FALSE(dry->has_value());
  CHECK_FALSE(fs::exists(home.path + "/secrets.key"));

  auto h1 = runtime::secretsHash(v1, true);
  REQUIRE(h1.has_value());
  REQUIRE(h1->has_value());
  struct stat st {};
  REQUIRE(::stat((home.path + "/secrets.key").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(st.st_size == 32);
  CHECK(**runtime::secretsHash(v1, true) == **h1);
  CHECK(**runtime::secretsHash(v1, false) == **h1);  // an existing key serves dry runs too
  CHECK(**runtime::secretsHash(v2, true) != **h1);
  CHECK((*h1)->find("sk-one") == std::string::npos);
  CHECK((*h1)->size() == 64);
  // Names and values cannot be shifted into each other.
  CHECK(**runtime::secretsHash({{"A", "BC"}}, true) != **runtime::secretsHash({{"AB", "C"}}, true));
  // No secrets, no hash.
  CHECK_FALSE(runtime::secretsHash({}, true)->has_value());
}
