// SPDX-License-Identifier: Apache-2.0
// Named volumes: `volume create|ls|rm|cp`, upstream's commands, texts and JSON shapes (reference
// §1.6). The volumes are sparse ext4 images under <cache>/volumes (docs/vm-runtime.md).
#include <fmt/format.h>

#include <memory>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "runtime/volumes.h"
#include "state/store.h"

namespace matchlock::cli {
namespace {

struct VolumeCliOptions {
  std::string name;
  std::string dest;
  int64_t size_mib = runtime::kDefaultVolumeMib;
  bool json = false;
  std::string output = "human";
  bool wantsJson() const { return json || output == "json"; }
};

nlohmann::ordered_json infoJson(const runtime::VolumeInfo& v) {
  return {{"name", v.name}, {"size", runtime::formatVolumeSize(v.size_bytes)}, {"path", v.path}};
}

Status runCreate(const VolumeCliOptions& o) {
  ML_ASSIGN_OR_RETURN(runtime::VolumeInfo v, runtime::createVolume(o.name, o.size_mib));
  if (o.wantsJson()) {
    fmt::print("{}\n", infoJson(v).dump(2));
  } else {
    fmt::print("Created volume {} ({} MB)\n", v.name, o.size_mib);
  }
  return ok();
}

Status runList(const VolumeCliOptions& o) {
  ML_ASSIGN_OR_RETURN(std::vector<runtime::VolumeInfo> volumes, runtime::listVolumes());
  if (o.wantsJson()) {
    nlohmann::ordered_json out = nlohmann::ordered_json::array();
    for (const auto& v : volumes) {
      out.push_back(infoJson(v));
    }
    fmt::print("{}\n", out.dump(2));
    return ok();
  }
  fmt::print("{:<32} {}\n", "NAME", "SIZE");
  for (const auto& v : volumes) {
    fmt::print("{:<32} {}\n", v.name, runtime::formatVolumeSize(v.size_bytes));
  }
  return ok();
}

Status runRemove(const VolumeCliOptions& o) {
  ML_ASSIGN_OR_RETURN(auto store, state::Store::openDefault());
  ML_RETURN_IF_ERROR(runtime::removeVolume(store, o.name));
  if (o.wantsJson()) {
    fmt::print("{}\n", nlohmann::ordered_json{{"name", o.name}, {"removed", true}}.dump(2));
  } else {
    fmt::print("Removed volume {}\n", o.name);
  }
  return ok();
}

Status runCopy(const VolumeCliOptions& o) {
  ML_ASSIGN_OR_RETURN(runtime::VolumeInfo v, runtime::copyVolume(o.name, o.dest));
  if (o.wantsJson()) {
    fmt::print("{}\n", infoJson(v).dump(2));
  } else {
    fmt::print("Copied volume {} to {}\n", o.name, o.dest);
  }
  return ok();
}

void addOutputFlags(CLI::App* c, VolumeCliOptions& o) {
  c->add_flag("--json", o.json, "JSON output (upstream's flag)");
  c->add_option("-o,--output", o.output, "human or json")->check(CLI::IsMember({"human", "json"}));
}

}  // namespace

void addVolumeCommands(CLI::App& app, CommandContext& ctx) {
  CLI::App* vol = app.add_subcommand("volume", "Manage named volumes (persistent ext4 disks)");
  vol->require_subcommand(1);

  auto create = std::make_shared<VolumeCliOptions>();
  CLI::App* c = vol->add_subcommand("create", "Create a named volume (a sparse ext4 image)");
  c->add_option("name", create->name, "volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")->required();
  c->add_option("--size", create->size_mib, "size in MiB (default 10240; sparse)")
      ->check(CLI::PositiveNumber);
  addOutputFlags(c, *create);
  c->callback([create, &ctx] { ctx.finish(runCreate(*create)); });

  auto ls = std::make_shared<VolumeCliOptions>();
  CLI::App* l = vol->add_subcommand("ls", "List named volumes");
  l->alias("list");
  addOutputFlags(l, *ls);
  l->callback([ls, &ctx] { ctx.finish(runList(*ls)); });

  auto rm = std::make_shared<VolumeCliOptions>();
  CLI::App* r = vol->add_subcommand("rm", "Remove a named volume (not while a sandbox uses it)");
  r->alias("remove");
  r->add_option("name", rm->name, "volume name")->required();
  addOutputFlags(r, *rm);
  r->callback([rm, &ctx] { ctx.finish(runRemove(*rm)); });

  auto cp = std::make_shared<VolumeCliOptions>();
  CLI::App* p = vol->add_subcommand("cp", "Copy a named volume to a new one");
  p->alias("copy");
  p->add_option("src", cp->name, "source volume")->required();
  p->add_option("dest", cp->dest, "new volume (must not exist)")->required();
  addOutputFlags(p, *cp);
  p->callback([cp, &ctx] { ctx.finish(runCopy(*cp)); });
}

}  // namespace matchlock::cli
