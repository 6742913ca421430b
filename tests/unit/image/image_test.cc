// SPDX-License-Identifier: Apache-2.0
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include <catch2/catch.hpp>

#include "common/fd.h"
#include "image/digest.h"
#include "image/manifest.h"
#include "image/reference.h"
#include "image/registry.h"
#include "image/store.h"

namespace matchlock::image {
namespace {

std::string tempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "ml-image-test.XXXXXX").string();
  REQUIRE(::mkdtemp(pattern.data()) != nullptr);
  return pattern;
}

TEST_CASE("references: host, repository, tag and digest") {
  auto r = parseReference("127.0.0.1:5000/test/busybox:1.36", "");
  REQUIRE(r);
  CHECK(r->registry == "127.0.0.1:5000");
  CHECK(r->repository == "test/busybox");
  CHECK(r->tag == "1.36");
  CHECK(r->str() == "127.0.0.1:5000/test/busybox:1.36");

  auto d = parseReference("registry.example.com/a/b@sha256:" + std::string(64, 'a'), "");
  REQUIRE(d);
  CHECK(d->digest == "sha256:" + std::string(64, 'a'));
  CHECK(d->manifestRef() == d->digest);

  auto latest = parseReference("localhost/busybox", "");
  REQUIRE(latest);
  CHECK(latest->registry == "localhost");
  CHECK(latest->tag == "latest");

  auto dflt = parseReference("busybox", "reg.local:5000");
  REQUIRE(dflt);
  CHECK(dflt->str() == "reg.local:5000/busybox:latest");
}

TEST_CASE("references: no implicit Docker Hub and bad input") {
  auto bare = parseReference("busybox", "");
  REQUIRE_FALSE(bare);
  CHECK(bare.error().code() == Errc::InvalidSpec);
  CHECK(bare.error().message().find("no default registry") != std::string::npos);
  CHECK_FALSE(parseReference("host.io/Upper/case", ""));
  CHECK_FALSE(parseReference("host.io/repo:bad/tag", ""));
  CHECK_FALSE(parseReference("host.io/repo@sha256:xyz", ""));
  CHECK_FALSE(parseReference("host.io/repo@md5:" + std::string(32, 'a'), ""));
  CHECK_FALSE(parseReference("host.io/re po", ""));
  CHECK_FALSE(parseReference("host.io/../etc", ""));
  CHECK(normalizeLocalName("busybox").value() == "busybox:latest");
  CHECK(normalizeLocalName("my/img:v1").value() == "my/img:v1");
  CHECK_FALSE(normalizeLocalName("x@sha256:" + std::string(64, 'b')));
}

TEST_CASE("digests") {
  CHECK(digestOf("abc").hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 h;
  h.update("a");
  h.update("bc");
  CHECK(h.finish() == digestOf("abc"));
  CHECK(parseDigest("sha256:" + std::string(64, '0')));
  CHECK_FALSE(parseDigest("sha256:" + std::string(63, '0')));
  CHECK_FALSE(parseDigest("sha256:" + std::string(64, 'A')));
  CHECK_FALSE(parseDigest("nocolon"));
}

const std::string kIndex = R"({
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 10,
     "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
     "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 11,
     "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
     "platform": {"os": "linux", "architecture": "amd64"}},
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 12,
     "digest": "sha256:3333333333333333333333333333333333333333333333333333333333333333",
     "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}}
  ]})";

TEST_CASE("index: platform selection") {
  CHECK(detectMediaType("", kIndex).value() == kMediaOciIndex);
  auto idx = parseIndex(kIndex);
  REQUIRE(idx);
  REQUIRE(idx->manifests.size() == 3);
  CHECK(selectPlatform(*idx, Platform{})->digest.substr(7, 4) == "2222");
  CHECK(selectPlatform(*idx, parsePlatform("linux/arm64").value())->digest.substr(7, 4) == "1111");
  CHECK(selectPlatform(*idx, parsePlatform("linux/arm/v7").value())->digest.substr(7, 4) == "3333");
  auto none = selectPlatform(*idx, parsePlatform("linux/s390x").value());
  REQUIRE_FALSE(none);
  CHECK(none.error().code() == Errc::NotFound);
  CHECK(none.error().message().find("linux/arm64/v8") != std::string::npos);
  CHECK_FALSE(parsePlatform("linux"));
}

TEST_CASE("manifests: Docker v2 schema 2 and OCI; schema 1 and bad digests rejected") {
  const std::string docker = R"({
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 7,
               "digest": "sha256:4444444444444444444444444444444444444444444444444444444444444444"},
    "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 9,
                "digest": "sha256:5555555555555555555555555555555555555555555555555555555555555555"}]
  })";
  CHECK(detectMediaType("application/vnd.docker.distribution.manifest.v2+json", docker).value() ==
        kMediaDockerManifest);
  auto m = parseManifest(docker);
  REQUIRE(m);
  CHECK(m->config.size == 7);
  REQUIRE(m->layers.size() == 1);
  CHECK(m->layers[0].size == 9);

  auto schema1 = detectMediaType("application/json", R"({"schemaVersion": 1, "fsLayers": []})");
  REQUIRE_FALSE(schema1);
  CHECK(schema1.error().message().find("schema 1") != std::string::npos);

  CHECK_FALSE(parseManifest(R"({"config": {"digest": "sha256:zz", "size": 1}, "layers": []})"));
  CHECK_FALSE(parseManifest("not json"));
  CHECK_FALSE(parseManifest(R"({"layers": []})"));
}

TEST_CASE("image config") {
  auto c = parseImageConfig(R"({
    "os": "linux", "architecture": "amd64",
    "config": {"User": "1000:1000", "WorkingDir": "/app", "Entrypoint": ["/bin/tini", "--"],
               "Cmd": ["python3"], "Env": ["PATH=/usr/bin", "A=b=c"],
               "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}, "Labels": {"k": "v"}},
    "rootfs": {"type": "layers", "diff_ids": [
      "sha256:6666666666666666666666666666666666666666666666666666666666666666"]}
  })");
  REQUIRE(c);
  CHECK(c->user == "1000:1000");
  CHECK(c->working_dir == "/app");
  CHECK(c->entrypoint == std::vector<std::string>{"/bin/tini", "--"});
  CHECK(c->cmd == std::vector<std::string>{"python3"});
  CHECK(c->env.size() == 2);
  CHECK(c->exposed_ports.size() == 2);
  CHECK(c->labels.at("k") == "v");
  CHECK(c->diff_ids.size() == 1);
  std::string json = imageConfigToJson(*c);
  CHECK(json.find(R"("A": "b=c")") != std::string::npos);
  CHECK_FALSE(parseImageConfig(R"({"rootfs": {"diff_ids": ["sha256:bad"]}})"));
  CHECK(parseImageConfig("{}"));  // everything optional
}

TEST_CASE("WWW-Authenticate challenges") {
  auto b = parseAuthChallenge(
      R"(Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull")");
  REQUIRE(b);
  CHECK(b->scheme == "bearer");
  CHECK(b->realm == "https://auth.example.com/token");
  CHECK(b->service == "registry.example.com");
  CHECK(b->scope == "repository:a/b:pull");
  auto basic = parseAuthChallenge(R"(Basic realm="matchlock-test")");
  REQUIRE(basic);
  CHECK(basic->scheme == "basic");
  CHECK_FALSE(parseAuthChallenge(R"(Bearer realm="unterminated)"));
}

TEST_CASE("Docker config credentials") {
  std::string dir = tempDir();
  std::string path = dir + "/config.json";
  // "user:pa:ss" base64
  REQUIRE(writeFileAtomic(path, R"({"auths": {
      "https://reg.example.com/v1/": {"auth": "dXNlcjpwYTpzcw=="},
      "127.0.0.1:5000": {"username": "u2", "password": "p2"}}})"));
  auto a = credentialsFor("reg.example.com", path);
  REQUIRE(a);
  REQUIRE(a->has_value());
  CHECK((*a)->username == "user");
  CHECK((*a)->password == "pa:ss");
  auto b = credentialsFor("127.0.0.1:5000", path);
  REQUIRE(b);
  REQUIRE(b->has_value());
  CHECK((*b)->username == "u2");
  auto none = credentialsFor("other:1", path);
  REQUIRE(none);
  CHECK_FALSE(none->has_value());
  auto missing = credentialsFor("x", dir + "/nope.json");
  REQUIRE(missing);
  CHECK_FALSE(missing->has_value());
  REQUIRE(writeFileAtomic(path, R"({"auths": {"h": {"auth": "%%%"}}})"));
  CHECK_FALSE(credentialsFor("h", path));
  std::filesystem::remove_all(dir);
}

TEST_CASE("store: verified blobs, records, gc") {
  std::string dir = tempDir();
  auto store = Store::open(dir + "/images");
  REQUIRE(store);
  // A blob whose content does not match the expected digest never appears.
  Digest wrong = digestOf("something else");
  auto bad = store->putBlob("content", wrong);
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message().find("digest mismatch") != std::string::npos);
  CHECK_FALSE(store->hasBlob(wrong));
  CHECK(std::filesystem::is_empty(store->tmpDir()));

  auto layer = store->putBlob("layer bytes");
  auto config = store->putBlob("{}");
  auto manifest = store->putBlob("manifest");
  auto orphan = store->putBlob("orphan");
  REQUIRE((layer && config && manifest && orphan));
  CHECK(store->readBlob(*layer).value() == "layer bytes");

  ImageRecord r;
  r.name = "test:latest";
  r.manifest_digest = manifest->str();
  r.config_digest = config->str();
  r.source = "import";
  r.platform = "linux/amd64";
  r.layers.push_back(LayerRecord{layer->str(), std::string(kMediaOciLayerTar), 11});
  r.size = 11;
  REQUIRE(store->saveImage(r));
  auto found = store->resolveImage("test");
  REQUIRE(found);
  CHECK(found->layers.size() == 1);
  CHECK(found->layers[0].digest == layer->str());

  auto gc = store->gc();
  REQUIRE(gc);
  CHECK(gc->removed_blobs == 1);
  CHECK_FALSE(store->hasBlob(*orphan));
  CHECK(store->hasBlob(*layer));

  REQUIRE(store->removeImage("test:latest"));
  CHECK(store->removeImage("test:latest").error().code() == Errc::NotFound);
  gc = store->gc();
  REQUIRE(gc);
  CHECK(gc->removed_blobs == 3);
  CHECK(store->listImages()->empty());

  // A corrupt stored blob is detected on read.
  auto c2 = store->putBlob("config two");
  REQUIRE(c2);
  REQUIRE(::chmod(store->blobPath(*c2).c_str(), 0600) == 0);
  REQUIRE(writeFileAtomic(store->blobPath(*c2), "tampered"));
  CHECK_FALSE(store->readBlob(*c2));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace matchlock::image
