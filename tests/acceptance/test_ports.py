# SPDX-License-Identifier: Apache-2.0
"""Published ports (docs/ports.md) with real micro-VMs: `run -p` with and without a guest network,
`up` with spec `ports`, two sandboxes asking for one host port, live port changes through `up`
(same supervisor and VMM), and 100 MiB each way plus many concurrent connections, checksummed.

Everything runs inside a network namespace the module creates: the CLI, the supervisors (and so
their listeners) and the host-side clients. Nothing is sent outside it."""
import json
import os
import subprocess
import sys
import time

import pytest

from framework.port_tools import SERVE
from framework.vm import VmEnv, qemu_pids, supervisor_pids

pytestmark = [pytest.mark.need_root, pytest.mark.need_qemu]

NETNS = f"ml-ports-{os.getpid()}"
TOOLS = os.path.join(os.path.dirname(__file__), "framework", "port_tools.py")
BASE = 20000 + (os.getpid() % 500) * 10  # host ports of this run: BASE..BASE+9


def in_ns(*argv):
    return ["ip", "netns", "exec", NETNS, *map(str, argv)]


class Env(VmEnv):
    def ml(self, *args, timeout=300, check=False):
        p = subprocess.run(in_ns(self.binary, *args), capture_output=True, text=True, env=self.env,
                           timeout=timeout)
        if check:
            assert p.returncode == 0, f"{args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def serve(self, sid, port):
        """Starts the echo server in the guest, detached from the exec that starts it."""
        self.ml("exec", sid, "--", "sh", "-c",
                f'setsid -f python3 -c "$0" {port} >/dev/null 2>&1 </dev/null', SERVE,
                check=True, timeout=120)


def tool(*args, timeout=600):
    return subprocess.run(in_ns(sys.executable, TOOLS, *args), capture_output=True, text=True,
                          timeout=timeout)


def wait_echo(port, seconds=90):
    p = tool("wait", port, seconds)
    assert p.returncode == 0, p.stderr


def transfer(port, mib, conns):
    p = tool("client", port, mib, conns)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def refused(port):
    return tool("wait", port, 1).returncode != 0


@pytest.fixture(scope="module")
def env(tmp_path_factory, kernel, image_fixtures):
    base = tmp_path_factory.mktemp("ports")
    e = Env(base, kernel)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        subprocess.run(in_ns("ip", "link", "set", "lo", "up"), check=True)
        e.import_layout(image_fixtures["agent"] / "agent-oci", "agent:latest")
        e.base = base
        yield e
    finally:
        for project in ("pp", "pq"):
            e.run("down", "-p", project, "-v", timeout=120)
        e.run("kill", "--all", timeout=120)
        e.run("prune", timeout=120)
        subprocess.run(["ip", "netns", "delete", NETNS])
        assert qemu_pids(str(e.home)) == []
        assert supervisor_pids(str(e.home)) == []


@pytest.fixture(scope="module")
def published(env):
    """`run -d -p` with a guest network: the echo server behind BASE+0."""
    p = env.ml("run", "-d", "--image", "agent:latest", "--memory", "512",
               "-p", f"{BASE}:9000", "--address", "127.0.0.1,localhost")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"Forwarding 127.0.0.1:{BASE} -> 9000" in p.stderr, p.stderr
    assert p.stderr.count("Forwarding") == 1, p.stderr  # localhost is 127.0.0.1: de-duplicated
    sid = p.stdout.strip().splitlines()[-1]
    env.serve(sid, 9000)
    wait_echo(BASE)
    yield sid
    env.ml("rm", "-f", sid, timeout=120)


def test_run_publish_relays_100_mib_each_way(published):
    r = transfer(BASE, 100, 1)
    assert r["ok"] == 1, r
    print(f"\n100 MiB each way through a published port: {r['seconds']} s "
          f"({r['mib_per_s']} MiB/s of echoed data)")


def test_many_concurrent_connections(published):
    r = transfer(BASE, 1, 32)
    assert r["ok"] == 32, r


def test_listener_binds_only_the_requested_address(env, published):
    ss = subprocess.run(in_ns("ss", "-Hltn", f"sport = :{BASE}"), capture_output=True, text=True)
    listeners = [line.split()[3] for line in ss.stdout.splitlines()]
    assert listeners == [f"127.0.0.1:{BASE}"], ss.stdout
    listed = json.loads(env.ml("list", "-o", "json", check=True).stdout)
    assert any(s["id"] == published for s in listed)


def test_a_taken_port_is_a_clear_error_and_the_first_is_unaffected(env, published):
    p = env.ml("run", "-d", "--image", "agent:latest", "-p", f"{BASE}:9000", timeout=300)
    assert p.returncode != 0
    assert f"127.0.0.1:{BASE}" in p.stderr and "in use" in p.stderr.lower(), p.stderr
    assert "vm-" in p.stderr, p.stderr  # names the sandbox that could not publish it
    # Nothing of the refused sandbox is left; the first one still forwards.
    assert [s["id"] for s in env.sandboxes()] == [published]
    assert transfer(BASE, 1, 2)["ok"] == 2


def test_bad_publish_flags_are_refused_before_anything_starts(env):
    before = env.sandboxes()
    for args, needle in ((["-p", "0:80"], "ports must be 1-65535"),
                         (["-p", "80:x"], "ports must be 1-65535"),
                         (["-p", "8080", "--address", "example.com"], "not an IP address"),
                         (["-p", "8080:1", "-p", "8080:2"], "published twice")):
        p = env.ml("run", "-d", "--image", "agent:latest", *args, timeout=60)
        assert p.returncode != 0 and needle in p.stderr, (args, p.stderr)
    assert env.sandboxes() == before


def test_run_publish_without_a_network(env):
    p = env.ml("run", "-d", "--no-network", "--image", "agent:latest", "-p", f"{BASE + 1}:9000")
    assert p.returncode == 0, p.stdout + p.stderr
    sid = p.stdout.strip().splitlines()[-1]
    try:
        # The guest has only lo: the forward is the host's way in, and not a way out.
        links = env.ml("exec", sid, "--", "ls", "/sys/class/net", check=True).stdout.split()
        assert not [n for n in links if n.startswith("eth")], links  # lo (and sit0) only
        env.serve(sid, 9000)
        wait_echo(BASE + 1)
        assert transfer(BASE + 1, 8, 4)["ok"] == 4
    finally:
        env.ml("rm", "-f", sid, timeout=120)
    assert refused(BASE + 1)


SPEC = """
name = "pp"
[sandboxes.a]
image = "agent:latest"
memory = "512MiB"
command = ["python3", "-c", {serve}, "9000"]
ports = [{a_ports}]
{b}"""

B = """
[sandboxes.b]
image = "agent:latest"
memory = "256MiB"
command = ["python3", "-c", {serve}, "9000"]
ports = [{{ host = {port}, guest = 9000 }}]
"""


def pids_of(env, name):
    rows = {r["name"]: r for r in json.loads(env.ml("ps", "-p", "pp", "-o", "json",
                                                    check=True).stdout)}
    sid = rows[name]["id"]
    return sid, supervisor_pids(sid), qemu_pids(sid)


def test_up_publishes_spec_ports_and_changes_them_live(env, tmp_path):
    spec = tmp_path / "sandbox.toml"

    def write(a_ports, b=""):
        spec.write_text(SPEC.format(serve=json.dumps(SERVE), a_ports=a_ports, b=b))

    write(f"{{ host = {BASE + 2}, guest = 9000 }}")
    p = env.ml("up", "-f", spec, "--wait")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "warning" not in p.stderr, p.stderr  # ports are wired now
    wait_echo(BASE + 2)
    before = pids_of(env, "a")
    assert before[1] and before[2]

    # Within one project the spec itself is refused, naming the file, line and the other sandbox.
    write(f"{{ host = {BASE + 2}, guest = 9000 }}", B.format(serve=json.dumps(SERVE),
                                                             port=BASE + 2))
    p = env.ml("up", "-f", spec, "--wait")
    assert p.returncode != 0
    assert f"{spec}:" in p.stderr and "already published by sandbox 'a'" in p.stderr, p.stderr
    # Across projects, the second sandbox fails at its start, naming the port and the sandbox;
    # `a` is untouched.
    write(f"{{ host = {BASE + 2}, guest = 9000 }}")
    other = tmp_path / "other.toml"
    other.write_text('name = "pq"\n' + B.format(serve=json.dumps(SERVE), port=BASE + 2))
    p = env.ml("up", "-f", other, "--wait")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert f"127.0.0.1:{BASE + 2}" in out and "already in use" in out, out
    assert "b failed" in p.stdout, p.stdout
    assert env.ml("down", "-p", "pq", "-v", timeout=120).returncode == 0
    assert pids_of(env, "a") == before
    assert transfer(BASE + 2, 1, 2)["ok"] == 2

    # A port change is live: `~ update` with the reason, same supervisor and VMM, the new port
    # forwards when `up` returns and the old one is closed.
    write(f"{{ host = {BASE + 3}, guest = 9000 }}, {{ host = {BASE + 4}, guest = 9000 }}")
    plan = env.ml("plan", "-f", spec, "a", check=True).stdout
    assert "~ update a" in plan and "ports:" in plan, plan
    p = env.ml("up", "-f", spec, "a", check=True)
    assert "~ update a" in p.stdout and "-/+ recreate" not in p.stdout, p.stdout
    assert pids_of(env, "a") == before
    assert transfer(BASE + 3, 1, 2)["ok"] == 2
    assert transfer(BASE + 4, 1, 1)["ok"] == 1
    assert refused(BASE + 2)

    # A live change that cannot be applied (the port is taken on the host) leaves the running
    # forwards as they were and says why.
    blocker = subprocess.Popen(in_ns(sys.executable, "-c",
                                     "import socket,time;s=socket.socket();"
                                     f"s.bind(('127.0.0.1',{BASE + 5}));s.listen();"
                                     "print('up',flush=True);time.sleep(120)"),
                               stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout.readline().strip() == "up"
        write(f"{{ host = {BASE + 5}, guest = 9000 }}")
        p = env.ml("up", "-f", spec, "a")
        assert p.returncode != 0
        assert f"{BASE + 5}" in p.stdout + p.stderr, p.stdout + p.stderr
        assert transfer(BASE + 3, 1, 1)["ok"] == 1 and transfer(BASE + 4, 1, 1)["ok"] == 1
        assert pids_of(env, "a") == before
    finally:
        blocker.kill()
        blocker.wait()
    # Once the port is free the same spec applies.
    p = env.ml("up", "-f", spec, "a", check=True)
    assert "~ update a" in p.stdout, p.stdout
    wait_echo(BASE + 5)
    assert refused(BASE + 3)
    assert pids_of(env, "a") == before
    env.ml("down", "-p", "pp", "-v", check=True, timeout=120)
    assert refused(BASE + 5)
