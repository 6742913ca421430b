# SPDX-License-Identifier: Apache-2.0
"""Declarative sandboxes with real micro-VMs (QEMU microvm under TCG, busybox fixture image):
up → exec → idempotent up → edit → plan with reasons → up → drift repair → down, dry runs that
leave the state DB byte-identical, kill -9 of `up` at every step, the project lock, and per-sandbox
failures that leave the other sandboxes alone."""
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from framework.vm import VmEnv, qemu_pids, supervisor_pids

pytestmark = pytest.mark.need_qemu

TWO = """\
name = "demo"

[sandboxes.db]
image = "busybox:latest"
memory = "{db_memory}"

[sandboxes.web]
image = "busybox:latest"
memory = "256MiB"
depends_on = ["db"]
env = {{ ROLE = "web" }}
"""


@pytest.fixture
def vm(tmp_path, kernel, busybox_tar):
    env = VmEnv(tmp_path, kernel)
    env.import_image(busybox_tar)
    env.specs = tmp_path / "specs"
    env.specs.mkdir()
    yield env
    env.run("down", "-p", "demo", "-v")
    env.run("kill", "--all")
    env.run("prune")
    assert env.run_dirs() == []
    assert qemu_pids(str(env.home)) == []
    assert supervisor_pids(str(env.home)) == []


def write_spec(vm, db_memory="256MiB", text=None):
    path = vm.specs / "sandbox.toml"
    path.write_text(text if text is not None else TWO.format(db_memory=db_memory))
    return path


def ps(vm):
    rows = json.loads(vm.run("ps", "-p", "demo", "-o", "json", check=True).stdout)
    return {r["name"]: r for r in rows}


def up_json(vm, *args, check=True):
    r = vm.run("up", "-f", vm.specs, "-o", "json", *args, timeout=300)
    if check:
        assert r.returncode in (0, 2), r.stdout + r.stderr
    return r, json.loads(r.stdout) if r.stdout.strip() else None


def actions(result):
    return {a["sandbox"]: a for a in result["projects"][0]["plan"]["actions"]}


def assert_nothing_left(vm):
    assert vm.run_dirs() == []
    assert qemu_pids(str(vm.home)) == []
    assert supervisor_pids(str(vm.home)) == []
    counts = vm.db_counts()
    assert all(v == 0 for v in counts.values()), counts


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_up_exec_noop_edit_repair_down(vm):
    write_spec(vm)
    r = vm.run("up", "-f", vm.specs, "--wait", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "+ create db" in r.stdout and "+ create web" in r.stdout
    before = ps(vm)
    assert {n: row["status"] for n, row in before.items()} == {"db": "running", "web": "running"}
    assert before["web"]["spec"] == str(vm.specs / "sandbox.toml")

    # exec by sandbox name, with the spec's env.
    r = vm.run("exec", "web", "--", "sh", "-c", 'echo "$ROLE on $(hostname)"; echo kept > /etc/kept-by-test; sync')
    assert r.returncode == 0, r.stderr
    assert r.stdout == "web on web\n"

    # A second up is a noop: nothing restarted, same supervisors, fast, exit 0.
    r = vm.run("up", "-f", vm.specs, "--detailed-exitcode")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "up to date" in r.stdout
    after = ps(vm)
    assert {n: row["pid"] for n, row in after.items()} == {n: row["pid"] for n, row in before.items()}
    assert {n: row["generation"] for n, row in after.items()} == \
        {n: row["generation"] for n, row in before.items()}

    # Edit memory: the plan names the field and the values; web is untouched.
    write_spec(vm, db_memory="320MiB")
    r = vm.run("plan", "-f", vm.specs, "--detailed-exitcode")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "-/+ recreate db" in r.stdout
    assert "memory: 256 MiB → 320 MiB" in r.stdout
    r, out = up_json(vm, "--wait")
    assert actions(out)["db"]["action"] == "recreate"
    assert actions(out)["web"]["action"] == "noop"
    assert all(x["ok"] for x in out["projects"][0]["results"])
    now = ps(vm)
    assert now["db"]["pid"] != before["db"]["pid"] and now["db"]["id"] == before["db"]["id"]
    assert now["web"]["pid"] == before["web"]["pid"]
    r = vm.run("exec", "db", "--", "sh", "-c", "free -m | awk '/Mem/ {print $2}'", check=True)
    assert 280 < int(r.stdout) <= 320

    # Drift: kill the web VM's QEMU behind our back; ps sees it, up repairs it, data survives.
    web_id = now["web"]["id"]
    for pid in qemu_pids(web_id):
        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while ps(vm)["web"]["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ps(vm)["web"]["status"] in ("vm-died", "crashed")
    r, out = up_json(vm, "--wait")
    assert actions(out)["web"]["action"] == "recreate"
    assert any("VM process" in reason for reason in actions(out)["web"]["reasons"])
    assert ps(vm)["web"]["status"] == "running"
    assert vm.run("exec", "web", "--", "cat", "/etc/kept-by-test", check=True).stdout == "kept\n"

    # down removes everything but the overlay data; -v removes that too.
    r = vm.run("down", "-f", vm.specs, check=True)
    assert "Removed demo/db" in r.stdout and "Removed demo/web" in r.stdout
    assert_nothing_left(vm)
    assert (vm.home / "data" / "demo" / "web" / "upper.ext4").exists()
    vm.run("up", "-f", vm.specs, "--wait", check=True, timeout=300)
    assert vm.run("exec", "web", "--", "cat", "/etc/kept-by-test", check=True).stdout == "kept\n"
    vm.run("down", "-f", vm.specs, "-v", check=True)
    assert_nothing_left(vm)
    assert not (vm.home / "data" / "demo").exists()


def test_dry_run_leaves_the_state_db_byte_identical_and_pulls_nothing(vm):
    write_spec(vm)
    # Before any state exists: a dry run creates none.
    r, out = up_json(vm, "--dry-run")
    assert r.returncode == 0
    assert not (vm.home / "state.db").exists()
    assert {a["action"] for a in actions(out).values()} == {"create"}
    vm.run("up", "-f", vm.specs, "--wait", check=True, timeout=300)
    pids = {n: row["pid"] for n, row in ps(vm).items()}

    write_spec(vm, db_memory="300MiB")
    (vm.specs / "sandbox.toml").write_text(
        TWO.format(db_memory="300MiB") + '\n[sandboxes.extra]\nimage = "registry.invalid/x:1"\n')
    db = vm.home / "state.db"
    before = digest(db)
    images_before = sorted(p.name for p in (vm.home.parent / "cache").rglob("*"))
    r = vm.run("up", "-f", vm.specs, "--dry-run", "--detailed-exitcode")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "would pull registry.invalid/x:1" in r.stdout
    assert "-/+ recreate db" in r.stdout and "+ create extra" in r.stdout
    assert digest(db) == before
    assert sorted(p.name for p in (vm.home.parent / "cache").rglob("*")) == images_before
    assert {n: row["pid"] for n, row in ps(vm).items()} == pids


def test_kill_9_of_up_at_every_step_then_up_converges(vm):
    write_spec(vm)
    vm.run("up", "-f", vm.specs, "--wait", check=True, timeout=300)
    for fault in ("launch:recorded", "launch:intents", "launch:spawned", "apply:torn-down"):
        write_spec(vm, db_memory="300MiB" if fault.endswith("d") else "280MiB")
        r = vm.run("up", "-f", vm.specs, "--force-recreate", env={"MATCHLOCK_FAULT": fault},
                   timeout=300)
        assert r.returncode == -signal.SIGKILL, (fault, r.stdout, r.stderr)
        r = vm.run("up", "-f", vm.specs, "--wait", timeout=300)
        assert r.returncode == 0, (fault, r.stdout, r.stderr)
        rows = ps(vm)
        assert {n: row["status"] for n, row in rows.items()} == {"db": "running", "web": "running"}, \
            (fault, rows)
        # Exactly one VM and one supervisor per sandbox; run dirs are exactly the live ids.
        assert len(qemu_pids(str(vm.home))) == 2, fault
        assert len(supervisor_pids(str(vm.home))) == 2, fault
        assert vm.run_dirs() == sorted(row["id"] for row in rows.values()), fault
        assert vm.run("exec", "db", "--", "true").returncode == 0
        # A further up has nothing left to do.
        assert vm.run("up", "-f", vm.specs, "--detailed-exitcode").returncode == 0, fault
    vm.run("down", "-p", "demo", check=True)
    assert_nothing_left(vm)


def test_a_second_up_waits_for_the_project_lock_or_fails_clearly(vm):
    write_spec(vm)
    lock_dir = vm.home / "locks"
    lock_dir.mkdir(parents=True)
    with open(lock_dir / "demo.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        r = vm.run("up", "-f", vm.specs, "--lock-timeout", "1")
        assert r.returncode != 0
        assert "project demo is locked by another matchlock command (pid 4242)" in r.stderr
        assert not (vm.home / "state.db").exists() or vm.db_counts()["sandboxes"] == 0
        # A waiting up proceeds as soon as the holder lets go.
        waiter = vm.popen("up", "-f", vm.specs, "--lock-timeout", "60", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        assert waiter.poll() is None
        fcntl.flock(held, fcntl.LOCK_UN)
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, out + err
    assert "waiting for another matchlock command on project demo" in err


def test_the_run_project_name_is_reserved(vm):
    write_spec(vm)
    r = vm.run("up", "-f", vm.specs, "-p", "default", "--remove-orphans")
    assert r.returncode == 65, r.stderr
    assert "project name 'default' is reserved for `matchlock run` sandboxes" in r.stderr


def test_bad_spec_aborts_before_any_change(vm):
    write_spec(vm)
    vm.run("up", "-f", vm.specs, check=True, timeout=300)
    pids = {n: row["pid"] for n, row in ps(vm).items()}
    (vm.specs / "broken.yaml").write_text("name: demo\nsandboxes:\n  extra:\n    image: 7\n    cpus: lots\n")
    write_spec(vm, db_memory="300MiB")
    r = vm.run("up", "-f", vm.specs)
    assert r.returncode != 0
    assert "broken.yaml:5:11: sandboxes.extra.cpus" in r.stderr, r.stderr
    assert {n: row["pid"] for n, row in ps(vm).items()} == pids
    assert "extra" not in ps(vm)


def test_a_failing_sandbox_is_reported_without_touching_the_others(vm):
    write_spec(vm, text=TWO.format(db_memory="256MiB") + """
[sandboxes.ghost]
image = "registry.invalid/ghost:1"

[sandboxes.after-ghost]
image = "busybox:latest"
depends_on = ["ghost"]

[sandboxes.keyed]
image = "busybox:latest"
secrets = [{ name = "API_KEY", from_env = "UP_TEST_API_KEY", hosts = ["api.example.com"] }]
""")
    r, out = up_json(vm, "--wait", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    results = {x["sandbox"]: x for x in out["projects"][0]["results"]}
    assert not results["ghost"]["ok"] and "registry.invalid/ghost:1" in results["ghost"]["error"]
    assert results["after-ghost"]["skipped"]
    assert results["after-ghost"]["error"] == "not started: dependency ghost failed"
    assert not results["keyed"]["ok"]
    assert "UP_TEST_API_KEY is not set" in results["keyed"]["error"]
    assert results["db"]["ok"] and results["web"]["ok"]
    rows = ps(vm)
    assert rows["db"]["status"] == "running" and rows["web"]["status"] == "running"
    assert "ghost" not in rows and "keyed" not in rows

    # Secrets: the value never reaches the DB; rotating it is detected and recreates.
    env = {"UP_TEST_API_KEY": "sk-first-value"}
    r = vm.run("up", "-f", vm.specs, "keyed", "--wait", env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"sk-first-value" not in (vm.home / "state.db").read_bytes()
    r = vm.run("up", "-f", vm.specs, "keyed", "--detailed-exitcode", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = vm.run("plan", "-f", vm.specs, "keyed", env={"UP_TEST_API_KEY": "sk-rotated"})
    assert "secret values rotated" in r.stdout, r.stdout
    assert "sk-" not in r.stdout + r.stderr


def test_orphans_are_kept_unless_asked_and_ps_shows_the_source(vm):
    write_spec(vm)
    vm.run("up", "-f", vm.specs, check=True, timeout=300)
    write_spec(vm, text='name = "demo"\n[sandboxes.db]\nimage = "busybox:latest"\n'
                        'memory = "256MiB"\n')
    r = vm.run("up", "-f", vm.specs, "--detailed-exitcode")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "! orphan web" in r.stdout
    assert "web" in ps(vm)
    r = vm.run("up", "-f", vm.specs, "--remove-orphans")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "- remove web" in r.stdout
    assert set(ps(vm)) == {"db"}


def test_removed_run_dir_is_detected_and_repaired_without_leaks(vm):
    write_spec(vm)
    vm.run("up", "-f", vm.specs, "--wait", check=True, timeout=300)
    web = ps(vm)["web"]
    subprocess.run(["rm", "-rf", str(vm.home / "run" / web["id"])], check=True)
    row = ps(vm)["web"]
    assert row["status"] == "leaked" and "is gone" in row["detail"], row
    r, out = up_json(vm, "--wait")
    assert actions(out)["web"]["action"] == "recreate"
    assert ps(vm)["web"]["status"] == "running"
    # The old supervisor and VM were killed by their recorded identity, not left behind.
    assert len(qemu_pids(str(vm.home))) == 2
    assert len(supervisor_pids(str(vm.home))) == 2


def test_reconcile_watch_repairs_drift_and_follows_edits(vm):
    write_spec(vm, text=TWO.format(db_memory="256MiB") +
               '\n[sandboxes.ghost]\nimage = "registry.invalid/ghost:1"\n')
    watch = vm.popen("reconcile", "-f", vm.specs, "--watch", "--interval", "1s",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def wait_for(pred, what, timeout=120):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                rows = ps(vm)
                if pred(rows):
                    return rows
                time.sleep(0.5)
            raise AssertionError(f"timed out waiting for {what}: {ps(vm)}")

        rows = wait_for(lambda r: len(r) == 2 and all(x["status"] == "running" for x in r.values()),
                        "db and web running")
        for pid in qemu_pids(rows["db"]["id"]):
            os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda r: r["db"]["pid"] != rows["db"]["pid"] and r["db"]["status"] == "running",
                 "db repaired")
        write_spec(vm, text=TWO.format(db_memory="300MiB") +
                   '\n[sandboxes.ghost]\nimage = "registry.invalid/ghost:1"\n')
        gen = ps(vm)["db"]["generation"]
        wait_for(lambda r: r["db"]["generation"] > gen and r["db"]["status"] == "running",
                 "db recreated after the edit")
    finally:
        watch.send_signal(signal.SIGTERM)
        out, _ = watch.communicate(timeout=60)
    assert watch.returncode == 0, out
    assert "demo/db" in out and "spec files changed" in out
    # The sandbox that cannot start backs off instead of being retried on every pass.
    assert "demo/ghost - failed 1×, retry in" in out, out


def test_a_moved_image_tag_recreates_with_the_digest_in_the_reason(vm, image_fixtures):
    write_spec(vm)
    vm.run("up", "-f", vm.specs, "--wait", check=True, timeout=300)
    # Re-point busybox:latest at other content, as a `pull` of a moved tag would.
    vm.import_layout(image_fixtures["agent"] / "agent-oci", "busybox:latest")
    r = vm.run("plan", "-f", vm.specs, "--detailed-exitcode")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.count("image digest changed: sha256:") == 2, r.stdout
    assert "-/+ recreate db" in r.stdout and "-/+ recreate web" in r.stdout


def test_a_larger_disk_grows_the_kept_data_disk_and_workdir_exists(vm):
    spec = 'name = "demo"\n[sandboxes.box]\nimage = "busybox:latest"\nmemory = "256MiB"\n' \
           'workdir = "/srv/app"\ndisk = "{disk}"\n'
    write_spec(vm, text=spec.format(disk="64MiB"))
    vm.run("up", "-f", vm.specs, "--wait", check=True, timeout=300)
    r = vm.run("exec", "box", "--", "sh", "-c", "pwd; echo x > data; sync; df -m / | tail -1",
               check=True)
    lines = r.stdout.split("\n")
    assert lines[0] == "/srv/app"
    small = int(lines[1].split()[1])
    assert 40 < small <= 64, r.stdout
    write_spec(vm, text=spec.format(disk="128MiB"))
    r = vm.run("up", "-f", vm.specs, "--wait", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "disk: 64 MiB → 128 MiB" in r.stdout
    r = vm.run("exec", "box", "--", "sh", "-c", "cat data; df -m / | tail -1", check=True)
    lines = r.stdout.split("\n")
    assert lines[0] == "x"
    assert 100 < int(lines[1].split()[1]) <= 128, r.stdout


def test_command_runs_at_boot_and_restarts_by_policy(vm):
    write_spec(vm, text='''name = "demo"
[sandboxes.svc]
image = "busybox:latest"
memory = "256MiB"
env = { ROLE = "svc" }
workdir = "/srv"
command = ["sh", "-c", "echo started $$ROLE in $$(pwd); i=0; while :; do i=$$((i+1)); echo $$i > /srv/beat; sleep 0.2; done"]

[sandboxes.flaky]
image = "busybox:latest"
memory = "256MiB"
restart = "on-failure"
command = ["sh", "-c", "echo attempt; exit 3"]

[sandboxes.once]
image = "busybox:latest"
memory = "256MiB"
command = ["sh", "-c", "echo once; exit 3"]
''')
    r = vm.run("up", "-f", vm.specs, "--wait", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "command" not in r.stderr  # no "not started" warning: it is started

    def log(name):
        return vm.run("log", "--main", f"demo/{name}", check=True).stdout

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (log("flaky").count("attempt") < 2 or
                                           "started svc" not in log("svc") or
                                           "exited with code" not in log("once")):
        time.sleep(0.5)
    assert "started svc in /srv" in log("svc")
    flaky = log("flaky")
    assert flaky.count("attempt") >= 2, flaky
    assert "restarting in 1 s (restart: on-failure)" in flaky
    once = log("once")
    assert once.count("once\n") == 1 and "exited with code 3 (restart: no)" in once, once
    # The main process runs inside the sandbox, next to exec'd ones (in a PID namespace of its
    # own, as every exec: its heartbeat is what an exec sees of it).
    r = vm.run("exec", "svc", "--", "sh", "-c", "cat /srv/beat; sleep 1; cat /srv/beat",
               check=True)
    first, second = r.stdout.split()
    assert int(second) > int(first), r.stdout
    # It is part of the sandbox: down leaves no runner behind.
    vm.run("down", "-p", "demo", check=True)
    assert subprocess.run(["pgrep", "-f", f"__main.*{vm.home}"], capture_output=True).stdout == b""
