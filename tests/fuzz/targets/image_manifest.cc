// SPDX-License-Identifier: Apache-2.0
// What a registry (or an `image import` archive) says about an image: the manifest, index and
// config documents, the media-type detection that picks a parser, and the image references and
// platforms a user types. Nothing may throw; a parsed reference prints to a string that parses to
// the same reference.
#include <string>

#include "fuzz_check.h"
#include "image/manifest.h"
#include "image/reference.h"

namespace image = matchlock::image;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view body = fuzz::asView(data, size);
  (void)image::detectMediaType("", body);
  (void)image::detectMediaType(image::kMediaDockerManifest, body);
  if (auto m = image::parseManifest(body)) {
    for (const auto& layer : m->layers) {
      FUZZ_CHECK(layer.digest.size() == 71 && layer.digest.rfind("sha256:", 0) == 0);
    }
  }
  if (auto index = image::parseIndex(body)) {
    (void)image::selectPlatform(*index, image::Platform{});
  }
  if (auto config = image::parseImageConfig(body)) {
    (void)image::imageConfigToJson(*config);
  }
  if (body.size() <= 512) {
    if (auto ref = image::parseReference(body, "127.0.0.1:5000")) {
      auto again = image::parseReference(ref->str(), "127.0.0.1:5000");
      FUZZ_CHECK(again.has_value());
      FUZZ_CHECK(again->registry == ref->registry && again->repository == ref->repository &&
                 again->tag == ref->tag && again->digest == ref->digest);
    }
    (void)image::normalizeLocalName(body);
    if (auto p = image::parsePlatform(body)) {
      auto again = image::parsePlatform(p->str());
      FUZZ_CHECK(again.has_value() && again->str() == p->str());
    }
  }
  return 0;
}
