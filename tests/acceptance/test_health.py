# SPDX-License-Identifier: Apache-2.0
"""Healthchecks (docs/health.md) with real micro-VMs (busybox, no network): probes run in the guest
through the agent; `up --wait` waits for healthy and fails on unhealthy; `ps` shows health; a
healthcheck edit applies live; an unhealthy sandbox is reported and repaired by the watch loop,
with backoff while it keeps failing."""
import json
import signal
import sqlite3
import subprocess
import threading
import time

import pytest

from framework.vm import VmEnv, qemu_pids, supervisor_pids

pytestmark = pytest.mark.need_qemu

SPEC = """
name = "hc"
[sandboxes.h]
image = "busybox:latest"
memory = "128MiB"
command = ["sh", "-c", "touch /tmp/ok; exec sleep 100000"]
network = {{ no_network = true }}
[sandboxes.h.healthcheck]
test = {test}
interval = "{interval}"
timeout = "2s"
retries = 2
"""
PASSES_WHILE_OK = '["CMD-SHELL", "test -f /tmp/ok"]'


@pytest.fixture
def vm(tmp_path, kernel, busybox_tar):
    env = VmEnv(tmp_path, kernel)
    env.import_image(busybox_tar)
    env.spec = tmp_path / "hc.toml"
    yield env
    env.run("down", "-p", "hc", timeout=120)
    env.run("prune")
    assert qemu_pids(str(env.home)) == []
    assert supervisor_pids(str(env.home)) == []


def write(vm, test=PASSES_WHILE_OK, interval="1s"):
    vm.spec.write_text(SPEC.format(test=test, interval=interval))


def row(vm):
    (r,) = json.loads(vm.run("ps", "-p", "hc", "-o", "json", check=True).stdout)
    return r


def wait_for(vm, pred, what, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = row(vm)
        if pred(r):
            return r
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {row(vm)}")


def health_events(vm, sid):
    db = sqlite3.connect(str(vm.home / "state.db"))
    try:
        return [k for (k,) in db.execute("select kind from events where sandbox_id = ? and "
                                         "kind like 'health.%' order by id", (sid,))]
    finally:
        db.close()


def test_up_wait_ps_live_edit_and_unhealthy(vm):
    write(vm)
    p = vm.run("up", "-f", vm.spec, "--wait", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "warning" not in p.stderr, p.stderr
    r = row(vm)
    assert r["status"] == "running" and r["health"] == "healthy", r  # --wait waited for it
    human = vm.run("ps", "-p", "hc", check=True).stdout
    assert "running (healthy)" in human, human
    sup, vmm = supervisor_pids(r["id"]), qemu_pids(r["id"])

    # A healthcheck edit is live: same supervisor and VMM, the new check in effect.
    write(vm, interval="2s")
    p = vm.run("up", "-f", vm.spec, check=True)
    assert "~ update h" in p.stdout and "healthcheck changed" in p.stdout, p.stdout
    assert supervisor_pids(r["id"]) == sup and qemu_pids(r["id"]) == vmm
    wait_for(vm, lambda x: x["health"] == "healthy", "healthy under the new check")

    # Break what the check looks at: two failures in a row make it unhealthy, with the reason.
    vm.run("exec", r["id"], "--", "sh", "-c", "rm /tmp/ok", check=True)
    bad = wait_for(vm, lambda x: x["status"] == "unhealthy", "unhealthy")
    assert "healthcheck failed 2 time(s) in a row: exit 1" in bad["detail"], bad
    assert health_events(vm, r["id"])[-2:] == ["health.healthy", "health.unhealthy"]
    assert supervisor_pids(r["id"]) == sup  # only reported so far: nothing restarted it

    # The plan says why it would repair it.
    plan = vm.run("plan", "-f", vm.spec).stdout
    assert "-/+ recreate h" in plan and "unhealthy: healthcheck failed" in plan, plan

    # `up --wait` on a check that cannot pass fails that sandbox and says why.
    write(vm, test='["CMD-SHELL", "exit 1"]')
    p = vm.run("up", "-f", vm.spec, "--wait", timeout=300)
    assert p.returncode != 0
    assert "is unhealthy: healthcheck failed 2 time(s) in a row: exit 1" in p.stdout, p.stdout


def test_watch_repairs_an_unhealthy_sandbox_and_backs_off(vm):
    write(vm)
    vm.run("up", "-f", vm.spec, "--wait", check=True, timeout=300)
    first = row(vm)
    watch = vm.popen("reconcile", "-f", vm.spec, "--watch", "--interval", "1s",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def pump():
        for line in watch.stdout:
            lines.append(line)

    reader = threading.Thread(target=pump)
    reader.start()
    try:
        vm.run("exec", first["id"], "--", "sh", "-c", "rm /tmp/ok", check=True)
        # Repaired: recreated (a new supervisor), its command makes the check pass again.
        again = wait_for(vm, lambda x: x["pid"] != first["pid"] and x["health"] == "healthy",
                         "repaired and healthy", timeout=180)
        assert again["id"] == first["id"] and again["generation"] > first["generation"]

        # A check that can never pass: repaired, then backing off instead of repairing in a loop.
        write(vm, test='["CMD-SHELL", "exit 1"]')
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("repaired unhealthy 2×" in line
                                                      for line in lines):
            time.sleep(0.5)
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=120)
        reader.join(timeout=10)
    out = "".join(lines)
    assert watch.returncode == 0, out
    assert "-/+ recreate h" in out and "unhealthy" in out, out
    # Each repair is reported, and the second waits longer than the first (5 s, then 10 s).
    assert "repaired unhealthy 1×, next repair in" in out, out
    assert "repaired unhealthy 2×, next repair in" in out, out
