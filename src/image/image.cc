// SPDX-License-Identifier: Apache-2.0
#include "image/image.h"

#include "image/digest.h"
#include "image/reference.h"
#include "image/rootfs.h"

namespace matchlock::image {

Result<ImageConfig> loadImageConfig(const Store& store, const ImageRecord& record) {
  ML_ASSIGN_OR_RETURN(Digest digest, parseDigest(record.config_digest));
  ML_ASSIGN_OR_RETURN(std::string text, store.readBlob(digest));
  auto config = parseImageConfig(text);
  if (!config) {
    return makeError(std::move(config).error().withContext("image " + record.name));
  }
  return config;
}

Result<PreparedImage> prepareImage(Store& store, std::string_view name, const PullOptions& options,
                                   bool force_pull) {
  PreparedImage out;
  auto local = force_pull ? Result<ImageRecord>(makeError(Errc::NotFound, "forced pull"))
                          : store.resolveImage(name);
  if (local) {
    out.record = std::move(*local);
  } else if (local.error().code() != Errc::NotFound) {
    return makeError(std::move(local).error());
  } else {
    ML_ASSIGN_OR_RETURN(Reference ref, parseReference(name, defaultRegistry()));
    PullOptions with_env = options;
    applyEnvironment(with_env);
    ML_ASSIGN_OR_RETURN(out.record, pullImage(store, ref, with_env));
  }
  ML_ASSIGN_OR_RETURN(out.config, loadImageConfig(store, out.record));
  ML_ASSIGN_OR_RETURN(out.rootfs, ensureRootfs(store, out.record));
  return out;
}

}  // namespace matchlock::image
