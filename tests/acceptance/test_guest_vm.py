# SPDX-License-Identifier: Apache-2.0
"""matchlock-guest as PID 1 in a real micro-VM (QEMU microvm, TCG): the host reaches the exec
agent over a virtio-serial port, runs commands, and shuts the VM down. Every wait is bounded."""
import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

from framework.kernel import guest_kernel

from framework import guestproto as gp

ROOT = pathlib.Path(__file__).resolve().parents[2]
BOOT_BOUND_S = 60


class BootedVm:
    """QEMU microvm with matchlock-guest as /init, the channel on a virtio-serial socket."""

    def __init__(self, tmp_path, initrd, params="", qemu_extra=()):
        sock_path = tmp_path / "channel.sock"
        self.console = tmp_path / "console.log"
        cmd = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off",
               "-accel", "tcg", "-smp", "2", "-m", "256", "-nodefaults", "-no-user-config",
               "-nographic", "-no-reboot", "-serial", f"file:{self.console}",
               "-kernel", guest_kernel(), "-initrd", str(initrd),
               "-append", f"console=ttyS0 reboot=t panic=-1 quiet {params}",
               *qemu_extra,
               "-device", "virtio-serial-device",
               "-chardev", f"socket,id=ch0,path={sock_path},server=on,wait=off",
               "-device", "virtserialport,chardev=ch0,name=matchlock.0"]
        self.qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + BOOT_BOUND_S
            while not sock_path.exists():
                assert self.qemu.poll() is None, self.qemu.stderr.read().decode()
                assert time.monotonic() < deadline, "QEMU did not create its channel socket"
                time.sleep(0.05)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock_path))
            self.client = gp.Client(s)
            start = time.monotonic()
            self.client.handshake(timeout=BOOT_BOUND_S)
            assert self.client.ready(timeout=BOOT_BOUND_S)["ok"] is True
            self.boot_seconds = time.monotonic() - start
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.qemu.poll() is None:
            self.qemu.kill()
        self.qemu.wait(timeout=10)


def guest_binary():
    return os.environ.get("MATCHLOCK_GUEST", str(ROOT / "build" / "matchlock-guest"))


def busybox_initrd(tmp_path):
    busybox = shutil.which("busybox")
    if not busybox:
        pytest.fail("busybox (busybox-static) is not installed; run scripts/setup")
    initrd = tmp_path / "initrd.cpio"
    subprocess.run([str(ROOT / "tests/tools/mkinitramfs.py"), guest_binary(), str(initrd),
                    "--busybox", busybox], check=True)
    return initrd


@pytest.fixture
def vm(tmp_path):
    booted = BootedVm(tmp_path, busybox_initrd(tmp_path), "matchlock.hostname=probe")
    yield booted.client, booted.qemu, booted.console
    booted.close()


@pytest.mark.need_qemu
def test_exec_in_a_real_vm_and_clean_shutdown(vm):
    client, qemu, console = vm
    e = gp.Exec(client, ["sh", "-c", "hostname; cat /proc/1/comm; echo err >&2; exit 7"])
    e.stdin(b"")
    ex = e.wait(timeout=60)
    assert ex["code"] == 7
    # PID 1 of the exec's own namespace, not the agent (the guest's PID 1).
    assert bytes(e.stdout).decode().split() == ["probe", "exec-init"]
    assert bytes(e.stderr) == b"err\n"
    # stdin streaming and a TTY session inside the VM.
    cat = gp.Exec(client, ["cat"])
    cat.stdin(b"x" * 300000)
    assert cat.wait(timeout=60)["code"] == 0 and len(cat.stdout) == 300000
    tty = gp.Exec(client, ["sh", "-c", "tty"], tty=True)
    tty.stdin(b"", eof=False)
    assert tty.wait(timeout=60)["code"] == 0 and b"/dev/pts/" in tty.stdout
    # The host asks for a shutdown: the VM powers off (QEMU exits) within the bound.
    client.shutdown()
    qemu.wait(timeout=30)
    log = console.read_text(errors="replace")
    assert "shutdown requested by the host" in log


@pytest.fixture
def vm_with_disks(tmp_path):
    """Boots with an image disk (ext4 from a busybox tree, read-only) and a writable upper disk,
    as the VM runtime will: the guest assembles an overlay root and switches to it."""
    busybox = shutil.which("busybox")
    tree = tmp_path / "tree"
    for d in ("bin", "etc", "root", "home/app", "tmp", "proc", "sys", "dev", "run"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "id", "ls", "touch", "hostname", "sync", "tty", "stat"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "app:x:1000:1000:app:/home/app:/bin/sh\n")
    (tree / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    (tree / "etc" / "image-marker").write_text("from the image\n")
    image = tmp_path / "image.ext4"
    upper = tmp_path / "upper.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(upper), "32M"], check=True)
    initrd = tmp_path / "initrd.cpio"
    subprocess.run([str(ROOT / "tests/tools/mkinitramfs.py"), guest_binary(), str(initrd)],
                   check=True)
    booted = BootedVm(
        tmp_path, initrd,
        "matchlock.hostname=disky matchlock.root=serial:image matchlock.upper=serial:upper "
        "matchlock.dns=1.1.1.1,9.9.9.9",
        ["-drive", f"file={image},if=none,id=img,format=raw,readonly=on",
         "-device", "virtio-blk-device,drive=img,serial=image",
         "-drive", f"file={upper},if=none,id=up,format=raw",
         "-device", "virtio-blk-device,drive=up,serial=upper"])
    yield booted.client, booted.qemu, booted.console, upper
    booted.close()


@pytest.mark.need_qemu
def test_overlay_root_from_image_and_upper_disks(vm_with_disks):
    client, qemu, console, upper = vm_with_disks
    e = gp.Exec(client, ["sh", "-c", "cat /etc/image-marker; cat /etc/resolv.conf; hostname; "
                                     "echo written > /root/new-file; id -u"], user="")
    assert e.wait(timeout=60)["code"] == 0, bytes(e.stderr)
    out = bytes(e.stdout).decode()
    assert "from the image" in out
    assert "nameserver 1.1.1.1" in out and "nameserver 9.9.9.9" in out
    assert "disky" in out
    # A user from the image's /etc/passwd, with its home as the default cwd.
    e = gp.Exec(client, ["sh", "-c", "id -u; id -g; pwd"], user="app")
    assert e.wait(timeout=60)["code"] == 0
    assert bytes(e.stdout).decode().split() == ["1000", "1000", "/home/app"]
    client.shutdown()
    qemu.wait(timeout=30)
    # The write landed on the upper disk, not the read-only image.
    r = subprocess.run(["debugfs", "-R", "cat /upper/root/new-file", str(upper)],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout == "written\n", r.stderr


@pytest.mark.need_qemu
def test_nic_configured_with_netlink_and_cpu_quota(tmp_path):
    """A NIC (QEMU user networking with restrict=on: nothing leaves the VM) is configured by the
    guest over rtnetlink from kernel parameters, and a fractional CPU request becomes the exec
    cgroup's cpu.max."""
    booted = BootedVm(tmp_path, busybox_initrd(tmp_path),
                      "matchlock.ip=10.0.2.15/24 matchlock.gw=10.0.2.2 matchlock.mtu=1400 "
                      "matchlock.cpus=0.5",
                      ["-netdev", "user,id=n0,restrict=on",
                       "-device", "virtio-net-device,netdev=n0"])
    try:
        e = gp.Exec(booted.client, ["sh", "-c",
                                    "ip -4 addr show eth0; ip route; ip link show lo; "
                                    "cat /sys/fs/cgroup/sandbox/cpu.max; cat /proc/self/cgroup"])
        assert e.wait(timeout=60)["code"] == 0, bytes(e.stderr)
        out = bytes(e.stdout).decode()
        assert "inet 10.0.2.15/24" in out
        assert "mtu 1400" in out
        assert "default via 10.0.2.2 dev eth0" in out
        assert "LOOPBACK,UP" in out
        assert "50000 100000" in out
        assert "0::/sandbox" in out
    finally:
        booted.close()
