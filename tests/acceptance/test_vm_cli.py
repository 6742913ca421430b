# SPDX-License-Identifier: Apache-2.0
"""The VM runtime through the CLI, with real micro-VMs (QEMU microvm under TCG) booted from the
busybox fixture image: run/exec/list/inspect/log/kill/rm/prune, stdin, env/cwd/user, a TTY,
concurrency, cancellation, crash detection, and that nothing is left behind."""
import json
import os
import pty
import signal
import subprocess
import threading
import time

import pytest

from framework.vm import VmEnv, qemu_pids

pytestmark = pytest.mark.need_qemu


@pytest.fixture
def vm(tmp_path, kernel, busybox_tar):
    env = VmEnv(tmp_path, kernel)
    env.import_image(busybox_tar)
    yield env
    # Whatever a test left running is torn down, and the teardown itself must leave nothing.
    env.run("kill", "--all")
    env.run("prune")
    assert env.run_dirs() == []
    assert qemu_pids(str(env.home)) == []


def test_run_prints_output_returns_exit_code_and_leaves_nothing(vm):
    r = vm.run("run", "--image", "busybox:latest", "--", "sh", "-c",
               "echo out; echo err >&2; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "out\n"
    assert "err\n" in r.stderr
    assert vm.sandboxes() == []
    assert vm.run_dirs() == []
    assert qemu_pids(str(vm.home)) == []


def test_stdin_env_cwd_user(vm):
    r = vm.run("run", "-i", "--image", "busybox:latest", "-e", "GREETING=hi there", "-w", "/tmp",
               "-u", "1000:1000", "--", "sh", "-c", 'cat; echo "$GREETING"; pwd; id -u; id -g',
               input="from stdin\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:5] == ["from stdin", "hi there", "/tmp", "1000", "1000"]


def test_tty_session_through_a_pty(vm):
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(vm.binary, [vm.binary, "run", "-it", "--image", "busybox:latest", "--", "sh",
                              "-c", "tty; stty size"], vm.env)
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"/dev/pts/" in out


def test_detached_sandbox_serves_concurrent_execs(vm):
    r = vm.run("run", "-d", "--image", "busybox:latest", check=True)
    sid = r.stdout.strip()
    assert sid.startswith("vm-")
    [row] = vm.sandboxes()
    assert row["id"] == sid and row["status"] == "running"
    results = {}

    def ex(name, script):
        results[name] = vm.run("exec", sid, "--", "sh", "-c", script)

    threads = [threading.Thread(target=ex, args=("slow", "sleep 2; echo slow")),
               threading.Thread(target=ex, args=("fast", "echo fast"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results["slow"].stdout == "slow\n" and results["fast"].stdout == "fast\n"
    inspect = json.loads(vm.run("inspect", sid, check=True).stdout)
    assert inspect["status"] == "running" and inspect["supervisor"]["alive"] is True
    assert "init reached" in vm.run("log", sid, check=True).stdout
    # kill then rm: no QEMU, no run dir, no rows.
    vm.run("kill", sid, check=True)
    assert qemu_pids(sid) == []
    assert vm.run("rm", sid).returncode == 0
    assert vm.sandboxes() == [] and vm.run_dirs() == []


def test_ctrl_c_on_exec_kills_the_guest_process_group(vm):
    sid = vm.run("run", "-d", "--image", "busybox:latest", check=True).stdout.strip()
    # A background member of the group beats; another exec (which cannot see the group: each
    # exec has its own PID namespace) watches the beat stop.
    p = vm.popen("exec", sid, "--", "sh", "-c",
                 "(i=0; while :; do i=$((i+1)); echo $i > /tmp/beat; sleep 0.1; done) & "
                 "sleep 301; wait",
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)

    def beating():
        out = vm.run("exec", sid, "--", "sh", "-c", "cat /tmp/beat; sleep 0.5; cat /tmp/beat",
                     check=True).stdout.split()
        return out[0] != out[1]

    assert beating()
    start = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.wait(timeout=10)
    gone = False
    while time.monotonic() - start < 5:
        if not beating():
            gone = True
            break
    assert gone, "guest processes survived cancel"


def test_two_sandboxes_at_once_and_rm_refuses_running(vm):
    a = vm.run("run", "-d", "--image", "busybox:latest", check=True).stdout.strip()
    b = vm.run("run", "-d", "--image", "busybox:latest", "--hostname", "second",
               check=True).stdout.strip()
    assert vm.run("exec", a, "--", "sh", "-c", "hostname", check=True).stdout.strip() == a
    assert vm.run("exec", b, "--", "sh", "-c", "hostname", check=True).stdout.strip() == "second"
    r = vm.run("rm", a)
    assert r.returncode != 0 and "is running" in r.stderr
    assert vm.run("rm", "-f", a, b).returncode == 0
    assert vm.sandboxes() == [] and qemu_pids(str(vm.home)) == []


def test_dead_supervisor_is_reported_as_crashed_and_cleaned_up(vm):
    sid = vm.run("run", "-d", "--image", "busybox:latest", check=True).stdout.strip()
    [row] = vm.sandboxes()
    assert qemu_pids(sid) != []
    os.kill(row["pid"], signal.SIGKILL)
    # The VMM dies with its supervisor (PR_SET_PDEATHSIG), before any command looks.
    deadline = time.monotonic() + 1.0
    while qemu_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_pids(sid) == [], "QEMU outlived its supervisor by more than 1 s"
    [row] = vm.sandboxes()
    assert row["status"] == "crashed"
    r = vm.run("exec", sid, "--", "true")
    assert r.returncode != 0 and "not running" in r.stderr
    assert vm.run("prune", check=True).stdout.count("Pruned") >= 1
    assert qemu_pids(sid) == [] and vm.run_dirs() == []


def test_guest_that_never_becomes_ready_fails_clearly_within_the_bound(vm, tmp_path):
    # busybox as /init boots but never speaks the protocol.
    vm.env["MATCHLOCK_GUEST"] = "/bin/busybox"
    start = time.monotonic()
    r = vm.run("run", "--boot-timeout", "5", "--image", "busybox:latest", "--", "true",
               timeout=60)
    assert r.returncode != 0
    assert "did not become ready within 5 s" in r.stderr
    assert time.monotonic() - start < 30
    assert vm.sandboxes() == [] and vm.run_dirs() == []


def test_accel_auto_lands_on_tcg_or_working_kvm_without_hanging(vm):
    vm.env.pop("MATCHLOCK_ACCEL")
    start = time.monotonic()
    r = vm.run("run", "--accel", "auto", "--image", "busybox:latest", "--", "echo", "ok",
               timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert time.monotonic() - start < 60


def test_rm_false_keeps_the_sandbox_running(vm):
    r = vm.run("run", "--rm=false", "--image", "busybox:latest", "--", "echo", "kept")
    assert r.returncode == 0 and r.stdout == "kept\n", r.stderr
    assert "is running" in r.stderr
    [row] = vm.sandboxes()
    assert row["status"] == "running"
    assert vm.run("exec", row["id"], "--", "echo", "again", check=True).stdout == "again\n"
    assert vm.run("rm", "-f", row["id"]).returncode == 0
    assert vm.sandboxes() == [] and vm.run_dirs() == []


def test_bad_inputs_fail_before_any_state_exists(vm):
    vm.env["MATCHLOCK_KERNEL"] = "/nonexistent/vmlinux"
    r = vm.run("run", "--image", "busybox:latest", "--", "true")
    assert r.returncode == 66 and "MATCHLOCK_KERNEL=/nonexistent/vmlinux" in r.stderr
    vm.env.pop("MATCHLOCK_KERNEL")
    r = vm.run("run", "--image", "no-such-image:latest", "--", "true")
    assert r.returncode == 65 and "no-such-image" in r.stderr
    r = vm.run("run", "-d", "-it", "--image", "busybox:latest")
    assert r.returncode == 65 and "--detach cannot be combined" in r.stderr
    assert vm.sandboxes() == [] and vm.run_dirs() == []


def test_guest_clock_follows_the_host(vm):
    # microvm has no RTC: without the host's time the guest would live in 1970.
    r = vm.run("run", "--image", "busybox:latest", "--", "sh", "-c", "date +%s")
    assert r.returncode == 0, r.stderr
    assert abs(int(r.stdout) - time.time()) < 120
