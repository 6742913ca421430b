# SPDX-License-Identifier: Apache-2.0
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from framework.cli import Matchlock  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def pytest_configure(config):
    for marker in ("need_root", "need_kvm", "need_qemu", "need_firecracker"):
        config.addinivalue_line("markers", f"{marker}: skipped when the machine lacks it")


def pytest_collection_modifyitems(config, items):
    lacks = {
        "need_root": os.geteuid() != 0,
        "need_kvm": not os.access("/dev/kvm", os.R_OK | os.W_OK),
        "need_qemu": not any(
            os.access(os.path.join(p, "qemu-system-x86_64"), os.X_OK)
            for p in os.environ.get("PATH", "").split(":")),
        "need_firecracker": True,  # not packaged in Debian
    }
    for item in items:
        for marker, missing in lacks.items():
            if missing and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"{marker}: not available here"))


@pytest.fixture
def matchlock(tmp_path):
    binary = os.environ.get("MATCHLOCK_BIN", str(ROOT / "build" / "matchlock"))
    if not os.access(binary, os.X_OK):
        pytest.fail(f"matchlock binary not found at {binary}; build first or set MATCHLOCK_BIN")
    home = tmp_path / "home"
    home.mkdir()
    return Matchlock(binary, home)
