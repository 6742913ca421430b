// SPDX-License-Identifier: Apache-2.0
#include "spec/decode.h"

#include <map>

#include <catch2/catch.hpp>

#include "spec/interpolate.h"
#include "spec/normalize.h"
#include "spec/schema.h"

using namespace matchlock::spec;  // NOLINT(google-build-using-namespace)

namespace {

struct Decoded {
  DecodedFile file;
  std::vector<Diagnostic> diags;
  std::string firstError() const { return diags.empty() ? "" : diags.front().toString(); }
};

Decoded decodeText(std::string_view text, std::string_view format,
                   std::map<std::string, std::string, std::less<>> vars = {}) {
  Decoded out;
  std::string name = std::string("spec.") + std::string(format);
  auto doc = parseDocument(text, format, name, "/specs");
  if (!doc) {
    for (const auto& d : doc.error().details()) {
      out.diags.push_back(Diagnostic{"", {}, "", d});
    }
    return out;
  }
  EnvLookup env = [vars](std::string_view n) -> std::optional<std::string> {
    if (auto it = vars.find(n); it != vars.end()) {
      return it->second;
    }
    return std::nullopt;
  };
  interpolateDocument(*doc, env, out.diags);
  out.file = decodeDocument(*doc, out.diags, Origin::File);
  if (out.diags.empty()) {
    validateAgainstSchema(*doc, out.diags);
  }
  return out;
}

const char* kToml = R"(name = "agents"
[sandboxes.coder]
image = "python:3.12-alpine"
cpus = 2
memory = "1GiB"
disk = "4GiB"
env = { PYTHONUNBUFFERED = "1" }
workdir = "/workspace"
user = "1000:1000"
command = ["sleep", "infinity"]
hostname = "coder"
[sandboxes.coder.network]
allow_hosts = ["api.anthropic.com", "*.PyPI.org"]
block_private_ips = true
dns_servers = ["1.1.1.1"]
add_hosts = { "api.internal" = "10.0.0.10" }
mtu = 1500
[[sandboxes.coder.secrets]]
name = "ANTHROPIC_API_KEY"
from_env = "ANTHROPIC_API_KEY"
hosts = ["api.anthropic.com"]
[[sandboxes.coder.mounts]]
source = "./src"
target = "/workspace/src"
mode = "overlay"
[[sandboxes.coder.ports]]
host = 8080
guest = 8080
address = "127.0.0.1"
)";

const char* kYaml = R"(name: agents
sandboxes:
  coder:
    image: python:3.12-alpine
    cpus: 2
    memory: 1024
    disk: 4GiB
    env:
      - PYTHONUNBUFFERED=1
    workdir: /workspace
    user: "1000:1000"
    command: [sleep, infinity]
    hostname: coder
    network:
      allow_hosts: [api.anthropic.com, "*.pypi.org"]
      block_private_ips: true
      dns_servers: [1.1.1.1]
      add_hosts: {api.internal: 10.0.0.10}
      mtu: 1500
    secrets:
      - name: ANTHROPIC_API_KEY
        from_env: ANTHROPIC_API_KEY
        hosts: [api.anthropic.com]
    mounts:
      - {source: ./src, target: /workspace/src/, mode: overlay}
    ports:
      - host: 8080
        guest: 8080
)";

const char* kJson = R"({
  "name": "agents",
  "sandboxes": {
    "coder": {
      "image": "python:3.12-alpine", "cpus": 2.0, "memory": "1Gi", "disk": 4096,
      "env": {"PYTHONUNBUFFERED": 1},
      "workdir": "/workspace/", "user": "1000:1000", "command": ["sleep", "infinity"],
      "network": {"allow_hosts": ["api.anthropic.com", "*.pypi.org"], "dns_servers": ["1.1.1.1"],
                  "add_hosts": {"api.internal": "10.0.0.10"}},
      "secrets": [{"name": "ANTHROPIC_API_KEY", "from_env": "ANTHROPIC_API_KEY",
                   "hosts": ["api.anthropic.com"]}],
      "mounts": [{"source": "src", "target": "/workspace/src"}],
      "ports": [{"guest": 8080}]
    }
  }
})";

}  // namespace

TEST_CASE("TOML, YAML and JSON spellings decode to the identical spec") {
  Decoded t = decodeText(kToml, "toml");
  Decoded y = decodeText(kYaml, "yaml");
  Decoded j = decodeText(kJson, "json");
  INFO(t.firstError() << y.firstError() << j.firstError());
  REQUIRE(t.diags.empty());
  REQUIRE(y.diags.empty());
  REQUIRE(j.diags.empty());
  SandboxSpec ts = t.file.sandboxes.at("coder");
  SandboxSpec ys = y.file.sandboxes.at("coder");
  SandboxSpec js = j.file.sandboxes.at("coder");
  // source_file differs by construction.
  ys.source_file = js.source_file = ts.source_file;
  CHECK(toJson(ts).dump() == toJson(ys).dump());
  CHECK(toJson(ts).dump() == toJson(js).dump());
  CHECK(ts == ys);
  CHECK(ts == js);
  CHECK(ts.memory_mib == 1024);
  CHECK(ts.disk_mib == 4096);
  CHECK(ts.network.allow_hosts == std::vector<std::string>{"api.anthropic.com", "*.pypi.org"});
  CHECK(ts.mounts.at(0).source == "/specs/src");
  CHECK(ts.mounts.at(0).target == "/workspace/src");
  CHECK(ts.ports.at(0).address == "127.0.0.1");
  CHECK(ts.env.at("PYTHONUNBUFFERED") == "1");
  CHECK(t.file.project_name == std::optional<std::string>("agents"));
}

TEST_CASE("defaults are explicit in the normalized form") {
  Decoded d = decodeText("[sandboxes.a]\nimage = \"busybox\"\n", "toml");
  REQUIRE(d.diags.empty());
  const SandboxSpec& s = d.file.sandboxes.at("a");
  CHECK(s.cpus == 1.0);
  CHECK(s.memory_mib == 512);
  CHECK(s.disk_mib == 5120);
  CHECK(s.network.block_private_ips);
  CHECK(s.network.dns_servers == std::vector<std::string>{"8.8.8.8", "8.8.4.4"});
  CHECK(s.network.mtu == 1500);
  CHECK(s.hostname == "a");
  auto json = toJson(s);
  CHECK(json["memory"] == 512);
  CHECK(json["network"]["mtu"] == 1500);
  CHECK(json["restart"] == "no");
}

TEST_CASE("type errors carry file:line:col and the json path, in TOML and YAML") {
  Decoded t = decodeText("[sandboxes.coder]\nimage = \"x\"\ncpus = \"two\"\n", "toml");
  REQUIRE(t.diags.size() == 1);
  CHECK(t.firstError() == "spec.toml:3:8: sandboxes.coder.cpus: expected a number, got string");
  Decoded y = decodeText("sandboxes:\n  coder:\n    image: x\n    cpus: two\n", "yaml");
  REQUIRE(y.diags.size() == 1);
  CHECK(y.firstError() == "spec.yaml:4:11: sandboxes.coder.cpus: expected a number, got string");
  Decoded j =
      decodeText("{\"sandboxes\": {\"coder\": {\"image\": \"x\",\n \"cpus\": \"two\"}}}", "json");
  REQUIRE(j.diags.size() == 1);
  CHECK(j.firstError() == "spec.json:2:10: sandboxes.coder.cpus: expected a number, got string");
}

TEST_CASE("unknown keys are errors with a did-you-mean hint at the key") {
  Decoded d = decodeText(
      "sandboxes:\n  a:\n    imgae: busybox\n    image: busybox\n"
      "    network:\n      alow_hosts: [x.com]\n",
      "yaml");
  REQUIRE(d.diags.size() == 2);
  CHECK(d.diags[0].toString() ==
        "spec.yaml:3:5: sandboxes.a.imgae: unknown key 'imgae' (did you mean 'image'?)");
  CHECK(d.diags[1].toString() ==
        "spec.yaml:6:7: sandboxes.a.network.alow_hosts: unknown key "
        "'alow_hosts' (did you mean 'allow_hosts'?)");
}

TEST_CASE("all errors of a file are reported") {
  Decoded d = decodeText(
      "[sandboxes.a]\ncpus = -1\nmemory = \"12 parsecs\"\n[sandboxes.a.network]\nmtu = 10\n",
      "toml");
  REQUIRE(d.diags.size() == 4);
  CHECK(d.diags[0].message == "missing required key 'image'");
  CHECK(d.diags[1].path == "sandboxes.a.cpus");
  CHECK(d.diags[2].path == "sandboxes.a.memory");
  CHECK(d.diags[3].path == "sandboxes.a.network.mtu");
}

TEST_CASE("x- extension keys are ignored at every level") {
  Decoded d = decodeText(R"(
x-common: &img busybox
sandboxes:
  x-template: {whatever: 1}
  a:
    image: *img
    x-note: hi
    network: {x-why: because}
)",
                         "yaml");
  INFO(d.firstError());
  REQUIRE(d.diags.empty());
  CHECK(d.file.sandboxes.size() == 1);
  CHECK(d.file.sandboxes.at("a").image == "busybox");
}

TEST_CASE("YAML merge keys work as in compose files") {
  Decoded d = decodeText(R"(
x-base: &base
  image: busybox
  memory: 256
  env: {A: "1"}
sandboxes:
  a:
    <<: *base
    memory: 1024
)",
                         "yaml");
  INFO(d.firstError());
  REQUIRE(d.diags.empty());
  const SandboxSpec& s = d.file.sandboxes.at("a");
  CHECK(s.image == "busybox");
  CHECK(s.memory_mib == 1024);
  CHECK(s.env.at("A") == "1");
}

TEST_CASE("YAML 1.2 scalars: yes/no stay strings, quoted numbers stay strings") {
  Decoded d = decodeText(
      "sandboxes:\n  a:\n    image: busybox\n    env: {A: yes, B: '1'}\n"
      "    privileged: yes\n",
      "yaml");
  REQUIRE(d.diags.size() == 1);
  CHECK(d.diags[0].path == "sandboxes.a.privileged");
}

TEST_CASE("interpolated values become numbers or bools where the field wants one") {
  Decoded d = decodeText(
      "[sandboxes.a]\nimage = \"${IMG:-busybox}\"\ncpus = \"${CPUS}\"\n"
      "privileged = \"${PRIV:-false}\"\n[sandboxes.a.network]\n"
      "mtu = \"${MTU}\"\n",
      "toml", {{"CPUS", "0.5"}, {"MTU", "9000"}});
  INFO(d.firstError());
  REQUIRE(d.diags.empty());
  const SandboxSpec& s = d.file.sandboxes.at("a");
  CHECK(s.image == "busybox");
  CHECK(s.cpus == 0.5);
  CHECK(s.network.mtu == 9000);
  CHECK_FALSE(s.privileged);
  // A literal string (not interpolated) is still a type error.
  Decoded lit = decodeText("[sandboxes.a]\nimage = \"b\"\ncpus = \"2\"\n", "toml");
  CHECK(lit.diags.size() == 1);
}

TEST_CASE("interpolation errors point at the value") {
  Decoded d = decodeText("[sandboxes.a]\nimage = \"${IMAGE:?set IMAGE}\"\n", "toml");
  REQUIRE(d.diags.size() == 1);
  CHECK(d.firstError() ==
        "spec.toml:2:9: sandboxes.a.image: required variable IMAGE is missing a "
        "value: set IMAGE");
}

TEST_CASE("secrets: literal values are refused in files, references kept") {
  Decoded lit = decodeText(
      "[sandboxes.a]\nimage = \"b\"\n[[sandboxes.a.secrets]]\nname = \"K\"\n"
      "value = \"sk-123\"\nhosts = [\"x.com\"]\n",
      "toml");
  REQUIRE(lit.diags.size() == 1);
  CHECK(lit.diags[0].path == "sandboxes.a.secrets[0].value");
  CHECK(lit.diags[0].pos.line == 5);
  CHECK(lit.diags[0].message.find("not allowed in spec files") != std::string::npos);
  CHECK(lit.firstError().find("sk-123") == std::string::npos);

  Decoded refs = decodeText(R"(
sandboxes:
  a:
    image: b
    secrets:
      - {name: A, from_env: A_KEY, hosts: [a.com]}
      - {name: B, from_file: keys/b.txt, hosts: ["*"]}
      - {name: C, from_command: "pass show c", hosts: [c.com]}
)",
                            "yaml");
  INFO(refs.firstError());
  REQUIRE(refs.diags.empty());
  const auto& secrets = refs.file.sandboxes.at("a").secrets;
  CHECK(secrets[0].kind == SecretRef::Kind::Env);
  CHECK(secrets[1].file == "/specs/keys/b.txt");
  CHECK(secrets[2].command == std::vector<std::string>{"/bin/sh", "-c", "pass show c"});
  auto json = toJson(refs.file.sandboxes.at("a"));
  CHECK(json["secrets"][0]["from_env"] == "A_KEY");
}

TEST_CASE("cross-field rules") {
  Decoded nn = decodeText(
      "[sandboxes.a]\nimage = \"b\"\n[sandboxes.a.network]\n"
      "no_network = true\nallow_hosts = [\"x.com\"]\n",
      "toml");
  REQUIRE(nn.diags.size() == 1);
  CHECK(nn.diags[0].path == "sandboxes.a.network.allow_hosts");
  Decoded dup = decodeText(R"(
sandboxes:
  a:
    image: b
    mounts:
      - {source: ., target: /w}
      - {source: ., target: /w/}
)",
                           "yaml");
  REQUIRE(dup.diags.size() == 1);
  CHECK(dup.diags[0].toString() ==
        "spec.yaml:7:29: sandboxes.a.mounts[1].target: '/w' is already "
        "a mount target");
  Decoded mem = decodeText(
      "sandboxes:\n  a:\n    image: b\n    mounts: [{target: /m, mode: "
      "memory}, {target: /n}]\n",
      "yaml");
  REQUIRE(mem.diags.size() == 1);
  CHECK(mem.diags[0].path == "sandboxes.a.mounts[1]");
  CHECK(mem.diags[0].message.find("source") != std::string::npos);
}

TEST_CASE("volume and disk mounts") {
  Decoded ok = decodeText(R"(
sandboxes:
  a:
    image: b
    mounts:
      - {source: data, target: /data, mode: volume}
      - {source: img/raw.ext4, target: /raw/, mode: disk, readonly: true}
      - {source: ., target: /w}
)",
                          "yaml");
  INFO(ok.firstError());
  REQUIRE(ok.diags.empty());
  const auto& mounts = ok.file.sandboxes.at("a").mounts;
  CHECK(mounts[0].mode == MountMode::Volume);
  CHECK(mounts[0].source == "data");  // a name, never resolved as a path
  CHECK_FALSE(mounts[0].readonly);
  CHECK(mounts[1].mode == MountMode::Disk);
  CHECK(mounts[1].source == "/specs/img/raw.ext4");
  CHECK(mounts[1].target == "/raw");
  CHECK(mounts[1].readonly);
  auto json = toJson(ok.file.sandboxes.at("a"));
  CHECK(json["mounts"][0]["readonly"] == false);
  CHECK(json["mounts"][2].find("readonly") == json["mounts"][2].end());

  Decoded bad = decodeText(R"(
sandboxes:
  a:
    image: b
    mounts:
      - {source: ., target: /w}
      - {source: a/b, target: /x, mode: volume}
      - {source: ., target: /y, readonly: true}
      - {source: data, target: /w/db, mode: volume}
)",
                           "yaml");
  REQUIRE(bad.diags.size() == 3);
  CHECK(bad.diags[0].path == "sandboxes.a.mounts[1].source");
  CHECK(bad.diags[1].path == "sandboxes.a.mounts[2].readonly");
  CHECK(bad.diags[2].toString().starts_with("spec.yaml:9:"));
  CHECK(bad.diags[2].toString().ends_with(
      "sandboxes.a.mounts[3].target: '/w/db' would be shadowed by the mount at '/w'"));
}

TEST_CASE("guest mount paths and shadowing") {
  CHECK(isValidGuestMountPath("/data"));
  CHECK(isValidGuestMountPath("/a/b.c_d-e"));
  CHECK_FALSE(isValidGuestMountPath("/"));
  CHECK_FALSE(isValidGuestMountPath("//"));
  CHECK_FALSE(isValidGuestMountPath("data"));
  CHECK_FALSE(isValidGuestMountPath("/a/../b"));
  CHECK_FALSE(isValidGuestMountPath("/a b"));
  std::vector<Mount> mounts = {{"/h", "/workspace", MountMode::Overlay, false, {}, false},
                               {"v", "/data", MountMode::Volume, false, {}, false}};
  CHECK(shadowingVfsMount(mounts, "/workspace/db") == "/workspace");
  CHECK(shadowingVfsMount(mounts, "/workspace") == "/workspace");
  CHECK(shadowingVfsMount(mounts, "/workspaces") == "");
  CHECK(shadowingVfsMount(mounts, "/data/x") == "");  // a disk inside a disk is fine
}

TEST_CASE("upstream extra_disks become disk mounts") {
  auto spec =
      decodeUpstreamConfig(nlohmann::json::parse(R"({"image": "busybox:latest", "extra_disks": [
        {"host_path": "/var/lib/d.ext4", "guest_mount": "/data", "readonly": true},
        {"host_path": "/var/lib/e.ext4", "guest_mount": "/e"}]})"),
                           "vm-1");
  INFO((spec ? "" : spec.error().toString()));
  REQUIRE(spec);
  REQUIRE(spec->mounts.size() == 2);
  CHECK(spec->mounts[0] == Mount{"/var/lib/d.ext4", "/data", MountMode::Disk, true, {}, false});
  CHECK(spec->mounts[1] == Mount{"/var/lib/e.ext4", "/e", MountMode::Disk, false, {}, false});
  CHECK_FALSE(decodeUpstreamConfig(
      nlohmann::json::parse(
          R"({"image": "b", "extra_disks": [{"host_path": "/d", "guest_mount": "rel"}]})"),
      "vm-1"));
}

TEST_CASE("sizes and durations") {
  using nlohmann::json;
  CHECK(parseSizeMib(json(2048)).value() == 2048);
  CHECK(parseSizeMib(json("1GiB")).value() == 1024);
  CHECK(parseSizeMib(json("1.5G")).value() == 1536);
  CHECK(parseSizeMib(json("512Mi")).value() == 512);
  CHECK(parseSizeMib(json("2048KiB")).value() == 2);
  CHECK(parseSizeMib(json("1T")).value() == 1048576);
  CHECK(parseSizeMib(json("300")).value() == 300);
  CHECK_FALSE(parseSizeMib(json("100KiB")).has_value());
  CHECK(parseSizeMib(json("1GB")).error().message().find("GiB") != std::string::npos);
  CHECK_FALSE(parseSizeMib(json("12 parsecs")).has_value());
  CHECK_FALSE(parseSizeMib(json(-1)).has_value());
  CHECK_FALSE(parseSizeMib(json(1.5)).has_value());
  CHECK(parseDurationMs(json("1m30s")).value() == 90000);
  CHECK(parseDurationMs(json("500ms")).value() == 500);
  CHECK(parseDurationMs(json(10)).value() == 10000);
  CHECK(parseDurationMs(json("1h")).value() == 3600000);
  CHECK_FALSE(parseDurationMs(json("10 minutes")).has_value());
  CHECK_FALSE(parseDurationMs(json("")).has_value());
  CHECK(formatDurationMs(90000) == "1m30s");
  CHECK(formatDurationMs(0) == "0s");
  CHECK(formatDurationMs(3600500) == "1h500ms");
}

TEST_CASE("syntax errors name the position") {
  Decoded t = decodeText("[sandboxes.a]\nimage = \n", "toml");
  REQUIRE(t.diags.size() == 1);
  CHECK(t.diags[0].message.rfind("spec.toml:2:", 0) == 0);
  Decoded y = decodeText("sandboxes:\n  a:\n    image: [b\n", "yaml");
  REQUIRE(y.diags.size() == 1);
  CHECK(y.diags[0].message.rfind("spec.yaml:", 0) == 0);
  Decoded j = decodeText("{\"sandboxes\": {\n  \"a\": {\"image\": \"b\",}}}", "json");
  REQUIRE(j.diags.size() == 1);
  CHECK(j.diags[0].message.rfind("spec.json:2:", 0) == 0);
  Decoded dup =
      decodeText("{\"sandboxes\": {\"a\": {\"image\": \"b\", \"image\": \"c\"}}}", "json");
  REQUIRE(dup.diags.size() == 1);
  CHECK(dup.diags[0].message.find("duplicate key 'image'") != std::string::npos);
  Decoded ydup = decodeText("sandboxes:\n  a:\n    image: b\n    image: c\n", "yaml");
  REQUIRE(ydup.diags.size() == 1);
  CHECK(ydup.diags[0].message.find("spec.yaml:4:5:") == 0);
}

TEST_CASE("field group hashes isolate changes") {
  Decoded a = decodeText("[sandboxes.a]\nimage = \"b\"\nmemory = 512\n", "toml");
  Decoded b = decodeText("[sandboxes.a]\nimage = \"b\"\nmemory = 1024\n", "toml");
  Decoded c = decodeText(
      "[sandboxes.a]\nimage = \"b\"\nmemory = 512\n"
      "[sandboxes.a.network]\nallow_hosts = [\"x.com\"]\n",
      "toml");
  auto ha = groupHashes(a.file.sandboxes.at("a"));
  auto hb = groupHashes(b.file.sandboxes.at("a"));
  auto hc = groupHashes(c.file.sandboxes.at("a"));
  CHECK(ha.at("resources") != hb.at("resources"));
  CHECK(ha.at("image") == hb.at("image"));
  CHECK(ha.at("egress") == hb.at("egress"));
  CHECK(ha.at("egress") != hc.at("egress"));
  CHECK(ha.at("resources") == hc.at("resources"));
  CHECK(ha.size() == fieldGroups().size());
}

TEST_CASE("upstream RPC create params decode through the same decoder") {
  nlohmann::json params = nlohmann::json::parse(R"({
    "image": "python:3.12-alpine",
    "privileged": false,
    "resources": {"cpus": 0.5, "memory_mb": 1024, "disk_size_mb": 2048, "timeout_seconds": 60},
    "env": {"A": "1"},
    "image_config": {"working_dir": "/app", "env": {"A": "0", "B": "2"}, "cmd": ["python"]},
    "network": {"allowed_hosts": ["api.openai.com"], "block_private_ips": true,
                "add_hosts": [{"host": "db.local", "ip": "10.0.0.5"}],
                "secrets": {"KEY": {"value": "sk-live", "hosts": ["api.openai.com"]}},
                "dns_servers": ["1.1.1.1"], "hostname": "box", "mtu": 1400},
    "vfs": {"workspace": "/workspace",
            "mounts": {"/workspace": {"type": "host_fs", "host_path": "/tmp", "readonly": true},
                       "/workspace/scratch": {"type": "memory"}}}
  })");
  auto s = decodeUpstreamConfig(params, "vm-1234abcd");
  INFO((s ? "" : s.error().toString()));
  REQUIRE(s.has_value());
  CHECK(s->cpus == 0.5);
  CHECK(s->memory_mib == 1024);
  CHECK(s->disk_mib == 2048);
  CHECK(s->env.at("A") == "1");
  CHECK(s->env.at("B") == "2");
  CHECK(s->workdir == std::optional<std::string>("/app"));
  CHECK(s->command == std::optional<std::vector<std::string>>({"python"}));
  CHECK(s->hostname == "box");
  CHECK(s->network.mtu == 1400);
  CHECK(s->network.add_hosts.at("db.local") == "10.0.0.5");
  REQUIRE(s->secrets.size() == 1);
  CHECK(s->secrets[0].kind == SecretRef::Kind::Inline);
  CHECK(s->secrets[0].inline_value == "sk-live");
  REQUIRE(s->mounts.size() == 2);
  CHECK(s->mounts[0].mode == MountMode::ReadOnly);
  CHECK(s->mounts[1].mode == MountMode::Memory);
  // The normalized form never carries the inline value.
  CHECK(toJson(*s).dump().find("sk-live") == std::string::npos);

  auto bad = decodeUpstreamConfig(nlohmann::json::parse(R"({"image": "x",
      "resources": {"memory_mb": "lots"}})"),
                                  "vm-1");
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().message().find("memory") != std::string::npos);
  CHECK_FALSE(decodeUpstreamConfig(nlohmann::json::parse(R"({"id": "vm-x", "image": "x"})"), "vm-1")
                  .has_value());
}

TEST_CASE("mount interception rules decode and name their errors") {
  Decoded good = decodeText(R"(
[sandboxes.a]
image = "busybox:latest"
[[sandboxes.a.mounts]]
source = "/src"
target = "/workspace"
mode = "rw"
interception = { emit_events = true, rules = [
  { name = "keys", ops = ["create", "write"], path = "/workspace/*.key", errno = "EACCES" },
  { ops = ["remove"], action = "allow" } ] }
)",
                            "toml");
  INFO(good.firstError());
  REQUIRE(good.diags.empty());
  const Mount& m = good.file.sandboxes.at("a").mounts.at(0);
  CHECK(m.emit_events);
  REQUIRE(m.rules.size() == 2);
  CHECK(m.rules[0].name == "keys");
  CHECK(m.rules[0].ops == std::vector<std::string>{"create", "write"});
  CHECK(m.rules[0].error == "EACCES");
  CHECK(m.rules[0].block);
  CHECK_FALSE(m.rules[1].block);
  CHECK(toJson(good.file.sandboxes.at("a")).dump().find("interception") != std::string::npos);
  Decoded bad = decodeText(R"(
[sandboxes.a]
image = "busybox:latest"
[[sandboxes.a.mounts]]
source = "/src"
target = "/w"
interception = { rules = [ { ops = ["explode"], errno = "EFAULT", path = "rel/*" } ] }
)",
                           "toml");
  std::string text;
  for (const auto& d : bad.diags) {
    text += d.toString() + "\n";
  }
  INFO(text);
  CHECK(text.find("mounts[0].interception.rules[0].ops[0]") != std::string::npos);
  CHECK(text.find("interception.rules[0].errno") != std::string::npos);
  CHECK(text.find("interception.rules[0].path") != std::string::npos);
  CHECK(text.find("spec.toml:") != std::string::npos);
}

TEST_CASE("network interception rules decode, round-trip and name their errors") {
  Decoded good = decodeText(R"(
[sandboxes.a]
image = "busybox:latest"
[sandboxes.a.network]
allow_hosts = ["api.test"]
[[sandboxes.a.network.interception.rules]]
name = "tag"
hosts = ["API.test"]
methods = ["get", "POST"]
path = "/v1/*"
set_headers = { X-Team = "agents" }
delete_query = ["debug"]
[[sandboxes.a.network.interception.rules]]
phase = "after"
body_replacements = [ { find = "event", replace = "EVENT" } ]
[[sandboxes.a.network.interception.rules]]
action = "block"
methods = ["DELETE"]
)",
                            "toml");
  INFO(good.firstError());
  REQUIRE(good.diags.empty());
  const auto& sb = good.file.sandboxes.at("a");
  REQUIRE(sb.network.rules.size() == 3);
  CHECK(sb.network.rules[0].hosts == std::vector<std::string>{"api.test"});
  CHECK(sb.network.rules[0].methods == std::vector<std::string>{"GET", "POST"});
  CHECK(sb.network.rules[0].set_headers.at(0).first == "X-Team");
  CHECK(sb.network.rules[1].phase == HttpRule::Phase::After);
  CHECK(sb.network.rules[2].action == HttpRule::Action::Block);
  // The normalized form decodes back to the same rules (the applied spec in the state DB).
  auto back = decodeNormalized(nlohmann::json::parse(toJson(sb).dump()), "a");
  REQUIRE(back);
  CHECK(back->network.rules == sb.network.rules);

  Decoded bad = decodeText(R"(
[sandboxes.a]
image = "busybox:latest"
[sandboxes.a.network]
interception = { callback_socket = 7, rules = [
  { phase = "later", set_headers = { "Bad Name" = "v" } },
  { phase = "after", set_headers = { A = "1" }, body_replacements = [ { find = "" } ] },
  { callback_id = "cb", rewrite_path = "rel", action = "block", timeout_ms = 0 } ] }
[sandboxes.b]
image = "busybox:latest"
network = { no_network = true, interception = { rules = [ { action = "block" } ] } }
[sandboxes.c]
image = "busybox:latest"
network = { interception = { rules = [ { timeout_ms = 10 } ] } }
)",
                           "toml");
  std::string text;
  for (const auto& d : bad.diags) {
    text += d.toString() + "\n";
  }
  INFO(text);
  CHECK(text.find("spec.toml:") != std::string::npos);
  CHECK(text.find("interception.callback_socket: expected a path to a Unix socket") !=
        std::string::npos);
  CHECK(text.find("rules[0].phase: invalid value 'later'") != std::string::npos);
  CHECK(text.find("'Bad Name' is not a valid header name") != std::string::npos);
  CHECK(text.find("rules[1].set_headers: only for phase = \"before\"") != std::string::npos);
  CHECK(text.find("rules[1].body_replacements[0]: 'find' must be a non-empty string") !=
        std::string::npos);
  CHECK(text.find("rules[2].callback_id: a callback rule needs "
                  "network.interception.callback_socket") != std::string::npos);
  CHECK(text.find("rules[2].action: a callback rule cannot block") != std::string::npos);
  CHECK(text.find("rules[2].timeout_ms:") != std::string::npos);
  CHECK(text.find("rules[2].rewrite_path: must be an absolute path") != std::string::npos);
  CHECK(text.find("interception rules need the egress proxy") != std::string::npos);
  CHECK(text.find("c.network.interception.rules[0].timeout_ms: only for a rule with a "
                  "callback_id") != std::string::npos);
}

TEST_CASE("spec callback rules decode, normalize and round-trip") {
  Decoded d = decodeText(R"(
[sandboxes.a]
image = "busybox:latest"
[sandboxes.a.network]
interception = { callback_socket = "/run/hooks.sock", rules = [
  { name = "ask", path = "/v1/*", callback_id = "cb-1", timeout_ms = 1500 } ] }
)",
                         "toml");
  INFO(d.firstError());
  REQUIRE(d.diags.empty());
  const auto& sb = d.file.sandboxes.at("a");
  CHECK(sb.network.callback_socket == "/run/hooks.sock");
  REQUIRE(sb.network.rules.size() == 1);
  CHECK(sb.network.rules[0].callback_id == "cb-1");
  CHECK(sb.network.rules[0].timeout_ms == 1500);
  auto back = decodeNormalized(nlohmann::json::parse(toJson(sb).dump()), "a");
  REQUIRE(back);
  CHECK(back->network == sb.network);
}

TEST_CASE("upstream create params carry network interception rules and callbacks") {
  auto ok = decodeUpstreamConfig(nlohmann::json::parse(R"({"image": "x", "network": {
      "allowed_hosts": ["api.test"],
      "interception": {"rules": [{"phase": "after", "path": "/sse",
                                  "body_replacements": [{"find": "a", "replace": "b"}]}]}}})"),
                                 "vm-1");
  INFO((ok ? std::string() : ok.error().message()));
  REQUIRE(ok);
  REQUIRE(ok->network.rules.size() == 1);
  CHECK(ok->network.rules[0].phase == HttpRule::Phase::After);
  auto cb =
      decodeUpstreamConfig(nlohmann::json::parse(R"({"image": "x", "network": {"interception": {
          "callback_socket": "/tmp/sdk.sock", "rules": [{"callback_id": "c1"}]}}})"),
                           "vm-1");
  INFO((cb ? std::string() : cb.error().message()));
  REQUIRE(cb);
  CHECK(cb->network.callback_socket == "/tmp/sdk.sock");
  CHECK(cb->network.rules.at(0).callback_id == "c1");
}

TEST_CASE("readers refuse what the fuzzer found, with the file and the place") {
  auto errorOf = [](std::string_view text, std::string_view format) {
    auto doc = parseDocument(text, format, "s." + std::string(format), "/specs");
    REQUIRE_FALSE(doc.has_value());
    CHECK(doc.error().code() == matchlock::Errc::InvalidSpec);
    return doc.error().message();
  };
  // Bytes that are not UTF-8 (YAML passes them through; they once ended the process when the
  // path or the tree was printed as JSON). An escape naming a surrogate is yaml-cpp's to refuse.
  CHECK(errorOf("T\xa8: 1\n", "yaml") ==
        "s.yaml:1:1: <root>: a key is not valid UTF-8 (byte 0xa8 at offset 1)");
  CHECK(errorOf("sandboxes:\n  a:\n    image: \"x\xff\"\n", "yaml") ==
        "s.yaml:3:12: sandboxes.a.image: the value is not valid UTF-8 (byte 0xff at offset 1)");
  CHECK(errorOf("a: \"\\ud800\"\n", "yaml").find("invalid unicode") != std::string::npos);
  // yaml-cpp's LoadAll never returned on this.
  CHECK(errorOf(",[", "yaml").rfind("s.yaml:1:", 0) == 0);
  // A number beyond a double once escaped as nlohmann's out_of_range.
  CHECK(errorOf("{\"a\": 8e+88888}", "json").find("number overflow") != std::string::npos);
}
