// SPDX-License-Identifier: Apache-2.0
// Image layers as a registry serves them: one or two tar streams (plain or compressed), merged
// with OCI whiteouts and hard links into the tree the rootfs is built from. Whatever a layer
// says, every entry of the tree is an absolute, normalized path: no "..", no empty or "."
// component, so nothing can land outside the image's root.
#include <sys/mman.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common/fd.h"
#include "fuzz_check.h"
#include "image/rootfs.h"

namespace image = matchlock::image;

namespace {

std::string memfdWith(std::string_view bytes, std::vector<matchlock::Fd>& keep) {
  matchlock::Fd fd(::memfd_create("layer", MFD_CLOEXEC));
  FUZZ_CHECK(static_cast<bool>(fd));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    FUZZ_CHECK(n > 0);
    done += static_cast<size_t>(n);
  }
  std::string path = "/proc/self/fd/" + std::to_string(fd.get());
  keep.push_back(std::move(fd));
  return path;
}

bool normalizedAbsolute(std::string_view path) {
  if (path.empty() || path.front() != '/') {
    return false;
  }
  if (path == "/") {
    return true;
  }
  std::string_view rest = path.substr(1);
  while (!rest.empty()) {
    size_t slash = rest.find('/');
    std::string_view part = rest.substr(0, slash);
    if (part.empty() || part == "." || part == "..") {
      return false;
    }
    if (slash == std::string_view::npos) {
      break;
    }
    rest.remove_prefix(slash + 1);
    if (rest.empty()) {
      return false;  // trailing slash
    }
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Cursor in(fuzz::asView(data, size));
  size_t first = (static_cast<size_t>(in.byte()) << 8) | in.byte();
  std::vector<matchlock::Fd> keep;
  std::vector<image::LayerSource> layers;
  if (first > 0 && first < in.rest().size()) {
    layers.push_back({memfdWith(in.take(first), keep), "sha256:lower"});
  }
  layers.push_back({memfdWith(in.rest(), keep), "sha256:upper"});
  auto merged = image::mergeLayers(layers);
  if (!merged) {
    FUZZ_CHECK(!merged.error().message().empty());
    return 0;
  }
  for (const auto& e : *merged) {
    FUZZ_CHECK(normalizedAbsolute(e.path));
  }
  return 0;
}
