# SPDX-License-Identifier: Apache-2.0
import os
import pathlib
import shutil
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


# ---- VM fixtures: the guest kernel and the busybox image every VM test boots ------------------

@pytest.fixture(scope="session")
def kernel():
    from framework.kernel import guest_kernel
    return guest_kernel()


@pytest.fixture(scope="session")
def busybox_tar():
    from framework.vm import busybox_save_tar
    return busybox_save_tar()


# ---- image fixtures (docs/images.md): offline test images and local registries -----------------

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import registry as _registry  # noqa: E402


def _build_fixture(which):
    if which == "agent" and os.geteuid() != 0:
        pytest.skip("debootstrap (agent test image) needs root")
    tools = {"busybox": ["/bin/busybox"], "agent": ["debootstrap"]}[which]
    for tool in tools:
        if not (os.access(tool, os.X_OK) if tool.startswith("/") else shutil.which(tool)):
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "build_images.py"),
                          which], check=True, capture_output=True, text=True, timeout=1800)
    return pathlib.Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def image_fixtures():
    """{'busybox': dir, 'agent': dir}; built once per machine and cached by their inputs."""
    return {"busybox": _build_fixture("busybox"), "agent": _build_fixture("agent")}


def _start_registry(tmp_path_factory, fixtures, **kwargs):
    missing = _registry.missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/setup installs them)")
    reg = _registry.Registry(tmp_path_factory.mktemp("registry"), **kwargs).start()
    try:
        reg.push(fixtures["busybox"] / "busybox-oci", "test/busybox")
        reg.push(fixtures["agent"] / "agent-oci", "test/agent")
    except BaseException:
        reg.stop()
        raise
    return reg


@pytest.fixture(scope="session")
def registry_http(tmp_path_factory, image_fixtures):
    reg = _start_registry(tmp_path_factory, image_fixtures)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def registry_https_auth(tmp_path_factory, image_fixtures):
    reg = _start_registry(tmp_path_factory, image_fixtures, tls=True, auth=True)
    yield reg
    reg.stop()
