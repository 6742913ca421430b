// SPDX-License-Identifier: Apache-2.0
// docs/reconcile.md's field table is the contract of `up`: for every row, changing that field of a
// running sandbox's spec must plan what the row says (live → `~ update` of its group, recreate →
// `-/+ recreate`, recorded → an update that only records), with a reason line, under the live
// groups the real driver applies. Every row needs a mutation here and every mutation a row, and
// the table's groups and classes must be spec::fieldGroups(): the table, the planner and the code
// cannot drift apart.
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include <catch2/catch.hpp>

#include "reconcile/plan.h"
#include "runtime/driver.h"
#include "spec/normalize.h"

using namespace matchlock;  // NOLINT(google-build-using-namespace)
using reconcile::ActionKind;

namespace {

struct Row {
  std::string field;
  std::string group;
  std::string change;
};

std::vector<Row> fieldTable() {
  std::ifstream in(std::string(ML_SOURCE_DIR) + "/docs/reconcile.md");
  REQUIRE(in);
  std::string line;
  bool in_section = false;
  bool in_table = false;
  std::vector<Row> rows;
  while (std::getline(in, line)) {
    if (line.starts_with("## ")) {
      in_section = line == "## Field table";
      in_table = false;
      continue;
    }
    if (!in_section) {
      continue;
    }
    if (line == "| field | group | change |") {
      in_table = true;
      continue;
    }
    if (!in_table || line.starts_with("|---")) {
      continue;
    }
    if (!line.starts_with("|")) {
      in_table = false;
      continue;
    }
    std::vector<std::string> cells;
    std::stringstream ss(line.substr(1));
    std::string cell;
    while (std::getline(ss, cell, '|')) {
      auto b = cell.find_first_not_of(' ');
      auto e = cell.find_last_not_of(' ');
      cells.push_back(b == std::string::npos ? "" : cell.substr(b, e - b + 1));
    }
    REQUIRE(cells.size() == 3);
    rows.push_back({cells[0], cells[1], cells[2]});
  }
  return rows;
}

spec::SandboxSpec baseSpec() {
  spec::SandboxSpec s;
  s.name = "web";
  s.image = "busybox:1";
  s.hostname = "web";
  s.network.allow_hosts = {"a.test"};
  spec::SecretRef key;
  key.name = "KEY";
  key.env_var = "KEY_VALUE";
  key.hosts = {"a.test"};
  s.secrets = {key};
  s.ports = {spec::PortForward{8080, 80, "127.0.0.1", "tcp"}};
  return s;
}

using Mutation = std::function<void(spec::SandboxSpec&, reconcile::Desired&)>;

/// One change per table row, keyed by the row's field text.
std::map<std::string, Mutation> mutations() {
  auto spec = [](std::function<void(spec::SandboxSpec&)> f) -> Mutation {
    return [f](spec::SandboxSpec& s, reconcile::Desired&) { f(s); };
  };
  return {
      {"`image`", spec([](auto& s) { s.image = "busybox:2"; })},
      {"`cpus`", spec([](auto& s) { s.cpus = 2; })},
      {"`memory`", spec([](auto& s) { s.memory_mib = 1024; })},
      {"`disk`", spec([](auto& s) { s.disk_mib = 4096; })},
      {"`env`", spec([](auto& s) { s.env["A"] = "1"; })},
      {"`workdir`", spec([](auto& s) { s.workdir = "/srv"; })},
      {"`user`", spec([](auto& s) { s.user = "nobody"; })},
      {"`command`", spec([](auto& s) {
         s.command = std::vector<std::string>{"sleep", "1"};
       })},
      {"`entrypoint`", spec([](auto& s) { s.entrypoint = std::vector<std::string>{"/bin/sh"}; })},
      {"`hostname`", spec([](auto& s) { s.hostname = "other"; })},
      {"`privileged`", spec([](auto& s) { s.privileged = true; })},
      {"`mounts`", spec([](auto& s) {
         s.mounts.push_back(spec::Mount{"", "/scratch", spec::MountMode::Memory, false, {}, false});
       })},
      {"`network.no_network`", spec([](auto& s) {
         s.network.no_network = true;
         s.network.allow_hosts.clear();
         s.secrets.clear();
       })},
      {"`network.dns_servers`", spec([](auto& s) { s.network.dns_servers = {"192.0.2.53"}; })},
      {"`network.add_hosts`", spec([](auto& s) { s.network.add_hosts["db"] = "192.0.2.7"; })},
      {"`network.mtu`", spec([](auto& s) { s.network.mtu = 1400; })},
      {"`network.intercept`", spec([](auto& s) { s.network.intercept = true; })},
      {"`network.upstream_ca`", spec([](auto& s) { s.network.upstream_ca = "/etc/ca.pem"; })},
      {"`network.allow_hosts`",
       spec([](auto& s) { s.network.allow_hosts.emplace_back("b.test"); })},
      {"`network.block_private_ips`", spec([](auto& s) { s.network.block_private_ips = false; })},
      {"`network.interception.rules`", spec([](auto& s) {
         spec::HttpRule r;
         r.set_headers = {{"X-Team", "agents"}};
         s.network.rules.push_back(r);
       })},
      {"`network.interception.callback_socket`",
       spec([](auto& s) { s.network.callback_socket = "/run/hooks.sock"; })},
      {"`secrets[].hosts`", spec([](auto& s) { s.secrets[0].hosts.emplace_back("b.test"); })},
      {"`secrets[].from_env` / `from_file` / `command`", spec([](auto& s) {
         s.secrets[0].kind = spec::SecretRef::Kind::File;
         s.secrets[0].env_var.clear();
         s.secrets[0].file = "/run/key";
       })},
      {"secret values (rotation)",
       [](spec::SandboxSpec&, reconcile::Desired& d) { d.secrets_hash = "rotated"; }},
      {"`secrets[].name` (a secret added or removed)", spec([](auto& s) {
         spec::SecretRef other = s.secrets[0];
         other.name = "OTHER";
         s.secrets.push_back(other);
       })},
      {"`ports`", spec([](auto& s) { s.ports[0].host = 9090; })},
      {"`labels`", spec([](auto& s) { s.labels["team"] = "x"; })},
      {"`depends_on`", spec([](auto& s) { s.depends_on = {"db"}; })},
      {"`restart`", spec([](auto& s) { s.restart = spec::RestartPolicy::Always; })},
      {"`healthcheck`", spec([](auto& s) {
         s.healthcheck = spec::Healthcheck{{"CMD", "true"}};
       })},
  };
}

std::string className(spec::ChangeClass c) {
  switch (c) {
    case spec::ChangeClass::Live:
      return "live";
    case spec::ChangeClass::Recreate:
      return "recreate";
    case spec::ChangeClass::Ignored:
      return "recorded";
  }
  return "?";
}

}  // namespace

TEST_CASE("the field table's groups and classes are spec::fieldGroups()", "[reconcile][table]") {
  auto rows = fieldTable();
  REQUIRE(rows.size() > 20);
  std::map<std::string, std::string> table_class;
  for (const auto& r : rows) {
    auto [it, fresh] = table_class.emplace(r.group, r.change);
    INFO(r.field);
    CHECK(it->second == r.change);  // one class per group
  }
  std::map<std::string, std::string> code_class;
  for (const auto& g : spec::fieldGroups()) {
    code_class[g.name] = className(g.change);
  }
  CHECK(table_class == code_class);
}

TEST_CASE("every field table row plans what it says", "[reconcile][table]") {
  auto rows = fieldTable();
  auto muts = mutations();
  std::set<std::string> covered;
  reconcile::PlanOptions po;
  po.live_supported = runtime::SandboxDriver::liveGroups();
  for (const auto& row : rows) {
    INFO("row: " << row.field << " | " << row.group << " | " << row.change);
    auto m = muts.find(row.field);
    REQUIRE(m != muts.end());  // a row without a mutation: add one above
    covered.insert(row.field);

    reconcile::Observed have;
    have.health = reconcile::Observed::Health::Running;
    have.applied = baseSpec();
    have.secrets_hash = "values-1";
    reconcile::Desired want;
    want.spec = baseSpec();
    want.secrets_hash = "values-1";
    m->second(want.spec, want);

    auto plan = reconcile::plan("demo", {{"web", want}}, {{"web", have}}, po);
    REQUIRE(plan.actions.size() == 1);
    const auto& a = plan.actions[0];
    INFO("planned: " << reconcile::toString(a.kind));
    REQUIRE_FALSE(a.reasons.empty());
    if (row.change == "recreate") {
      CHECK(a.kind == ActionKind::Recreate);
    } else {
      REQUIRE(a.kind == ActionKind::UpdateLive);
      CHECK(a.live_groups == std::vector<std::string>{row.group});
      if (row.change == "recorded") {
        CHECK(a.reasons[0].find("(recorded, no restart)") != std::string::npos);
      }
    }
    // The diff names the field's group (rotation is found by the planner, not by a spec diff).
    if (row.field != "secret values (rotation)") {
      CHECK(reconcile::diffSpecs(have.applied, want.spec).contains(row.group));
    }
  }
  for (const auto& [field, m] : muts) {
    INFO("mutation without a table row: " << field);
    CHECK(covered.contains(field));
  }
}
