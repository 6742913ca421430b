// SPDX-License-Identifier: Apache-2.0
// Named volumes and `run --disk`: name validation, the flag parser and the size text.
#include "runtime/volumes.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>

#include <catch2/catch.hpp>

using namespace matchlock;  // NOLINT(google-build-using-namespace)

namespace {

namespace fs = std::filesystem;

/// A private XDG_CACHE_HOME (where volumes live) for one test case.
struct TempCache {
  TempCache() {
    std::string tmpl = (fs::temp_directory_path() / "ml-volumes-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
    REQUIRE(::setenv("XDG_CACHE_HOME", path.c_str(), 1) == 0);
  }
  ~TempCache() {
    std::error_code ec;
    fs::remove_all(path, ec);
    (void)::unsetenv("XDG_CACHE_HOME");
  }
  TempCache(const TempCache&) = delete;
  TempCache& operator=(const TempCache&) = delete;
  std::string path;
};

}  // namespace

TEST_CASE("volume names") {
  for (const char* good : {"a", "data", "A-1", "x_y.z", "0", "a..b"}) {
    INFO(good);
    CHECK(runtime::isValidVolumeName(good));
  }
  for (const char* bad : {"", "-a", ".a", "_a", "a/b", "a b", "a:b", "@a", "ä"}) {
    INFO(bad);
    CHECK_FALSE(runtime::isValidVolumeName(bad));
  }
  CHECK_FALSE(runtime::isValidVolumeName(std::string(129, 'a')));
  CHECK(runtime::formatVolumeSize(16 * 1024 * 1024) == "16.0 MB");
  CHECK(runtime::formatVolumeSize(10240LL * 1024 * 1024) == "10240.0 MB");
}

TEST_CASE("volume paths live under the cache") {
  TempCache cache;
  CHECK(runtime::volumePath("data").value() == cache.path + "/matchlock/volumes/data.ext4");
  CHECK(runtime::volumePath("../x").error().code() == Errc::InvalidSpec);
}

TEST_CASE("disk flag parsing") {
  TempCache cache;
  auto vol = runtime::parseDiskFlag("@data:/mnt/data/:ro");
  REQUIRE(vol);
  CHECK(vol->mode == spec::MountMode::Volume);
  CHECK(vol->source == "data");
  CHECK(vol->target == "/mnt/data");
  CHECK(vol->readonly);
  CHECK_FALSE(runtime::parseDiskFlag("@data:/x:readonly").value().readonly == false);
  CHECK_FALSE(runtime::parseDiskFlag("@data:/x").value().readonly);

  std::string image = cache.path + "/raw.ext4";
  std::ofstream(image) << "x";
  auto raw = runtime::parseDiskFlag(image + ":/raw");
  REQUIRE(raw);
  CHECK(raw->mode == spec::MountMode::Disk);
  CHECK(raw->source == image);
  CHECK(runtime::diskImageOf(*raw).value() == image);
  // A named volume must exist when it is attached.
  CHECK(runtime::diskImageOf(*vol).error().message().find("named volume not found") !=
        std::string::npos);

  CHECK(runtime::parseDiskFlag(cache.path + "/missing.ext4:/x").error().code() == Errc::NotFound);
  for (const char* bad : {"@data", "@data:rel", "@data:/", "@data:/a/../b", "@data:/a b",
                          "@data:/x:bogus", "@bad/name:/x", ":/x", "@data:/x:ro:extra"}) {
    INFO(bad);
    auto r = runtime::parseDiskFlag(bad);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::InvalidSpec);
    CHECK(r.error().message().starts_with("invalid disk mount"));
  }
}
