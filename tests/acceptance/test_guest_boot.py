# SPDX-License-Identifier: Apache-2.0
"""The guest kernel built by guest/kernel/build.sh boots under QEMU microvm (TCG) and reaches
matchlock-guest as PID 1, which reports and powers the VM off. Bounded: a hang fails the test."""
import os
import pathlib
import subprocess
import time

import pytest

from framework.kernel import guest_kernel

ROOT = pathlib.Path(__file__).resolve().parents[2]
BOOT_BOUND_S = 60


@pytest.mark.need_qemu
def test_guest_kernel_reaches_init_and_powers_off(tmp_path):
    guest = os.environ.get("MATCHLOCK_GUEST", str(ROOT / "build" / "matchlock-guest"))
    assert os.access(guest, os.X_OK), f"{guest} not built"
    initrd = tmp_path / "probe.cpio"
    subprocess.run([str(ROOT / "tests/tools/mkinitramfs.py"), guest, str(initrd)], check=True)
    cmd = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-accel", "tcg",
           "-smp", "2", "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
           "-no-reboot", "-serial", "stdio", "-kernel", guest_kernel(), "-initrd", str(initrd),
           "-append", "console=ttyS0 reboot=t panic=-1 quiet matchlock.probe=1"]
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=BOOT_BOUND_S)
    elapsed = time.monotonic() - start
    assert "matchlock-guest: init reached" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, r.stderr
    print(f"boot to power-off: {elapsed:.2f}s")
