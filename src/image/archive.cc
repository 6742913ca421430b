// SPDX-License-Identifier: Apache-2.0
// libarchive and nlohmann stay inside this file.
#include "image/archive.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <map>
#include <memory>

#include <nlohmann/json.hpp>

#include "common/cptr.h"
#include "common/strings.h"
#include "image/digest.h"
#include "image/libarchive_util.h"

namespace matchlock::image {
namespace {

constexpr int64_t kKeepInMemory = 4 << 20;

struct Member {
  std::unique_ptr<TempFile> temp;
  Digest digest;
  int64_t size = 0;
  std::string head;  // first bytes (media-type sniffing)
  std::string text;  // whole content when small
};

std::string normalizeMemberName(std::string_view name) {
  while (name.rfind("./", 0) == 0) {
    name.remove_prefix(2);
  }
  while (!name.empty() && name.front() == '/') {
    name.remove_prefix(1);
  }
  return std::string(name);
}

std::string layerMediaType(std::string_view head) {
  if (head.size() >= 2 && static_cast<unsigned char>(head[0]) == 0x1f &&
      static_cast<unsigned char>(head[1]) == 0x8b) {
    return std::string(kMediaOciLayerTar) + "+gzip";
  }
  if (head.size() >= 4 && head.substr(0, 4) == std::string_view("\x28\xb5\x2f\xfd", 4)) {
    return std::string(kMediaOciLayerTar) + "+zstd";
  }
  return std::string(kMediaOciLayerTar);
}

class Importer {
 public:
  Importer(Store& store, std::string name) : store_(store), name_(std::move(name)) {}

  Status readAll(int fd) {
    ArchivePtr a(archive_read_new());
    archive_read_support_filter_all(a.get());
    archive_read_support_format_tar(a.get());
    if (archive_read_open_fd(a.get(), fd, 1 << 16) != ARCHIVE_OK) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("import: not a tar archive: {}", archiveError(a.get())));
    }
    archive_entry* e = nullptr;
    for (;;) {
      int rc = archive_read_next_header(a.get(), &e);
      if (rc == ARCHIVE_EOF) {
        break;
      }
      if (rc < ARCHIVE_WARN) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("import: reading archive: {}", archiveError(a.get())));
      }
      if (archive_entry_filetype(e) != AE_IFREG) {
        continue;
      }
      const char* p = archive_entry_pathname(e);
      std::string name = normalizeMemberName(p != nullptr ? p : "");
      Member m;
      ML_ASSIGN_OR_RETURN(TempFile temp, store_.createTemp("import"));
      m.temp = std::make_unique<TempFile>(std::move(temp));
      Sha256 h;
      std::string buf(1 << 16, '\0');
      for (;;) {
        la_ssize_t n = archive_read_data(a.get(), buf.data(), buf.size());
        if (n < 0) {
          return makeError(Errc::InvalidSpec,
                           fmt::format("import: reading '{}': {}", name, archiveError(a.get())));
        }
        if (n == 0) {
          break;
        }
        std::string_view chunk(buf.data(), static_cast<size_t>(n));
        h.update(chunk);
        if (m.head.size() < 16) {
          m.head += chunk.substr(0, 16 - m.head.size());
        }
        if (m.size + n <= kKeepInMemory) {
          m.text += chunk;
        }
        m.size += n;
        ML_RETURN_IF_ERROR(m.temp->write(chunk));
      }
      if (m.size > kKeepInMemory) {
        m.text.clear();
      }
      m.digest = h.finish();
      members_[name] = std::move(m);
    }
    return ok();
  }

  Result<ImageRecord> finish(const Platform& platform) {
    if (members_.count("index.json") != 0) {
      return finishOci(platform);
    }
    if (members_.count("manifest.json") != 0) {
      return finishDockerSave();
    }
    return makeError(Errc::InvalidSpec,
                     "import: the archive has neither index.json (OCI layout) nor manifest.json "
                     "(docker save)");
  }

 private:
  Result<Member*> member(const std::string& name) {
    auto it = members_.find(normalizeMemberName(name));
    if (it == members_.end()) {
      return makeError(Errc::InvalidSpec, fmt::format("import: archive lacks '{}'", name));
    }
    return &it->second;
  }

  Result<Member*> ociBlob(const std::string& digest_text) {
    ML_ASSIGN_OR_RETURN(Digest d, parseDigest(digest_text));
    ML_ASSIGN_OR_RETURN(Member * m, member(fmt::format("blobs/{}/{}", d.algo, d.hex)));
    if (m->digest != d) {
      return makeError(Errc::InvalidSpec,
                       fmt::format("import: digest mismatch: blobs/{}/{} hashes to {}", d.algo,
                                   d.hex, m->digest.str()));
    }
    return m;
  }

  Status commit(Member& m, const Digest& want) {
    if (store_.hasBlob(want)) {
      return ok();
    }
    if (!m.temp) {
      return makeError(Errc::Internal, "import: blob already committed");
    }
    auto s = store_.commitBlob(*m.temp, m.digest, want);
    if (!s) {
      return makeError(std::move(s).error().withContext("import"));
    }
    return ok();
  }

  Result<ImageRecord> finishOci(const Platform& platform) {
    ML_ASSIGN_OR_RETURN(Member * index_member, member("index.json"));
    ML_ASSIGN_OR_RETURN(Index index, parseIndex(index_member->text));
    auto picked = selectPlatform(index, platform);
    if (!picked && index.manifests.size() == 1) {
      picked = index.manifests.front();
    }
    if (!picked) {
      return makeError(std::move(picked).error().withContext("import"));
    }
    Descriptor desc = *picked;
    ML_ASSIGN_OR_RETURN(Member * mm, ociBlob(desc.digest));
    std::string media = desc.media_type;
    if (isIndexMediaType(media)) {
      ML_ASSIGN_OR_RETURN(Index nested, parseIndex(mm->text));
      auto inner = selectPlatform(nested, platform);
      if (!inner) {
        return makeError(std::move(inner).error().withContext("import"));
      }
      desc = *inner;
      ML_ASSIGN_OR_RETURN(mm, ociBlob(desc.digest));
    }
    ML_ASSIGN_OR_RETURN(Manifest manifest, parseManifest(mm->text));
    ML_ASSIGN_OR_RETURN(Member * config, ociBlob(manifest.config.digest));
    ML_ASSIGN_OR_RETURN(ImageConfig parsed, parseImageConfig(config->text));
    std::vector<Member*> layers;
    for (const Descriptor& l : manifest.layers) {
      ML_ASSIGN_OR_RETURN(Member * lm, ociBlob(l.digest));
      layers.push_back(lm);
    }
    ML_ASSIGN_OR_RETURN(FileLock lock, store_.lockStore(FileLock::Mode::Shared));
    ML_RETURN_IF_ERROR(commit(*config, config->digest));
    for (Member* lm : layers) {
      ML_RETURN_IF_ERROR(commit(*lm, lm->digest));
    }
    ML_RETURN_IF_ERROR(commit(*mm, mm->digest));
    ImageRecord r;
    r.name = name_;
    r.manifest_digest = mm->digest.str();
    r.config_digest = config->digest.str();
    r.source = "import";
    r.platform = parsed.os.empty() ? platform.str() : parsed.os + "/" + parsed.architecture;
    for (const Descriptor& l : manifest.layers) {
      r.layers.push_back(LayerRecord{l.digest, l.media_type, l.size});
      r.size += l.size;
    }
    ML_RETURN_IF_ERROR(store_.saveImage(r));
    return r;
  }

  Result<ImageRecord> finishDockerSave() {
    ML_ASSIGN_OR_RETURN(Member * mf, member("manifest.json"));
    nlohmann::json j = nlohmann::json::parse(mf->text, nullptr, false);
    if (!j.is_array() || j.empty() || !j[0].is_object()) {
      return makeError(Errc::InvalidSpec, "import: manifest.json is not a non-empty array");
    }
    const nlohmann::json& entry = j[0];
    auto config_it = entry.find("Config");
    auto layers_it = entry.find("Layers");
    if (config_it == entry.end() || !config_it->is_string() || layers_it == entry.end() ||
        !layers_it->is_array()) {
      return makeError(Errc::InvalidSpec, "import: manifest.json entry lacks Config or Layers");
    }
    ML_ASSIGN_OR_RETURN(Member * config, member(config_it->get<std::string>()));
    ML_ASSIGN_OR_RETURN(ImageConfig parsed, parseImageConfig(config->text));
    std::vector<Member*> layers;
    for (const nlohmann::json& l : *layers_it) {
      if (!l.is_string()) {
        return makeError(Errc::InvalidSpec, "import: manifest.json Layers holds a non-string");
      }
      ML_ASSIGN_OR_RETURN(Member * lm, member(l.get<std::string>()));
      layers.push_back(lm);
    }
    if (!parsed.diff_ids.empty()) {
      if (parsed.diff_ids.size() != layers.size()) {
        return makeError(Errc::InvalidSpec,
                         fmt::format("import: config lists {} diff_ids but manifest.json has {} "
                                     "layers",
                                     parsed.diff_ids.size(), layers.size()));
      }
      for (size_t i = 0; i < layers.size(); ++i) {
        // Uncompressed docker-save layers hash to their diff_id.
        if (layerMediaType(layers[i]->head) == kMediaOciLayerTar &&
            layers[i]->digest.str() != parsed.diff_ids[i]) {
          return makeError(Errc::InvalidSpec,
                           fmt::format("import: digest mismatch: layer {} hashes to {}, the "
                                       "config's diff_id is {}",
                                       i, layers[i]->digest.str(), parsed.diff_ids[i]));
        }
      }
    }
    nlohmann::ordered_json manifest;
    manifest["schemaVersion"] = 2;
    manifest["mediaType"] = kMediaOciManifest;
    manifest["config"] = {{"mediaType", "application/vnd.oci.image.config.v1+json"},
                          {"digest", config->digest.str()},
                          {"size", config->size}};
    manifest["layers"] = nlohmann::ordered_json::array();
    ImageRecord r;
    for (Member* lm : layers) {
      std::string media = layerMediaType(lm->head);
      manifest["layers"].push_back(
          {{"mediaType", media}, {"digest", lm->digest.str()}, {"size", lm->size}});
      r.layers.push_back(LayerRecord{lm->digest.str(), media, lm->size});
      r.size += lm->size;
    }
    std::string manifest_text = manifest.dump();
    ML_ASSIGN_OR_RETURN(FileLock lock, store_.lockStore(FileLock::Mode::Shared));
    ML_RETURN_IF_ERROR(commit(*config, config->digest));
    for (Member* lm : layers) {
      ML_RETURN_IF_ERROR(commit(*lm, lm->digest));
    }
    ML_ASSIGN_OR_RETURN(Digest manifest_digest, store_.putBlob(manifest_text));
    r.name = name_;
    r.manifest_digest = manifest_digest.str();
    r.config_digest = config->digest.str();
    r.source = "import";
    r.platform = parsed.os.empty() ? "linux/amd64" : parsed.os + "/" + parsed.architecture;
    ML_RETURN_IF_ERROR(store_.saveImage(r));
    return r;
  }

  Store& store_;
  std::string name_;
  std::map<std::string, Member> members_;
};

}  // namespace

Result<ImageRecord> importArchive(Store& store, int fd, const std::string& name,
                                  const Platform& platform) {
  Importer importer(store, name);
  ML_RETURN_IF_ERROR(importer.readAll(fd));
  return importer.finish(platform);
}

}  // namespace matchlock::image
