# SPDX-License-Identifier: Apache-2.0
"""The guest kernel for tests: MATCHLOCK_KERNEL, else guest/kernel/build.sh (cached build)."""
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[3]


def guest_kernel() -> str:
    path = os.environ.get("MATCHLOCK_KERNEL")
    if path:
        return path
    r = subprocess.run([str(ROOT / "guest/kernel/build.sh")], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout.strip()
