# SPDX-License-Identifier: Apache-2.0
"""Images: pull over HTTP and HTTPS+basic auth from a local docker-registry, import a docker-save
tarball, list/inspect/remove/gc, and prove the rootfs disk's contents with debugfs/e2fsck.

The registries and the two fixture images (busybox from busybox-static, agent from debootstrap)
come from conftest.py; everything stays on 127.0.0.1.
"""
import base64
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import registry as fixture_registry  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("debugfs") is None or shutil.which("mke2fs") is None,
                                reason="e2fsprogs is not installed")


def image_env(tmp_path, **extra):
    docker = tmp_path / "docker"
    docker.mkdir(exist_ok=True)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "DOCKER_CONFIG": str(docker)}
    env.update(extra)
    return env


def write_docker_config(tmp_path, host, user, password):
    docker = tmp_path / "docker"
    docker.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def store_dir(tmp_path):
    return tmp_path / "cache" / "matchlock" / "images"


def debugfs_stat(disk, path):
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(disk)], capture_output=True,
                         text=True, check=True)
    text = out.stdout + out.stderr
    if "File not found" in text:
        return None
    m = re.search(r"Inode: (\d+)\s+Type: ([a-z ]+?)\s+Mode:\s+(\d+)", text)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
    links = re.search(r"Links: (\d+)", text)
    assert m and owner and links, text
    return {"inode": int(m.group(1)), "type": m.group(2).strip(), "mode": int(m.group(3), 8),
            "uid": int(owner.group(1)), "gid": int(owner.group(2)), "links": int(links.group(1))}


def debugfs_cat(disk, path):
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True,
                          check=True).stdout


def assert_fsck_clean(disk):
    p = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def rootfs_of(out):
    m = re.search(r"^Rootfs: (.+)$", out, re.M)
    assert m, out
    return pathlib.Path(m.group(1))


def assert_busybox_rootfs(disk):
    """The busybox fixture's layer 2 whiteouts and layer 1 metadata, as seen in the ext4 image."""
    assert_fsck_clean(disk)
    su = debugfs_stat(disk, "/usr/bin/su-test")
    assert su["mode"] == 0o4755 and su["uid"] == 0, su
    sg = debugfs_stat(disk, "/usr/bin/sg-test")
    assert sg["mode"] == 0o2755 and sg["gid"] == 50, sg
    user_file = debugfs_stat(disk, "/home/user/file")
    assert (user_file["uid"], user_file["gid"], user_file["mode"]) == (1000, 1000, 0o640)
    assert debugfs_stat(disk, "/home/user")["mode"] == 0o750
    assert debugfs_stat(disk, "/tmp")["mode"] == 0o1777
    a, b = debugfs_stat(disk, "/usr/share/hl-a"), debugfs_stat(disk, "/usr/share/hl-b")
    assert a["inode"] == b["inode"] and a["links"] == 2, (a, b)
    assert debugfs_stat(disk, "/etc/deleted-by-whiteout") is None
    assert debugfs_stat(disk, "/opaque/old") is None
    assert debugfs_cat(disk, "/opaque/new") == b"from layer 2\n"
    assert debugfs_cat(disk, "/etc/layer2") == b"layer 2 was applied\n"
    dev = debugfs_stat(disk, "/dev/null-test")
    assert dev["type"] == "character special" and dev["mode"] == 0o666
    assert debugfs_stat(disk, "/bin/sh")["type"] == "symlink"
    ea = subprocess.run(["debugfs", "-R", "ea_list /usr/share/xattr-file", str(disk)],
                        capture_output=True, text=True, check=True).stdout
    assert 'user.matchlock (7) = "fixture"' in ea
    assert debugfs_cat(disk, "/bin/busybox") == pathlib.Path("/bin/busybox").read_bytes()


def listed(matchlock, env):
    r = matchlock.run("image", "ls", "--output", "json", env=env)
    assert r.code == 0, r.err
    return {i["name"]: i for i in json.loads(r.out)}


def test_pull_busybox_over_http(matchlock, registry_http, tmp_path):
    env = image_env(tmp_path)
    ref = f"{registry_http.host}/test/busybox:latest"
    r = matchlock.run("pull", "--insecure", ref, env=env, timeout=300)
    assert r.code == 0, r.err
    assert "Digest: sha256:" in r.out
    assert_busybox_rootfs(rootfs_of(r.out))
    images = listed(matchlock, env)
    assert images[ref]["source"] == "registry" and len(images[ref]["layers"]) == 2
    r = matchlock.run("image", "inspect", ref, env=env)
    assert r.code == 0, r.err
    config = json.loads(r.out)["config"]
    assert config["cmd"] == ["/bin/sh"] and config["working_dir"] == "/"
    assert config["env"]["FIXTURE"] == "busybox" and config["exposed_ports"] == ["8080/tcp"]
    # The insecure list from the environment works like --insecure; a warm pull reuses everything.
    r = matchlock.run("pull", "-o", "json", ref,
                      env=dict(env, MATCHLOCK_INSECURE_REGISTRIES=registry_http.host))
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["name"] == ref and out["digest"] == images[ref]["digest"]
    assert out["rootfs"].endswith("-v1.ext4") and r.err == ""
    # A tag alias records the same image and adds no blobs.
    blobs = sorted(p.name for p in (store_dir(tmp_path) / "blobs" / "sha256").iterdir())
    r = matchlock.run("pull", "--insecure", "-t", "bb-alias", ref, env=env)
    assert r.code == 0 and "Tagged: bb-alias:latest" in r.out, r.err
    images = listed(matchlock, env)
    assert images["bb-alias:latest"]["digest"] == images[ref]["digest"]
    assert images["bb-alias:latest"]["source"] == "tag"
    assert sorted(p.name for p in (store_dir(tmp_path) / "blobs" / "sha256").iterdir()) == blobs
    r = matchlock.run("image", "rm", "bb-alias", env=env)
    assert r.code == 0, r.err
    assert sorted(p.name for p in (store_dir(tmp_path) / "blobs" / "sha256").iterdir()) == blobs


def test_pull_agent_over_https_with_basic_auth(matchlock, registry_https_auth, tmp_path):
    reg = registry_https_auth
    write_docker_config(tmp_path, reg.host, fixture_registry.USER, fixture_registry.PASSWORD)
    env = image_env(tmp_path)
    ref = f"{reg.host}/test/agent:latest"
    r = matchlock.run("pull", "--ca-file", reg.ca, ref, env=env, timeout=600)
    assert r.code == 0, r.err
    disk = rootfs_of(r.out)
    assert_fsck_clean(disk)
    assert debugfs_stat(disk, "/usr/bin/curl")["mode"] == 0o755
    assert debugfs_stat(disk, "/usr/bin/python3")["type"] == "symlink"
    assert debugfs_stat(disk, "/etc/ssl/certs/ca-certificates.crt") is not None
    su = debugfs_stat(disk, "/usr/bin/su")
    assert su["mode"] == 0o4755 and su["uid"] == 0
    mail = debugfs_stat(disk, "/var/mail")
    assert (mail["gid"], mail["mode"]) == (8, 0o2775)
    # busybox over the same HTTPS+auth registry, CA from the environment this time.
    r = matchlock.run("pull", f"{reg.host}/test/busybox:latest",
                      env=dict(env, MATCHLOCK_CA_BUNDLE=str(reg.ca)), timeout=300)
    assert r.code == 0, r.err
    assert_busybox_rootfs(rootfs_of(r.out))


def test_https_without_ca_is_a_clear_tls_error(matchlock, registry_https_auth, tmp_path):
    env = image_env(tmp_path)
    r = matchlock.run("pull", f"{registry_https_auth.host}/test/busybox:latest", env=env)
    assert r.code != 0
    assert "TLS error" in r.err and "--ca-file" in r.err, r.err
    assert listed(matchlock, env) == {}


def test_401_without_or_with_wrong_credentials(matchlock, registry_https_auth, tmp_path):
    reg = registry_https_auth
    env = image_env(tmp_path)
    ref = f"{reg.host}/test/busybox:latest"
    r = matchlock.run("pull", "--ca-file", reg.ca, ref, env=env)
    assert r.code != 0 and "401" in r.err and "no credentials" in r.err, r.err
    write_docker_config(tmp_path, reg.host, fixture_registry.USER, "wrong")
    r = matchlock.run("pull", "--ca-file", reg.ca, ref, env=env)
    assert r.code != 0 and "401" in r.err and "refused the credentials" in r.err, r.err
    assert listed(matchlock, env) == {}
    assert not list((store_dir(tmp_path) / "tmp").iterdir())


def test_unreachable_registry(matchlock, tmp_path):
    env = image_env(tmp_path)
    port = fixture_registry.free_port()  # nothing listens there
    r = matchlock.run("pull", "--insecure", f"127.0.0.1:{port}/test/busybox:latest", env=env)
    assert r.code != 0
    assert f"cannot reach registry 127.0.0.1:{port}" in r.err, r.err
    assert listed(matchlock, env) == {}


def test_unknown_digest_is_not_found(matchlock, registry_http, tmp_path):
    env = image_env(tmp_path)
    r = matchlock.run("pull", "--insecure",
                      f"{registry_http.host}/test/busybox@sha256:{'0' * 64}", env=env)
    assert r.code != 0 and "not found" in r.err and "404" in r.err, r.err
    assert listed(matchlock, env) == {}


def test_corrupted_blob_is_rejected_and_store_stays_consistent(matchlock, image_fixtures,
                                                               tmp_path):
    if fixture_registry.missing_tools():
        pytest.skip("registry tools missing")
    reg = fixture_registry.Registry(tmp_path / "reg").start()
    try:
        reg.push(image_fixtures["busybox"] / "busybox-oci", "test/busybox")
        blobs = reg.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
        biggest = max(blobs.glob("*/*/data"), key=lambda p: p.stat().st_size)
        size = biggest.stat().st_size
        biggest.write_bytes(b"\0" * size)  # same size, wrong content
        bad_hex = biggest.parent.name
        env = image_env(tmp_path)
        r = matchlock.run("pull", "--insecure", f"{reg.host}/test/busybox:latest", env=env)
        assert r.code != 0
        assert "digest mismatch" in r.err and bad_hex in r.err, r.err
        assert listed(matchlock, env) == {}
        store = store_dir(tmp_path)
        assert not (store / "blobs" / "sha256" / bad_hex).exists()
        assert not list((store / "tmp").iterdir())
        assert not list((store / "rootfs").iterdir())
    finally:
        reg.stop()


def run_import(matchlock, env, name, tar_path, user=None):
    cmd = [matchlock.binary, "image", "import", name]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] + cmd
    with open(tar_path, "rb") as f:
        return subprocess.run(cmd, stdin=f, capture_output=True, text=True,
                              env=matchlock.env(env), timeout=300)


def test_import_docker_save_list_remove_gc(matchlock, image_fixtures, tmp_path):
    env = image_env(tmp_path)
    p = run_import(matchlock, env, "imported/busybox:v1",
                   image_fixtures["busybox"] / "busybox-save.tar")
    assert p.returncode == 0, p.stderr
    assert "Imported: imported/busybox:v1" in p.stdout
    assert_busybox_rootfs(rootfs_of(p.stdout))
    r = matchlock.run("image", "ls", env=env)
    assert r.code == 0 and "imported/busybox:v1" in r.out and "import" in r.out
    r = matchlock.run("image", "rm", "imported/busybox:v1", env=env)
    assert r.code == 0 and "Removed imported/busybox:v1" in r.out, r.err
    assert listed(matchlock, env) == {}
    store = store_dir(tmp_path)
    assert not list((store / "blobs" / "sha256").iterdir())  # rm collects what it freed
    assert not list((store / "rootfs").iterdir())
    r = matchlock.run("image", "rm", "imported/busybox:v1", env=env)
    assert r.code != 0 and "not found" in r.err
    r = matchlock.run("image", "gc", env=env)
    assert r.code == 0 and "Removed 0 unreferenced blobs" in r.out


def test_import_and_rootfs_as_non_root_user(matchlock, image_fixtures, tmp_path, request):
    """Owners in the disk come from the tar headers, not from the user who builds it."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv missing")
        user = 65534
        # pytest's tmp dirs are private to root: use a directory nobody can traverse.
        work = pathlib.Path(tempfile.mkdtemp(prefix="ml-rootless-"))
        os.chown(work, user, user)
        request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
        tar = work / "busybox-save.tar"
        shutil.copy(image_fixtures["busybox"] / "busybox-save.tar", tar)
        os.chown(tar, user, user)
    else:
        user, work, tar = None, tmp_path, image_fixtures["busybox"] / "busybox-save.tar"
    env = {"XDG_CACHE_HOME": str(work / "cache"), "DOCKER_CONFIG": str(work / "docker"),
           "HOME": str(work)}
    p = run_import(matchlock, env, "rootless:latest", tar, user=user)
    assert p.returncode == 0, p.stderr
    disk = rootfs_of(p.stdout)
    assert disk.stat().st_uid == (user if user is not None else os.geteuid())
    assert_busybox_rootfs(disk)


def test_concurrent_pulls_share_one_store(matchlock, registry_http, tmp_path):
    env = matchlock.env(image_env(tmp_path))
    ref = f"{registry_http.host}/test/agent:latest"
    procs = [subprocess.Popen([matchlock.binary, "pull", "--insecure", ref], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    disks = {rootfs_of(out) for out, _ in outs}
    assert len(disks) == 1
    assert_fsck_clean(disks.pop())
    store = store_dir(tmp_path)
    assert not list((store / "tmp").iterdir())
    assert len(list((store / "rootfs").iterdir())) == 1


def test_bare_name_needs_a_registry(matchlock, tmp_path):
    r = matchlock.run("pull", "busybox", env=image_env(tmp_path),
                      unset=("MATCHLOCK_DEFAULT_REGISTRY",))
    assert r.code != 0 and "no default registry" in r.err, r.err


# ---- protocol paths docker-registry cannot show (tests/fixtures/fake_registry.py) ---------------

import fake_registry  # noqa: E402


@pytest.fixture
def fake(image_fixtures, request):
    servers = []

    def start(**kwargs):
        s = fake_registry.FakeRegistry(image_fixtures["busybox"] / "busybox-oci", **kwargs).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_anonymous_bearer_token_flow(matchlock, fake, tmp_path):
    reg = fake(token_auth=True)
    env = image_env(tmp_path)
    r = matchlock.run("pull", "--insecure", f"{reg.host}/test/busybox:latest", env=env)
    assert r.code == 0, r.err
    assert_busybox_rootfs(rootfs_of(r.out))
    token_requests = [q for p, q, _ in reg.requests if p == "/token"]
    assert token_requests and "scope=repository%3Atest%2Fbusybox%3Apull" in token_requests[0]
    assert all(a == "Bearer " + fake_registry.TOKEN for p, _, a in reg.requests
               if "/blobs/" in p)


def test_bearer_token_endpoint_with_basic_credentials(matchlock, fake, tmp_path):
    reg = fake(token_auth=True, token_creds=("alice", "pw"))
    env = image_env(tmp_path)
    ref = f"{reg.host}/test/busybox:latest"
    r = matchlock.run("pull", "--insecure", ref, env=env)
    assert r.code != 0 and "token service" in r.err and "401" in r.err, r.err
    assert listed(matchlock, env) == {}
    write_docker_config(tmp_path, reg.host, "alice", "pw")
    r = matchlock.run("pull", "--insecure", ref, env=env)
    assert r.code == 0, r.err


def test_retries_on_503_and_429(matchlock, fake, tmp_path):
    reg = fake(fail_blobs=[503, 429, 502])
    env = image_env(tmp_path)
    r = matchlock.run("pull", "--insecure", "--parallel", "1", f"{reg.host}/test/busybox:latest",
                      env=env)
    assert r.code == 0, r.err
    assert sum(1 for p, _, _ in reg.requests if "/blobs/" in p) >= 3 + 3  # config + 2 layers


@pytest.mark.parametrize("honour_range", [True, False])
def test_interrupted_blob_download_resumes(matchlock, fake, tmp_path, honour_range):
    reg = fake(cut_big_blobs=1, honour_range=honour_range)
    env = image_env(tmp_path)
    r = matchlock.run("pull", "--insecure", f"{reg.host}/test/busybox:latest", env=env)
    assert r.code == 0, r.err
    assert_busybox_rootfs(rootfs_of(r.out))
    assert len(reg.ranges) >= 4  # config, 2 layers, one retry
    assert any(rng for _, rng in reg.ranges)  # the retry asked for the rest only
    assert not list((store_dir(tmp_path) / "tmp").iterdir())


def test_partial_download_survives_a_failed_pull(matchlock, fake, tmp_path):
    reg = fake(cut_big_blobs=100)  # every answer for the big layer stops half way
    env = image_env(tmp_path)
    ref = f"{reg.host}/test/busybox:latest"
    r = matchlock.run("pull", "--insecure", ref, env=env)
    # Each of the 4 attempts continues where the last stopped and gets half of the rest: the pull
    # fails with 15/16 of the layer kept; nothing unverified is used or listed.
    assert r.code == 75 and "cannot reach registry" in r.err, r.err
    partials = list((store_dir(tmp_path) / "tmp").glob("partial-*"))
    assert len(partials) == 1 and partials[0].stat().st_size > 0
    assert listed(matchlock, env) == {}
    reg.ranges.clear()
    reg.cut_big_blobs = 0
    r = matchlock.run("pull", "--insecure", ref, env=env)
    kept = partials[0].stat().st_size if partials[0].exists() else None
    assert kept is None  # renamed into blobs/ after verification
    assert any(rng and rng.startswith("bytes=") for _, rng in reg.ranges), reg.ranges
    assert r.code == 0, r.err
    assert_busybox_rootfs(rootfs_of(r.out))


def test_persistent_5xx_gives_up_with_a_clear_error(matchlock, fake, tmp_path):
    reg = fake(fail_blobs=[500] * 100)
    env = image_env(tmp_path)
    r = matchlock.run("pull", "--insecure", f"{reg.host}/test/busybox:latest", env=env)
    assert r.code != 0 and "HTTP 500 after 4 attempts" in r.err, r.err
    assert listed(matchlock, env) == {}
    assert not list((store_dir(tmp_path) / "tmp").iterdir())


def test_manifest_digest_header_mismatch(matchlock, fake, tmp_path):
    reg = fake(lie_about_digest=True)
    env = image_env(tmp_path)
    r = matchlock.run("pull", "--insecure", f"{reg.host}/test/busybox:latest", env=env)
    assert r.code != 0 and "digest mismatch" in r.err, r.err
    assert listed(matchlock, env) == {}


# ---- hostile layers ------------------------------------------------------------------------------

import tarfile  # noqa: E402

import build_images  # noqa: E402


@pytest.mark.parametrize("case", ["dotdot", "absolute", "through-symlink"])
def test_hostile_layer_is_rejected_and_not_listed(matchlock, tmp_path, case):
    def layer(t):
        build_images.add(t, "ok", data=b"fine\n")
        if case == "dotdot":
            build_images.add(t, "../../escaped", data=b"x")
        elif case == "absolute":
            build_images.add(t, "/etc/escaped", data=b"x")
        else:
            build_images.add(t, "esc", tarfile.SYMTYPE, link=str(tmp_path), mode=0o777)
            build_images.add(t, "esc/escaped", data=b"x")

    data = build_images.tar_bytes(layer)
    archive = tmp_path / "hostile.tar"
    build_images.docker_save(archive, [data], {"os": "linux", "architecture": "amd64"})
    env = image_env(tmp_path)
    p = run_import(matchlock, env, "hostile:latest", archive)
    assert p.returncode == 65, p.stderr
    digest = "sha256:" + build_images.sha256(data)
    assert digest in p.stderr and "escaped" in p.stderr, p.stderr
    expected = {"dotdot": "path traversal", "absolute": "absolute path",
                "through-symlink": "is a symlink"}[case]
    assert expected in p.stderr, p.stderr
    assert listed(matchlock, env) == {}
    assert not (tmp_path / "escaped").exists()
    store = store_dir(tmp_path)
    assert not list((store / "rootfs").iterdir()) and not list((store / "tmp").iterdir())
