// SPDX-License-Identifier: Apache-2.0
#include "reconcile/plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <functional>

#include "common/strings.h"
#include "spec/normalize.h"

namespace matchlock::reconcile {
namespace {

using spec::ChangeClass;
using spec::SandboxSpec;

std::string cpus(double c) {
  return fmt::format("{:g}", c);
}

/// "+a, -b, ~c" for two maps, by key; values compared but never printed.
template <class Map>
std::string keyDiff(const Map& before, const Map& after) {
  std::vector<std::string> parts;
  for (const auto& [k, v] : after) {
    auto it = before.find(k);
    if (it == before.end()) {
      parts.push_back("+" + k);
    } else if (!(it->second == v)) {
      parts.push_back("~" + k);
    }
  }
  for (const auto& [k, v] : before) {
    if (!after.contains(k)) {
      parts.push_back("-" + k);
    }
  }
  return join(parts, ", ");
}

std::string listDiff(const std::vector<std::string>& before,
                     const std::vector<std::string>& after) {
  std::vector<std::string> parts;
  for (const auto& a : after) {
    if (std::ranges::find(before, a) == before.end()) {
      parts.push_back("+" + a);
    }
  }
  for (const auto& b : before) {
    if (std::ranges::find(after, b) == after.end()) {
      parts.push_back("-" + b);
    }
  }
  return parts.empty() ? "reordered" : join(parts, ", ");
}

template <class T>
void change(std::vector<std::string>& out, std::string_view field, const T& before, const T& after,
            const std::function<std::string(const T&)>& show) {
  if (!(before == after)) {
    out.push_back(fmt::format("{}: {} → {}", field, show(before), show(after)));
  }
}

/// "sha256:0123456789ab" (12 hex digits, like docker's short ids).
std::string shortDigest(const std::string& digest) {
  size_t colon = digest.find(':');
  size_t keep = colon == std::string::npos ? 12 : colon + 13;
  return digest.substr(0, keep);
}

std::string optString(const std::optional<std::string>& v) {
  return v ? *v : "(image default)";
}

std::string mountKey(const spec::Mount& m) {
  return m.target;
}

std::string portKey(const spec::PortForward& p) {
  return fmt::format("{}:{}→{}/{}", p.address, p.host, p.guest, p.protocol);
}

const char* healthReason(Observed::Health h) {
  switch (h) {
    case Observed::Health::Crashed:
      return "supervisor died (pid and start time no longer match a live process)";
    case Observed::Health::VmmDied:
      return "VM process died";
    case Observed::Health::Leaked:
      return "owned resources went missing (TAP, disk or run dir)";
    case Observed::Health::Failed:
      return "last apply failed";
    case Observed::Health::Pending:
      return "an earlier apply was interrupted";
    case Observed::Health::Unhealthy:
      return "unhealthy (healthcheck failing)";
    case Observed::Health::Running:
    case Observed::Health::Stopped:
      break;
  }
  return "";
}

ChangeClass classOf(const std::string& group) {
  for (const auto& g : spec::fieldGroups()) {
    if (group == g.name) {
      return g.change;
    }
  }
  return ChangeClass::Recreate;  // unknown groups are treated conservatively
}

}  // namespace

std::string_view toString(ActionKind kind) {
  switch (kind) {
    case ActionKind::Create:
      return "create";
    case ActionKind::Recreate:
      return "recreate";
    case ActionKind::UpdateLive:
      return "update";
    case ActionKind::Start:
      return "start";
    case ActionKind::Noop:
      return "noop";
    case ActionKind::Remove:
      return "remove";
  }
  return "noop";
}

bool Plan::hasChanges() const {
  return std::ranges::any_of(actions, [](const Action& a) { return a.kind != ActionKind::Noop; });
}

std::map<std::string, std::vector<std::string>> diffSpecs(const SandboxSpec& a,
                                                          const SandboxSpec& b) {
  std::map<std::string, std::vector<std::string>> out;
  auto str = [](const std::string& s) { return s; };
  auto num = [](const int64_t& v) { return fmt::format("{} MiB", v); };
  auto boolean = [](const bool& v) { return std::string(v ? "true" : "false"); };

  change<std::string>(out["image"], "image", a.image, b.image, str);

  auto& res = out["resources"];
  change<double>(res, "cpus", a.cpus, b.cpus, cpus);
  change<int64_t>(res, "memory", a.memory_mib, b.memory_mib, num);
  change<int64_t>(res, "disk", a.disk_mib, b.disk_mib, num);

  if (a.env != b.env) {
    out["env"].push_back("env: " + keyDiff(a.env, b.env));
  }

  auto& proc = out["process"];
  change<std::optional<std::string>>(proc, "workdir", a.workdir, b.workdir, optString);
  change<std::optional<std::string>>(proc, "user", a.user, b.user, optString);
  if (a.command != b.command) {
    proc.emplace_back("command changed");
  }
  if (a.entrypoint != b.entrypoint) {
    proc.emplace_back("entrypoint changed");
  }
  change<std::string>(proc, "hostname", a.hostname, b.hostname, str);
  change<bool>(proc, "privileged", a.privileged, b.privileged, boolean);

  if (a.mounts != b.mounts) {
    std::map<std::string, spec::Mount> before;
    std::map<std::string, spec::Mount> after;
    for (const auto& m : a.mounts) {
      before[mountKey(m)] = m;
    }
    for (const auto& m : b.mounts) {
      after[mountKey(m)] = m;
    }
    std::string d = keyDiff(before, after);
    out["mounts"].push_back("mounts: " + (d.empty() ? "reordered" : d));
  }

  auto& net = out["network_config"];
  change<bool>(net, "no_network", a.network.no_network, b.network.no_network, boolean);
  if (a.network.dns_servers != b.network.dns_servers) {
    net.push_back("dns_servers: " + listDiff(a.network.dns_servers, b.network.dns_servers));
  }
  if (a.network.add_hosts != b.network.add_hosts) {
    net.push_back("add_hosts: " + keyDiff(a.network.add_hosts, b.network.add_hosts));
  }
  change<int>(net, "mtu", a.network.mtu, b.network.mtu,
              [](const int& v) { return std::to_string(v); });
  change<std::string>(net, "upstream_ca", a.network.upstream_ca, b.network.upstream_ca, str);

  auto& egress = out["egress"];
  if (a.network.allow_hosts != b.network.allow_hosts) {
    egress.push_back("allow_hosts: " + listDiff(a.network.allow_hosts, b.network.allow_hosts));
  }
  change<bool>(egress, "block_private_ips", a.network.block_private_ips,
               b.network.block_private_ips, boolean);
  change<bool>(egress, "intercept", a.network.intercept, b.network.intercept, boolean);
  if (a.network.rules != b.network.rules) {
    egress.push_back(fmt::format("interception.rules changed ({} → {} rules)",
                                 a.network.rules.size(), b.network.rules.size()));
  }
  change<std::string>(egress, "interception.callback_socket", a.network.callback_socket,
                      b.network.callback_socket, str);

  if (a.secrets != b.secrets) {
    std::map<std::string, spec::SecretRef> before;
    std::map<std::string, spec::SecretRef> after;
    for (const auto& s : a.secrets) {
      before[s.name] = s;
    }
    for (const auto& s : b.secrets) {
      after[s.name] = s;
    }
    std::string d = keyDiff(before, after);
    // (No std::views::keys: clang 14 cannot compile libstdc++ 12's ranges.)
    const bool names_changed =
        before.size() != after.size() ||
        !std::equal(before.begin(), before.end(), after.begin(),
                    [](const auto& x, const auto& y) { return x.first == y.first; });
    out[names_changed ? "secret_names" : "secrets"].push_back("secrets: " +
                                                              (d.empty() ? "reordered" : d));
  }

  if (a.ports != b.ports) {
    std::vector<std::string> before;
    std::vector<std::string> after;
    for (const auto& p : a.ports) {
      before.push_back(portKey(p));
    }
    for (const auto& p : b.ports) {
      after.push_back(portKey(p));
    }
    out["ports"].push_back("ports: " + listDiff(before, after));
  }

  auto& meta = out["meta"];
  if (a.labels != b.labels) {
    meta.push_back("labels: " + keyDiff(a.labels, b.labels));
  }
  if (a.depends_on != b.depends_on) {
    meta.push_back("depends_on: " + listDiff(a.depends_on, b.depends_on));
  }
  if (a.restart != b.restart) {
    meta.push_back(
        fmt::format("restart: {} → {}", spec::toString(a.restart), spec::toString(b.restart)));
  }
  if (a.healthcheck != b.healthcheck) {
    out["healthcheck"].emplace_back(!a.healthcheck   ? "healthcheck: added"
                                    : !b.healthcheck ? "healthcheck: removed"
                                                     : "healthcheck changed");
  }

  for (auto it = out.begin(); it != out.end();) {
    it = it->second.empty() ? out.erase(it) : std::next(it);
  }
  return out;
}

Plan plan(const std::string& project, const std::map<std::string, Desired>& desired,
          const std::map<std::string, Observed>& observed, const PlanOptions& options) {
  Plan result;
  result.project = project;

  // Which desired sandboxes are in scope: `only` plus everything they depend on.
  std::set<std::string> scope;
  if (options.only.empty()) {
    for (const auto& [name, d] : desired) {
      scope.insert(name);
    }
  } else {
    std::function<void(const std::string&)> add = [&](const std::string& name) {
      auto it = desired.find(name);
      if (it == desired.end() || !scope.insert(name).second) {
        return;
      }
      for (const std::string& dep : it->second.spec.depends_on) {
        add(dep);
      }
    };
    for (const std::string& name : options.only) {
      add(name);
    }
  }

  // Dependencies first: depth-first post-order over depends_on, names in order (the decoder has
  // already rejected cycles; `visiting` only guards against looping on bad input).
  std::vector<std::string> order;
  std::set<std::string> done;
  std::set<std::string> visiting;
  std::function<void(const std::string&)> visit = [&](const std::string& name) {
    if (done.contains(name) || !scope.contains(name) || !visiting.insert(name).second) {
      return;
    }
    for (const std::string& dep : desired.at(name).spec.depends_on) {
      visit(dep);
    }
    visiting.erase(name);
    done.insert(name);
    order.push_back(name);
  };
  for (const std::string& name : scope) {
    visit(name);
  }

  for (const std::string& name : order) {
    const Desired& want = desired.at(name);
    Action action;
    action.sandbox = name;
    auto obs_it = observed.find(name);
    if (obs_it == observed.end()) {
      action.kind = ActionKind::Create;
      result.actions.push_back(std::move(action));
      continue;
    }
    const Observed& have = obs_it->second;

    // Which field groups changed, and why.
    auto before = spec::groupHashes(have.applied);
    auto after = spec::groupHashes(want.spec);
    auto reasons = diffSpecs(have.applied, want.spec);
    std::set<std::string> changed;
    for (const auto& [group, hash] : after) {
      if (before[group] != hash) {
        changed.insert(group);
        if (reasons[group].empty()) {
          reasons[group].push_back(group + " changed");
        }
      }
    }
    if (!want.image_digest.empty() && !have.image_digest.empty() &&
        want.image_digest != have.image_digest) {
      changed.insert("image");
      reasons["image"].push_back(fmt::format("image digest changed: {} → {}",
                                             shortDigest(have.image_digest),
                                             shortDigest(want.image_digest)));
    }
    if (!want.secrets_hash.empty() && !have.secrets_hash.empty() &&
        want.secrets_hash != have.secrets_hash) {
      changed.insert("secrets");
      reasons["secrets"].emplace_back("secret values rotated");
    }

    bool needs_recreate = false;
    std::vector<std::string> live;
    std::vector<std::string> lines;
    for (const std::string& group : changed) {
      ChangeClass cls = classOf(group);
      bool live_ok = cls == ChangeClass::Ignored || options.live_supported.contains(group);
      for (const std::string& r : reasons[group]) {
        if (cls == ChangeClass::Live && !live_ok) {
          lines.push_back(r + " (no live update for " + group + " yet: recreate)");
        } else if (cls == ChangeClass::Ignored) {
          lines.push_back(r + " (recorded, no restart)");
        } else {
          lines.push_back(r);
        }
      }
      if (cls == ChangeClass::Recreate || !live_ok) {
        needs_recreate = true;
      } else {
        live.push_back(group);
      }
    }

    std::string health = have.detail.empty() ? healthReason(have.health) : have.detail;
    if (have.health != Observed::Health::Running && have.health != Observed::Health::Stopped) {
      // Repairs happen even with --no-recreate: the sandbox is not running as declared.
      action.kind = ActionKind::Recreate;
      action.reasons.push_back(health);
      action.reasons.insert(action.reasons.end(), lines.begin(), lines.end());
    } else if (options.force_recreate) {
      action.kind = ActionKind::Recreate;
      action.reasons.emplace_back("--force-recreate");
      action.reasons.insert(action.reasons.end(), lines.begin(), lines.end());
    } else if (needs_recreate && options.no_recreate) {
      action.kind = have.health == Observed::Health::Stopped ? ActionKind::Start : ActionKind::Noop;
      for (const std::string& l : lines) {
        action.reasons.push_back("not applied (--no-recreate): " + l);
      }
    } else if (needs_recreate) {
      action.kind = ActionKind::Recreate;
      action.reasons = lines;
    } else if (have.health == Observed::Health::Stopped) {
      action.kind = ActionKind::Start;
      action.reasons = lines;
    } else if (!live.empty()) {
      action.kind = ActionKind::UpdateLive;
      action.reasons = lines;
      action.live_groups = live;
    } else {
      action.kind = ActionKind::Noop;
    }
    result.actions.push_back(std::move(action));
  }

  // Orphans: recorded for the project, declared by no spec.
  if (options.only.empty()) {
    for (const auto& [name, have] : observed) {
      if (desired.contains(name)) {
        continue;
      }
      result.orphans.push_back(name);
      if (options.remove_orphans) {
        result.actions.push_back(
            Action{ActionKind::Remove, name, {"not declared by any spec"}, {}});
      }
    }
  }
  return result;
}

std::string renderPlan(const Plan& plan) {
  std::string out;
  int create = 0;
  int recreate = 0;
  int update = 0;
  int start = 0;
  int remove = 0;
  for (const Action& a : plan.actions) {
    const char* sigil = "  ";
    switch (a.kind) {
      case ActionKind::Create:
        sigil = "+ ";
        ++create;
        break;
      case ActionKind::Recreate:
        sigil = "-/+ ";
        ++recreate;
        break;
      case ActionKind::UpdateLive:
        sigil = "~ ";
        ++update;
        break;
      case ActionKind::Start:
        sigil = "> ";
        ++start;
        break;
      case ActionKind::Remove:
        sigil = "- ";
        ++remove;
        break;
      case ActionKind::Noop:
        sigil = "  ";
        break;
    }
    out += fmt::format("{}{} {}\n", sigil, toString(a.kind), a.sandbox);
    for (const std::string& r : a.reasons) {
      out += fmt::format("      {}\n", r);
    }
  }
  for (const std::string& o : plan.orphans) {
    bool removing = std::ranges::any_of(plan.actions, [&](const Action& a) {
      return a.kind == ActionKind::Remove && a.sandbox == o;
    });
    if (!removing) {
      out += fmt::format("! orphan {} (declared by no spec; --remove-orphans removes it)\n", o);
    }
  }
  if (!plan.hasChanges()) {
    out += fmt::format("project {}: up to date\n", plan.project);
  } else {
    out += fmt::format(
        "project {}: {} to create, {} to recreate, {} to update, {} to start, {} to "
        "remove\n",
        plan.project, create, recreate, update, start, remove);
  }
  return out;
}

nlohmann::ordered_json planToJson(const Plan& plan) {
  nlohmann::ordered_json actions = nlohmann::ordered_json::array();
  for (const Action& a : plan.actions) {
    actions.push_back({{"sandbox", a.sandbox},
                       {"action", toString(a.kind)},
                       {"reasons", a.reasons},
                       {"live_groups", a.live_groups}});
  }
  return {{"project", plan.project},
          {"changes", plan.hasChanges()},
          {"actions", actions},
          {"orphans", plan.orphans}};
}

}  // namespace matchlock::reconcile
