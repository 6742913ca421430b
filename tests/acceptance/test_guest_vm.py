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

from framework import guestproto as gp

ROOT = pathlib.Path(__file__).resolve().parents[2]
BOOT_BOUND_S = 60


def guest_kernel() -> str:
    path = os.environ.get("MATCHLOCK_KERNEL")
    if path:
        return path
    r = subprocess.run([str(ROOT / "guest/kernel/build.sh")], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout.strip()


@pytest.fixture
def vm(tmp_path):
    busybox = shutil.which("busybox")
    if not busybox:
        pytest.fail("busybox (busybox-static) is not installed; run scripts/setup")
    guest = os.environ.get("MATCHLOCK_GUEST", str(ROOT / "build" / "matchlock-guest"))
    initrd = tmp_path / "initrd.cpio"
    subprocess.run([str(ROOT / "tests/tools/mkinitramfs.py"), guest, str(initrd),
                    "--busybox", busybox], check=True)
    sock_path = tmp_path / "channel.sock"
    console = tmp_path / "console.log"
    cmd = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-accel", "tcg",
           "-smp", "2", "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
           "-no-reboot", "-serial", f"file:{console}",
           "-kernel", guest_kernel(), "-initrd", str(initrd),
           "-append", "console=ttyS0 reboot=t panic=-1 quiet matchlock.hostname=probe",
           "-device", "virtio-serial-device",
           "-chardev", f"socket,id=ch0,path={sock_path},server=on,wait=off",
           "-device", "virtserialport,chardev=ch0,name=matchlock.0"]
    qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + BOOT_BOUND_S
        while not sock_path.exists():
            assert qemu.poll() is None, qemu.stderr.read().decode()
            assert time.monotonic() < deadline, "QEMU did not create its channel socket"
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock_path))
        client = gp.Client(s)
        start = time.monotonic()
        client.handshake(timeout=BOOT_BOUND_S)
        status = client.ready(timeout=BOOT_BOUND_S)
        client.boot_seconds = time.monotonic() - start
        assert status["ok"] is True
        yield client, qemu, console
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait(timeout=10)


@pytest.mark.need_qemu
def test_exec_in_a_real_vm_and_clean_shutdown(vm):
    client, qemu, console = vm
    e = gp.Exec(client, ["sh", "-c", "hostname; cat /proc/1/comm; echo err >&2; exit 7"])
    e.stdin(b"")
    ex = e.wait(timeout=60)
    assert ex["code"] == 7
    assert bytes(e.stdout).decode().split() == ["probe", "init"]
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
    print(f"boot to ready: {client.boot_seconds:.2f}s")


@pytest.fixture
def vm_with_disks(tmp_path):
    """Boots with an image disk (ext4 from a busybox tree, read-only) and a writable upper disk,
    as the VM runtime will: the guest assembles an overlay root and switches to it."""
    busybox = shutil.which("busybox")
    guest = os.environ.get("MATCHLOCK_GUEST", str(ROOT / "build" / "matchlock-guest"))
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
    subprocess.run([str(ROOT / "tests/tools/mkinitramfs.py"), guest, str(initrd)], check=True)
    sock_path = tmp_path / "channel.sock"
    console = tmp_path / "console.log"
    cmd = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-accel",
           "tcg", "-smp", "2", "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
           "-no-reboot", "-serial", f"file:{console}", "-kernel", guest_kernel(),
           "-initrd", str(initrd),
           "-append", "console=ttyS0 reboot=t panic=-1 quiet matchlock.hostname=disky "
                      "matchlock.root=serial:image matchlock.upper=serial:upper "
                      "matchlock.dns=1.1.1.1,9.9.9.9",
           "-drive", f"file={image},if=none,id=img,format=raw,readonly=on",
           "-device", "virtio-blk-device,drive=img,serial=image",
           "-drive", f"file={upper},if=none,id=up,format=raw",
           "-device", "virtio-blk-device,drive=up,serial=upper",
           "-device", "virtio-serial-device",
           "-chardev", f"socket,id=ch0,path={sock_path},server=on,wait=off",
           "-device", "virtserialport,chardev=ch0,name=matchlock.0"]
    qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + BOOT_BOUND_S
        while not sock_path.exists():
            assert qemu.poll() is None, qemu.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock_path))
        client = gp.Client(s)
        client.handshake(timeout=BOOT_BOUND_S)
        assert client.ready(timeout=BOOT_BOUND_S)["ok"] is True
        yield client, qemu, console, upper
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait(timeout=10)


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
