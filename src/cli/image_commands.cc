// SPDX-License-Identifier: Apache-2.0
// `pull` and `image import|ls|rm|gc|inspect|rootfs`.
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <memory>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "common/fd.h"
#include "image/archive.h"
#include "image/image.h"
#include "image/manifest.h"
#include "image/reference.h"
#include "image/registry.h"
#include "image/rootfs.h"
#include "image/store.h"

namespace matchlock::cli {
namespace {

struct PullCliOptions {
  std::string reference;
  std::string platform = "linux/amd64";
  bool insecure = false;
  std::string ca_file;
  std::string docker_config;
  bool quiet = false;
  bool no_rootfs = false;
  bool force = false;
  std::string tag;
  std::string output = "human";
  int parallel = 4;
};

struct ImportCliOptions {
  std::string name;
  std::string file;
  std::string platform = "linux/amd64";
  std::string output = "human";
  bool no_rootfs = false;
};

struct ListCliOptions {
  std::string output = "human";
};

struct NamesCliOptions {
  std::vector<std::string> names;
};

Result<image::Store> openStore() {
  ML_ASSIGN_OR_RETURN(std::string root, image::Store::defaultRoot());
  return image::Store::open(root);
}

nlohmann::ordered_json recordJson(const image::ImageRecord& r, const std::string& rootfs) {
  nlohmann::ordered_json j;
  j["name"] = r.name;
  j["digest"] = r.manifest_digest;
  j["config_digest"] = r.config_digest;
  j["source"] = r.source;
  j["platform"] = r.platform;
  j["size"] = r.size;
  j["created_at"] = r.created_at;
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  for (const image::LayerRecord& l : r.layers) {
    layers.push_back({{"digest", l.digest}, {"media_type", l.media_type}, {"size", l.size}});
  }
  j["layers"] = layers;
  if (!rootfs.empty()) {
    j["rootfs"] = rootfs;
  }
  return j;
}

void printRecord(const image::ImageRecord& r, const std::string& rootfs,
                 const std::string& output) {
  if (output == "json") {
    fmt::print("{}\n", recordJson(r, rootfs).dump(2));
    return;
  }
  fmt::print("Digest: {}\nLayers: {}\nSize: {:.1f} MB\n", r.manifest_digest, r.layers.size(),
             static_cast<double>(r.size) / 1e6);
  if (!rootfs.empty()) {
    fmt::print("Rootfs: {}\n", rootfs);
  }
}

// Builds the rootfs of a just-stored image. Content the builder rejects (a hostile or malformed
// layer) drops the record again, so a broken image is never listed as usable.
Result<std::string> buildRootfsOrDrop(image::Store& store, const image::ImageRecord& record,
                                      const std::string& alias = "") {
  auto rootfs = image::ensureRootfs(store, record);
  if (!rootfs && rootfs.error().code() == Errc::InvalidSpec) {
    for (const std::string& name : {record.name, alias}) {
      if (!name.empty()) {
        (void)store.removeImage(name);
      }
    }
    (void)store.gc();
  }
  return rootfs;
}

Status runPull(const PullCliOptions& o) {
  ML_ASSIGN_OR_RETURN(image::Reference ref,
                      image::parseReference(o.reference, image::defaultRegistry()));
  image::PullOptions options;
  ML_ASSIGN_OR_RETURN(options.platform, image::parsePlatform(o.platform));
  options.insecure = o.insecure;
  options.ca_file = o.ca_file;
  options.docker_config = o.docker_config;
  options.parallel = o.parallel;
  image::applyEnvironment(options);
  if (o.quiet || o.output == "json") {
    options.progress = image::ProgressMode::Quiet;
  }
  std::string alias;
  if (!o.tag.empty()) {
    ML_ASSIGN_OR_RETURN(alias, image::normalizeLocalName(o.tag));
  }
  ML_ASSIGN_OR_RETURN(image::Store store, openStore());
  if (!o.quiet && o.output != "json") {
    fmt::print(stderr, "Pulling {}...\n", ref.str());
  }
  ML_ASSIGN_OR_RETURN(image::ImageRecord record, image::pullImage(store, ref, options));
  if (!alias.empty()) {
    image::ImageRecord tagged = record;
    tagged.name = alias;
    tagged.source = "tag";
    tagged.created_at.clear();
    ML_RETURN_IF_ERROR(store.saveImage(tagged));
    if (!o.quiet && o.output != "json") {
      fmt::print("Tagged: {}\n", alias);
    }
  }
  std::string rootfs;
  if (!o.no_rootfs) {
    ML_ASSIGN_OR_RETURN(rootfs, buildRootfsOrDrop(store, record, alias));
  }
  if (o.quiet) {
    fmt::print("{}\n", record.manifest_digest);
    return ok();
  }
  printRecord(record, rootfs, o.output);
  return ok();
}

Status runImport(const ImportCliOptions& o) {
  ML_ASSIGN_OR_RETURN(std::string name, image::normalizeLocalName(o.name));
  ML_ASSIGN_OR_RETURN(image::Platform platform, image::parsePlatform(o.platform));
  Fd file;
  int fd = STDIN_FILENO;
  if (!o.file.empty() && o.file != "-") {
    ML_ASSIGN_OR_RETURN(file, openFile(o.file, O_RDONLY));
    fd = file.get();
  } else if (::isatty(STDIN_FILENO) == 1) {
    return makeError(Errc::InvalidSpec,
                     "image import reads a tar archive from stdin (or --file); stdin is a "
                     "terminal");
  }
  ML_ASSIGN_OR_RETURN(image::Store store, openStore());
  if (o.output != "json") {
    fmt::print(stderr, "Importing {}...\n", name);
  }
  ML_ASSIGN_OR_RETURN(image::ImageRecord record, image::importArchive(store, fd, name, platform));
  std::string rootfs;
  if (!o.no_rootfs) {
    ML_ASSIGN_OR_RETURN(rootfs, buildRootfsOrDrop(store, record));
  }
  if (o.output != "json") {
    fmt::print("Imported: {}\n", record.name);
  }
  printRecord(record, rootfs, o.output);
  return ok();
}

Status runList(const ListCliOptions& o) {
  ML_ASSIGN_OR_RETURN(image::Store store, openStore());
  ML_ASSIGN_OR_RETURN(std::vector<image::ImageRecord> images, store.listImages());
  if (o.output == "json") {
    nlohmann::ordered_json out = nlohmann::ordered_json::array();
    for (const image::ImageRecord& r : images) {
      out.push_back(recordJson(r, ""));
    }
    fmt::print("{}\n", out.dump(2));
    return ok();
  }
  fmt::print("{:<50} {:<9} {:<20} {:>10} {}\n", "TAG", "SOURCE", "DIGEST", "SIZE", "CREATED");
  for (const image::ImageRecord& r : images) {
    fmt::print("{:<50} {:<9} {:<20} {:>7.1f} MB {}\n", r.name, r.source,
               r.manifest_digest.substr(0, 19), static_cast<double>(r.size) / 1e6, r.created_at);
  }
  return ok();
}

Status runRemove(const NamesCliOptions& o) {
  ML_ASSIGN_OR_RETURN(image::Store store, openStore());
  for (const std::string& name : o.names) {
    ML_RETURN_IF_ERROR(store.removeImage(name));
    fmt::print("Removed {}\n", name);
  }
  ML_ASSIGN_OR_RETURN(image::GcReport report, store.gc());
  (void)report;
  return ok();
}

Status runGc() {
  ML_ASSIGN_OR_RETURN(image::Store store, openStore());
  ML_ASSIGN_OR_RETURN(image::GcReport report, store.gc());
  fmt::print("Removed {} unreferenced blobs, {} rootfs disks, {} temp files ({:.1f} MB)\n",
             report.removed_blobs, report.removed_rootfs, report.removed_temp,
             static_cast<double>(report.freed_bytes) / 1e6);
  return ok();
}

Status runInspect(const NamesCliOptions& o) {
  ML_ASSIGN_OR_RETURN(image::Store store, openStore());
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const std::string& name : o.names) {
    ML_ASSIGN_OR_RETURN(image::ImageRecord r, store.resolveImage(name));
    ML_ASSIGN_OR_RETURN(image::ImageConfig config, image::loadImageConfig(store, r));
    nlohmann::ordered_json j = recordJson(r, "");
    j["config"] = nlohmann::ordered_json::parse(image::imageConfigToJson(config));
    out.push_back(std::move(j));
  }
  fmt::print("{}\n", out.size() == 1 ? out[0].dump(2) : out.dump(2));
  return ok();
}

Status runRootfs(const NamesCliOptions& o) {
  ML_ASSIGN_OR_RETURN(image::Store store, openStore());
  for (const std::string& name : o.names) {
    ML_ASSIGN_OR_RETURN(image::ImageRecord r, store.resolveImage(name));
    ML_ASSIGN_OR_RETURN(std::string path, image::ensureRootfs(store, r));
    fmt::print("{}\n", path);
  }
  return ok();
}

}  // namespace

void addImageCommands(CLI::App& app, CommandContext& ctx) {
  auto pull = std::make_shared<PullCliOptions>();
  CLI::App* p =
      app.add_subcommand("pull", "Pull an image from an OCI registry and build its rootfs");
  p->add_option("reference", pull->reference, "host[:port]/repo[:tag|@sha256:...]")->required();
  p->add_option("--platform", pull->platform, "os/arch[/variant] (default linux/amd64)");
  p->add_flag("--insecure", pull->insecure,
              "plain HTTP (also MATCHLOCK_INSECURE_REGISTRIES=host:port,...)");
  p->add_option("--ca-file", pull->ca_file, "CA bundle for the registry (MATCHLOCK_CA_BUNDLE)");
  p->add_option("--docker-config", pull->docker_config,
                "Docker config with credentials (default ~/.docker/config.json)");
  p->add_option("--parallel", pull->parallel, "concurrent layer downloads")
      ->check(CLI::Range(1, 16));
  p->add_flag("-q,--quiet", pull->quiet, "print only the digest");
  p->add_flag("--no-rootfs", pull->no_rootfs, "do not build the rootfs disk");
  p->add_option("-t,--tag", pull->tag, "also record the image under this local NAME[:TAG]");
  p->add_flag("--force", pull->force,
              "accepted for upstream compatibility: pull always asks the registry");
  p->add_option("-o,--output", pull->output, "human or json")
      ->check(CLI::IsMember({"human", "json"}));
  p->callback([pull, &ctx] { ctx.finish(runPull(*pull)); });

  CLI::App* img = app.add_subcommand("image", "Manage local images");
  img->require_subcommand(1);

  auto imp = std::make_shared<ImportCliOptions>();
  CLI::App* i = img->add_subcommand(
      "import", "Import a docker-save or OCI-layout tar archive from stdin as NAME[:TAG]");
  i->add_option("name", imp->name, "NAME[:TAG]")->required();
  i->add_option("-f,--file", imp->file, "read the archive from this file instead of stdin");
  i->add_option("--platform", imp->platform, "platform to pick from a multi-platform archive");
  i->add_flag("--no-rootfs", imp->no_rootfs, "do not build the rootfs disk");
  i->add_option("-o,--output", imp->output, "human or json")
      ->check(CLI::IsMember({"human", "json"}));
  i->callback([imp, &ctx] { ctx.finish(runImport(*imp)); });

  auto ls = std::make_shared<ListCliOptions>();
  CLI::App* l = img->add_subcommand("ls", "List images");
  l->alias("list");
  l->add_option("-o,--output", ls->output, "human or json")
      ->check(CLI::IsMember({"human", "json"}));
  l->callback([ls, &ctx] { ctx.finish(runList(*ls)); });

  auto rm = std::make_shared<NamesCliOptions>();
  CLI::App* r = img->add_subcommand("rm", "Remove images (and blobs nothing else uses)");
  r->alias("remove");
  r->add_option("names", rm->names, "image names")->required();
  r->callback([rm, &ctx] { ctx.finish(runRemove(*rm)); });

  CLI::App* g = img->add_subcommand("gc", "Delete blobs and rootfs disks no image references");
  g->callback([&ctx] { ctx.finish(runGc()); });

  auto inspect = std::make_shared<NamesCliOptions>();
  CLI::App* in = img->add_subcommand("inspect", "Show an image's record and runtime config (JSON)");
  in->add_option("names", inspect->names, "image names")->required();
  in->callback([inspect, &ctx] { ctx.finish(runInspect(*inspect)); });

  auto rootfs = std::make_shared<NamesCliOptions>();
  CLI::App* rf = img->add_subcommand("rootfs", "Build (if needed) and print the rootfs disk path");
  rf->add_option("names", rootfs->names, "image names")->required();
  rf->callback([rootfs, &ctx] { ctx.finish(runRootfs(*rootfs)); });
}

}  // namespace matchlock::cli
