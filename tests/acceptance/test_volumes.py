# SPDX-License-Identifier: Apache-2.0
"""Named volumes and raw ext4 disks (docs/vm-runtime.md "Named volumes and raw disks"):
`volume create|ls|rm|cp` with upstream's texts and JSON, `run --disk @NAME:/mnt[:ro]` and
`--disk HOST_PATH:/mnt` attached as virtio-blk disks the guest init mounts, persistence across
sandboxes, read-only disks, copies, a spec `mode = "volume"` mount through `up`, and the
rejections (bad guest path, missing volume, a disk shadowed by a VFS mount)."""
import json
import subprocess

import pytest

from framework.vm import VmEnv, qemu_pids, supervisor_pids

BUSYBOX = ["--image", "busybox:latest", "--no-network"]


@pytest.fixture
def cli(tmp_path):
    """No VM: the volume commands and the checks that run before anything boots."""
    return VmEnv(tmp_path, "")


@pytest.fixture
def vm(tmp_path, kernel, busybox_tar):
    env = VmEnv(tmp_path, kernel)
    env.import_image(busybox_tar)
    yield env
    env.run("down", "-p", "vols", "-v")
    env.run("kill", "--all")
    env.run("prune")
    assert env.run_dirs() == []
    assert qemu_pids(str(env.home)) == []
    assert supervisor_pids(str(env.home)) == []


def volumes_dir(env):
    return env.home.parent / "cache" / "matchlock" / "volumes"


def test_volume_create_ls_rm(cli):
    r = cli.run("volume", "create", "data", "--size", "16", check=True)
    assert r.stdout == "Created volume data (16 MB)\n"
    image = volumes_dir(cli) / "data.ext4"
    assert image.stat().st_size == 16 * 1024 * 1024
    assert image.stat().st_blocks * 512 < 16 * 1024 * 1024  # sparse
    assert b"\x53\xef" == image.read_bytes()[1024 + 0x38:1024 + 0x3a]  # ext4 superblock magic

    r = cli.run("volume", "create", "data", "--size", "16")
    assert r.returncode != 0 and "named volume already exists" in r.stderr

    j = json.loads(cli.run("volume", "create", "b-2.x_y", "--size", "8", "--json", check=True).stdout)
    assert j == {"name": "b-2.x_y", "size": "8.0 MB", "path": str(volumes_dir(cli) / "b-2.x_y.ext4")}

    r = cli.run("volume", "ls", check=True)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE"]
    assert [line.split() for line in lines[1:]] == [["b-2.x_y", "8.0", "MB"], ["data", "16.0", "MB"]]
    assert "/" not in r.stdout  # no path column
    listed = json.loads(cli.run("volume", "list", "--json", check=True).stdout)
    assert [v["name"] for v in listed] == ["b-2.x_y", "data"]
    assert listed[1] == {"name": "data", "size": "16.0 MB", "path": str(image)}

    assert cli.run("volume", "rm", "data", check=True).stdout == "Removed volume data\n"
    r = cli.run("volume", "rm", "data")
    assert r.returncode != 0 and "named volume not found" in r.stderr
    assert json.loads(cli.run("volume", "remove", "b-2.x_y", "--json", check=True).stdout) == {
        "name": "b-2.x_y", "removed": True}
    assert json.loads(cli.run("volume", "ls", "--json", check=True).stdout) == []


@pytest.mark.parametrize("name", ["-lead", ".hidden", "a/b", "a b", "ä", ""])
def test_volume_names_are_validated(cli, name):
    r = cli.run("volume", "create", name, "--size", "8")
    assert r.returncode != 0
    assert not volumes_dir(cli).exists() or list(volumes_dir(cli).iterdir()) == []


def test_volume_cp_refuses_existing_and_missing(cli):
    cli.run("volume", "create", "a", "--size", "8", check=True)
    cli.run("volume", "create", "b", "--size", "8", check=True)
    r = cli.run("volume", "cp", "a", "b")
    assert r.returncode != 0 and "named volume already exists" in r.stderr
    r = cli.run("volume", "cp", "nope", "c")
    assert r.returncode != 0 and "named volume not found" in r.stderr
    r = cli.run("volume", "cp", "a", "a")
    assert r.returncode != 0
    assert cli.run("volume", "copy", "a", "c", check=True).stdout == "Copied volume a to c\n"
    a, c = volumes_dir(cli) / "a.ext4", volumes_dir(cli) / "c.ext4"
    assert a.read_bytes() == c.read_bytes()
    assert (a.stat().st_mode, a.stat().st_uid, a.stat().st_mtime_ns) == (
        c.stat().st_mode, c.stat().st_uid, c.stat().st_mtime_ns)


@pytest.mark.parametrize("arg,message", [
    ("@data:relative", "guest mount"),
    ("@data:/has space", "guest mount"),
    ("@data:/a/../b", "guest mount"),
    ("@data:/", "guest mount"),
    ("@data:/x:bogus", "unknown option"),
    ("@data", "expected HOST_PATH:GUEST_MOUNT"),
    ("@bad/name:/x", "volume name"),
    ("@missing:/x", "named volume not found"),
    ("/does/not/exist.ext4:/x", "does not exist"),
])
def test_run_disk_rejections(cli, arg, message):
    if not arg.startswith("@missing"):
        cli.run("volume", "create", "data", "--size", "8", check=True)
    r = cli.run("run", *BUSYBOX, "--disk", arg, "--", "true")
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert cli.run_dirs() == []


def test_disk_inside_a_vfs_mount_is_rejected(cli, tmp_path):
    cli.run("volume", "create", "data", "--size", "8", check=True)
    r = cli.run("run", *BUSYBOX, "-v", f"{tmp_path}:/workspace", "--disk", "@data:/workspace/db",
                "--", "true")
    assert r.returncode != 0
    assert "would be shadowed by the mount at '/workspace'" in r.stderr, r.stderr


def spec_text(mounts):
    return 'name = "vols"\n[sandboxes.app]\nimage = "busybox:latest"\n' \
        '[sandboxes.app.network]\nno_network = true\n' + mounts


def test_spec_volume_mount_validation(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(spec_text(
        '[[sandboxes.app.mounts]]\nsource = "a/b"\ntarget = "/data"\nmode = "volume"\n'
        '[[sandboxes.app.mounts]]\nsource = "."\ntarget = "/ws"\nmode = "rw"\nreadonly = true\n'
        '[[sandboxes.app.mounts]]\nsource = "ok"\ntarget = "/ws/db"\nmode = "volume"\n'))
    r = cli.run("validate", "-f", bad)
    assert r.returncode == 65, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "bad.toml:8:10: sandboxes.app.mounts[0].source: must be a volume name" in out \
        or "sandboxes.app.mounts[0].source: must be a volume name" in out, out
    assert "sandboxes.app.mounts[1].readonly: only a volume or disk mount takes readonly" in out, out
    assert ("sandboxes.app.mounts[2].target: '/ws/db' would be shadowed by the mount at '/ws'"
            in out), out
    for line in out.splitlines():
        if "mounts[" in line:
            assert line.split(":")[0].endswith("bad.toml") and line.split(":")[1].isdigit(), line
    good = tmp_path / "good.toml"
    good.write_text(spec_text(
        '[[sandboxes.app.mounts]]\nsource = "data"\ntarget = "/data"\nmode = "volume"\n'
        'readonly = true\n'))
    assert cli.run("validate", "-f", good).returncode == 0
    cfg = json.loads(cli.run("config", "-f", good, "--output", "json", check=True).stdout)
    mounts = cfg["projects"][0]["sandboxes"]["app"]["mounts"] if "projects" in cfg else \
        cfg["sandboxes"]["app"]["mounts"]
    assert mounts == [{"source": "data", "target": "/data", "mode": "volume", "readonly": True}]


@pytest.mark.need_qemu
def test_named_volume_persists_across_sandboxes_ro_and_cp(vm, tmp_path):
    vm.run("volume", "create", "vol", "--size", "32", check=True)
    r = vm.run("run", *BUSYBOX, "--disk", "@vol:/data", "--", "sh", "-c",
               "echo first > /data/f && chmod 640 /data/f && chown 1234:5678 /data/f && "
               "grep ' /data ' /proc/mounts", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ext4 rw" in r.stdout, r.stdout

    r = vm.run("volume", "cp", "vol", "copy", check=True)
    assert r.stdout == "Copied volume vol to copy\n"
    # A raw disk by host path, next to a read-only named volume and the copy.
    raw = tmp_path / "raw.ext4"
    subprocess.run(["truncate", "-s", "16M", raw], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", raw], check=True)
    r = vm.run("run", *BUSYBOX, "--disk", "@vol:/data:ro", "--disk", "@copy:/copy",
               "--disk", f"{raw}:/mnt/raw", "--", "sh", "-c",
               "cat /data/f; stat -c '%a %u:%g' /copy/f; cat /copy/f; "
               "if echo no > /data/g 2>/dev/null; then echo WROTE; else echo REFUSED; fi; "
               "echo raw > /mnt/raw/r && cat /mnt/raw/r", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["first", "640 1234:5678", "first", "REFUSED", "raw"], r.stdout
    # The raw disk kept what the guest wrote (debugfs reads it without mounting).
    out = subprocess.run(["debugfs", "-R", "cat /r", raw], capture_output=True, text=True)
    assert out.stdout == "raw\n", out.stdout + out.stderr
    assert vm.run_dirs() == []


@pytest.mark.need_qemu
def test_spec_volume_mount_through_up_and_rm_refused_while_running(vm, tmp_path):
    vm.run("volume", "create", "shared", "--size", "32", check=True)
    r = vm.run("run", *BUSYBOX, "--disk", "@shared:/seed", "--", "sh", "-c",
               "echo seeded > /seed/hello", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "sandbox.toml").write_text(spec_text(
        '[[sandboxes.app.mounts]]\nsource = "shared"\ntarget = "/srv/data"\nmode = "volume"\n'))
    r = vm.run("up", "-f", specs, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = vm.run("exec", "app", "--", "cat", "/srv/data/hello", timeout=120)
    assert r.returncode == 0 and r.stdout == "seeded\n", r.stdout + r.stderr
    r = vm.run("volume", "rm", "shared")
    assert r.returncode != 0 and "in use by running sandbox vols/app" in r.stderr, r.stderr
    assert (volumes_dir(vm) / "shared.ext4").exists()
    r = vm.run("down", "-p", "vols", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert vm.run("volume", "rm", "shared", check=True).stdout == "Removed volume shared\n"


@pytest.mark.need_qemu
def test_a_disk_that_is_not_ext4_fails_the_boot_clearly(vm, tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (4 * 1024 * 1024))
    r = vm.run("run", *BUSYBOX, "--disk", f"{junk}:/junk", "--", "true", timeout=300)
    assert r.returncode != 0
    # The guest init's console lines reach the error: which disk, which mount, why.
    assert "guest: disk disk0: mount /dev/" in r.stderr, r.stderr
    assert "on /junk" in r.stderr and "cannot mount the sandbox's disks" in r.stderr, r.stderr
    assert vm.run_dirs() == []


@pytest.mark.need_qemu
def test_a_volume_next_to_the_network_and_a_vfs_mount(vm, tmp_path):
    """The boot config disk (network) and a VFS mount coexist with an attached volume."""
    vm.run("volume", "create", "net", "--size", "16", check=True)
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("from host\n")
    r = vm.run("run", "--image", "busybox:latest", "-v", f"{share}:/workspace/share:ro",
               "--disk", "@net:/data", "--", "sh", "-c",
               "grep -c ' /data ext4 ' /proc/mounts; cat /workspace/share/hello; "
               "echo ok > /data/n && cat /data/n", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["1", "from host", "ok"], r.stdout
