// SPDX-License-Identifier: Apache-2.0
// Table-driven tests of the pure planner: every field class, health repairs, orphans, and the
// force/no-recreate/only options.
#include "reconcile/plan.h"

#include <functional>

#include <catch2/catch.hpp>

using namespace matchlock;             // NOLINT(google-build-using-namespace)
using namespace matchlock::reconcile;  // NOLINT(google-build-using-namespace)

namespace {

spec::SandboxSpec base(const std::string& name) {
  spec::SandboxSpec s;
  s.name = name;
  s.image = "busybox:1";
  s.hostname = name;
  return s;
}

bool mentions(const Action& a, const std::string& text) {
  for (const auto& r : a.reasons) {
    if (r.find(text) != std::string::npos) {
      return true;
    }
  }
  return false;
}

Desired desired(const spec::SandboxSpec& s, const std::string& secrets_hash,
                const std::string& image_digest = "") {
  Desired d;
  d.spec = s;
  d.secrets_hash = secrets_hash;
  d.image_digest = image_digest;
  return d;
}

Observed obs(Observed::Health health, const spec::SandboxSpec& s, const std::string& secrets_hash,
             const std::string& image_digest = "") {
  Observed o;
  o.health = health;
  o.applied = s;
  o.secrets_hash = secrets_hash;
  o.image_digest = image_digest;
  return o;
}

struct Row {
  const char* name;
  std::function<void(spec::SandboxSpec&)> edit;
  ActionKind expected;
  const char* reason;  // substring of some reason ("" = none expected)
};

}  // namespace

TEST_CASE("each field class maps to the right action") {
  std::vector<Row> rows = {
      {"unchanged", [](spec::SandboxSpec&) {}, ActionKind::Noop, ""},
      {"image", [](spec::SandboxSpec& s) { s.image = "busybox:2"; }, ActionKind::Recreate,
       "image: busybox:1 → busybox:2"},
      {"memory", [](spec::SandboxSpec& s) { s.memory_mib = 1024; }, ActionKind::Recreate,
       "memory: 512 MiB → 1024 MiB"},
      {"cpus", [](spec::SandboxSpec& s) { s.cpus = 0.5; }, ActionKind::Recreate, "cpus: 1 → 0.5"},
      {"disk", [](spec::SandboxSpec& s) { s.disk_mib = 8192; }, ActionKind::Recreate, "disk"},
      {"env added", [](spec::SandboxSpec& s) { s.env["TOKEN_MODE"] = "secret-ish"; },
       ActionKind::Recreate, "env: +TOKEN_MODE"},
      {"command",
       [](spec::SandboxSpec& s) {
         s.command = std::vector<std::string>{"sleep", "1"};
       },
       ActionKind::Recreate, "command changed"},
      {"user", [](spec::SandboxSpec& s) { s.user = "1000"; }, ActionKind::Recreate,
       "user: (image default) → 1000"},
      {"mounts",
       [](spec::SandboxSpec& s) {
         spec::Mount m;
         m.source = "/src";
         m.target = "/w";
         m.mode = spec::MountMode::ReadOnly;
         s.mounts.push_back(m);
       },
       ActionKind::Recreate, "mounts: +/w"},
      {"mtu", [](spec::SandboxSpec& s) { s.network.mtu = 9000; }, ActionKind::Recreate,
       "mtu: 1500 → 9000"},
      {"allow_hosts without live egress",
       [](spec::SandboxSpec& s) { s.network.allow_hosts = {"a.com"}; }, ActionKind::Recreate,
       "allow_hosts: +a.com (no live update for egress yet: recreate)"},
      {"ports without live ports",
       [](spec::SandboxSpec& s) {
         s.ports.push_back(spec::PortForward{8080, 80, "127.0.0.1", "tcp"});
       },
       ActionKind::Recreate, "ports: +127.0.0.1:8080→80/tcp"},
      {"labels only", [](spec::SandboxSpec& s) { s.labels["team"] = "x"; }, ActionKind::UpdateLive,
       "labels: +team (recorded, no restart)"},
      {"restart only", [](spec::SandboxSpec& s) { s.restart = spec::RestartPolicy::Always; },
       ActionKind::UpdateLive, "restart: no → always"},
  };
  for (const Row& row : rows) {
    SECTION(row.name) {
      spec::SandboxSpec want = base("a");
      row.edit(want);
      Plan p = plan("proj", {{"a", desired(want, "")}},
                    {{"a", obs(Observed::Health::Running, base("a"), "")}}, {});
      REQUIRE(p.actions.size() == 1);
      CHECK(p.actions[0].kind == row.expected);
      if (*row.reason != '\0') {
        INFO(p.actions[0].reasons.size());
        CHECK(mentions(p.actions[0], row.reason));
      } else {
        CHECK(p.actions[0].reasons.empty());
      }
    }
  }
}

TEST_CASE("env values never appear in reasons, only names") {
  spec::SandboxSpec have = base("a");
  have.env["KEY"] = "old-value-123";
  spec::SandboxSpec want = have;
  want.env["KEY"] = "new-value-456";
  Plan p =
      plan("p", {{"a", desired(want, "")}}, {{"a", obs(Observed::Health::Running, have, "")}}, {});
  std::string text = renderPlan(p) + planToJson(p).dump();
  CHECK(text.find("~KEY") != std::string::npos);
  CHECK(text.find("value-123") == std::string::npos);
  CHECK(text.find("value-456") == std::string::npos);
}

TEST_CASE("live groups update in place when their layer supports it") {
  spec::SandboxSpec want = base("a");
  want.network.allow_hosts = {"a.com"};
  want.ports.push_back(spec::PortForward{8080, 80, "127.0.0.1", "tcp"});
  PlanOptions opts;
  opts.live_supported = {"egress", "ports"};
  Plan p = plan("p", {{"a", desired(want, "")}},
                {{"a", obs(Observed::Health::Running, base("a"), "")}}, opts);
  REQUIRE(p.actions.size() == 1);
  CHECK(p.actions[0].kind == ActionKind::UpdateLive);
  CHECK(p.actions[0].live_groups == std::vector<std::string>{"egress", "ports"});
  // A recreate-class change alongside wins.
  want.memory_mib = 2048;
  Plan q = plan("p", {{"a", desired(want, "")}},
                {{"a", obs(Observed::Health::Running, base("a"), "")}}, opts);
  CHECK(q.actions[0].kind == ActionKind::Recreate);
  CHECK(mentions(q.actions[0], "allow_hosts: +a.com"));
}

TEST_CASE("secret rotation is detected from the keyed hash, not values") {
  spec::SandboxSpec s = base("a");
  s.secrets.push_back(
      spec::SecretRef{"K", spec::SecretRef::Kind::Env, "K", "", {}, "", "", {"x.com"}});
  PlanOptions opts;
  opts.live_supported = {"secrets"};
  Plan same =
      plan("p", {{"a", desired(s, "h1")}}, {{"a", obs(Observed::Health::Running, s, "h1")}}, opts);
  CHECK(same.actions[0].kind == ActionKind::Noop);
  Plan rotated =
      plan("p", {{"a", desired(s, "h2")}}, {{"a", obs(Observed::Health::Running, s, "h1")}}, opts);
  CHECK(rotated.actions[0].kind == ActionKind::UpdateLive);
  CHECK(mentions(rotated.actions[0], "secret values rotated"));
  Plan unknown =
      plan("p", {{"a", desired(s, "")}}, {{"a", obs(Observed::Health::Running, s, "h1")}}, opts);
  CHECK(unknown.actions[0].kind == ActionKind::Noop);  // dry run without reading values
  Plan not_live =
      plan("p", {{"a", desired(s, "h2")}}, {{"a", obs(Observed::Health::Running, s, "h1")}}, {});
  CHECK(not_live.actions[0].kind == ActionKind::Recreate);
}

TEST_CASE("a secret's hosts change live, a new or removed secret recreates") {
  spec::SandboxSpec s = base("a");
  s.secrets.push_back(
      spec::SecretRef{"K", spec::SecretRef::Kind::Env, "K", "", {}, "", "", {"x.com"}});
  PlanOptions opts;
  opts.live_supported = {"egress", "secrets"};
  spec::SandboxSpec hosts = s;
  hosts.secrets[0].hosts = {"x.com", "y.com"};
  Plan live = plan("p", {{"a", desired(hosts, "h1")}},
                   {{"a", obs(Observed::Health::Running, s, "h1")}}, opts);
  CHECK(live.actions[0].kind == ActionKind::UpdateLive);
  CHECK(live.actions[0].live_groups == std::vector<std::string>{"secrets"});
  spec::SandboxSpec added = s;
  added.secrets.push_back(
      spec::SecretRef{"L", spec::SecretRef::Kind::Env, "L", "", {}, "", "", {"y.com"}});
  Plan grown = plan("p", {{"a", desired(added, "h2")}},
                    {{"a", obs(Observed::Health::Running, s, "h1")}}, opts);
  CHECK(grown.actions[0].kind == ActionKind::Recreate);
  CHECK(mentions(grown.actions[0], "secrets: +L"));
  Plan shrunk = plan("p", {{"a", desired(base("a"), "")}},
                     {{"a", obs(Observed::Health::Running, s, "h1")}}, opts);
  CHECK(shrunk.actions[0].kind == ActionKind::Recreate);
}

TEST_CASE("health: create, start, and repairs") {
  struct HealthRow {
    Observed::Health health;
    ActionKind expected;
    const char* reason;
  };
  std::vector<HealthRow> rows = {
      {Observed::Health::Stopped, ActionKind::Start, ""},
      {Observed::Health::Crashed, ActionKind::Recreate, "supervisor died"},
      {Observed::Health::VmmDied, ActionKind::Recreate, "VM process died"},
      {Observed::Health::Leaked, ActionKind::Recreate, "owned resources went missing"},
      {Observed::Health::Failed, ActionKind::Recreate, "last apply failed"},
      {Observed::Health::Pending, ActionKind::Recreate, "interrupted"},
  };
  for (const HealthRow& row : rows) {
    PlanOptions opts;
    opts.no_recreate = true;  // repairs happen anyway
    Plan p =
        plan("p", {{"a", desired(base("a"), "")}}, {{"a", obs(row.health, base("a"), "")}}, opts);
    CHECK(p.actions[0].kind == row.expected);
    if (*row.reason != '\0') {
      CHECK(mentions(p.actions[0], row.reason));
    }
  }
  Plan fresh = plan("p", {{"a", desired(base("a"), "")}}, {}, {});
  CHECK(fresh.actions[0].kind == ActionKind::Create);
}

TEST_CASE("force-recreate and no-recreate") {
  PlanOptions force;
  force.force_recreate = true;
  Plan f = plan("p", {{"a", desired(base("a"), "")}},
                {{"a", obs(Observed::Health::Running, base("a"), "")}}, force);
  CHECK(f.actions[0].kind == ActionKind::Recreate);
  CHECK(mentions(f.actions[0], "--force-recreate"));

  spec::SandboxSpec want = base("a");
  want.memory_mib = 4096;
  PlanOptions keep;
  keep.no_recreate = true;
  Plan n = plan("p", {{"a", desired(want, "")}},
                {{"a", obs(Observed::Health::Running, base("a"), "")}}, keep);
  CHECK(n.actions[0].kind == ActionKind::Noop);
  CHECK(mentions(n.actions[0], "not applied (--no-recreate): memory"));
  Plan stopped = plan("p", {{"a", desired(want, "")}},
                      {{"a", obs(Observed::Health::Stopped, base("a"), "")}}, keep);
  CHECK(stopped.actions[0].kind == ActionKind::Start);
}

TEST_CASE("orphans are reported, and removed only with --remove-orphans") {
  std::map<std::string, Observed> have = {{"a", obs(Observed::Health::Running, base("a"), "")},
                                          {"old", obs(Observed::Health::Running, base("old"), "")}};
  Plan keep = plan("p", {{"a", desired(base("a"), "")}}, have, {});
  CHECK(keep.orphans == std::vector<std::string>{"old"});
  CHECK_FALSE(keep.hasChanges());
  CHECK(renderPlan(keep).find("! orphan old") != std::string::npos);
  PlanOptions rm;
  rm.remove_orphans = true;
  Plan removed = plan("p", {{"a", desired(base("a"), "")}}, have, rm);
  REQUIRE(removed.actions.size() == 2);
  CHECK(removed.actions[1].kind == ActionKind::Remove);
  CHECK(removed.actions[1].sandbox == "old");
  CHECK(removed.hasChanges());
}

TEST_CASE("dependencies come first; `only` pulls in what a sandbox depends on") {
  spec::SandboxSpec web = base("web");
  web.depends_on = {"db", "cache"};
  spec::SandboxSpec cache = base("cache");
  cache.depends_on = {"db"};
  std::map<std::string, Desired> want = {{"web", desired(web, "")},
                                         {"db", desired(base("db"), "")},
                                         {"cache", desired(cache, "")},
                                         {"solo", desired(base("solo"), "")}};
  Plan all = plan("p", want, {}, {});
  std::vector<std::string> order;
  for (const auto& a : all.actions) {
    order.push_back(a.sandbox);
  }
  CHECK(order == std::vector<std::string>{"db", "cache", "solo", "web"});
  PlanOptions only;
  only.only = {"web"};
  std::map<std::string, Observed> have = {
      {"stray", obs(Observed::Health::Running, base("stray"), "")}};
  Plan some = plan("p", want, have, only);
  order.clear();
  for (const auto& a : some.actions) {
    order.push_back(a.sandbox);
  }
  CHECK(order == std::vector<std::string>{"db", "cache", "web"});
  CHECK(some.orphans.empty());  // orphans are judged only on a whole-project up
}

TEST_CASE("plan rendering and JSON") {
  spec::SandboxSpec want = base("a");
  want.memory_mib = 1024;
  Plan p = plan("proj", {{"a", desired(want, "")}, {"b", desired(base("b"), "")}},
                {{"a", obs(Observed::Health::Running, base("a"), "")}}, {});
  std::string text = renderPlan(p);
  CHECK(text.find("-/+ recreate a\n      memory: 512 MiB → 1024 MiB\n") != std::string::npos);
  CHECK(text.find("+ create b\n") != std::string::npos);
  CHECK(text.find("1 to create, 1 to recreate") != std::string::npos);
  auto j = planToJson(p);
  CHECK(j["changes"] == true);
  CHECK(j["actions"][0]["action"] == "recreate");
  Plan none = plan("proj", {{"b", desired(base("b"), "")}},
                   {{"b", obs(Observed::Health::Running, base("b"), "")}}, {});
  CHECK(renderPlan(none).find("up to date") != std::string::npos);
}

TEST_CASE("an image digest change recreates; an unknown digest does not") {
  spec::SandboxSpec s = base("a");
  Plan moved =
      plan("p", {{"a", desired(s, "", "sha256:bbbbbbbbbbbbbbbbbbbbbbbb")}},
           {{"a", obs(Observed::Health::Running, s, "", "sha256:aaaaaaaaaaaaaaaaaaaaaaaa")}}, {});
  REQUIRE(moved.actions.size() == 1);
  CHECK(moved.actions[0].kind == ActionKind::Recreate);
  CHECK(mentions(moved.actions[0],
                 "image digest changed: sha256:aaaaaaaaaaaa → sha256:bbbbbbbbbbbb"));
  Plan unknown = plan("p", {{"a", desired(s, "", "")}},
                      {{"a", obs(Observed::Health::Running, s, "", "sha256:aaaa")}}, {});
  CHECK(unknown.actions[0].kind == ActionKind::Noop);
  Plan legacy = plan("p", {{"a", desired(s, "", "sha256:bbbb")}},
                     {{"a", obs(Observed::Health::Running, s, "", "")}}, {});
  CHECK(legacy.actions[0].kind == ActionKind::Noop);
}

TEST_CASE("an observed detail is the repair reason") {
  spec::SandboxSpec s = base("a");
  Observed o = obs(Observed::Health::Leaked, s, "");
  o.detail = "run dir /x/vm-1 is gone";
  Plan p = plan("p", {{"a", desired(s, "")}}, {{"a", o}}, {});
  CHECK(p.actions[0].kind == ActionKind::Recreate);
  CHECK(p.actions[0].reasons.front() == "run dir /x/vm-1 is gone");
}
