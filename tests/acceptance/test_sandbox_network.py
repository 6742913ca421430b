# SPDX-License-Identifier: Apache-2.0
"""Sandbox networks end to end (issue sandbox-network): a real TCG micro-VM booted from the agent
image (curl, python3) whose only way out is its supervisor's proxy and resolver, against a
test-made "internet" namespace holding HTTP/HTTPS servers (test CA) and dnsmasq.

  host netns (matchlock runs here, via nsenter)  ──veth──  internet netns
  198.51.100.1                                             198.51.100.10-13, .53 (dnsmasq), 10.99.0.2

Nothing leaves the namespaces the test creates; they are removed at teardown."""
import json
import os
import pathlib
import shutil
import subprocess
import time

import pytest

from framework import egress
from framework.egress import GOOD_IP, PRIVATE_IP, DNS_IP, run
from framework.hook_server import HookServer

pytestmark = [pytest.mark.need_root, pytest.mark.need_qemu]
SECRET_VALUE = "sk-real-value-5c1d9e"
TOOLS = ("ip", "nft", "curl", "openssl", "dnsmasq", "nsenter")


class Internet(egress.Topology):
    """egress.Topology without the client namespace and the hand-written nft rules: the router
    namespace plays the host that matchlock runs in."""

    def setup(self):
        r, i = self.router, self.inet
        for n in (r, i):
            run(["ip", "netns", "add", n])
        run(["ip", "link", "add", "r1", "netns", r, "type", "veth", "peer", "i0", "netns", i])
        for n, dev in ((r, "r1"), (i, "i0"), (r, "lo"), (i, "lo")):
            self.ns(n, "ip", "link", "set", dev, "up")
        self.ns(r, "ip", "addr", "add", "198.51.100.1/24", "dev", "r1")
        self.ns(r, "ip", "addr", "add", "10.99.0.1/24", "dev", "r1")
        for ip in (GOOD_IP, egress.OTHER_IP, "198.51.100.12", egress.BAD_CERT_IP, DNS_IP):
            self.ns(i, "ip", "addr", "add", f"{ip}/24", "dev", "i0")
        self.ns(i, "ip", "addr", "add", f"{PRIVATE_IP}/24", "dev", "i0")
        self.ns(i, "ip", "route", "add", "default", "via", "198.51.100.1")
        self.make_certs()
        self.start_servers()
        self.start_dnsmasq()


@pytest.fixture(scope="module")
def internet(tmp_path_factory):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        # scripts/setup installs every one of them: a missing tool is a broken setup, not a skip.
        pytest.fail(f"missing tools (run scripts/setup --deps-only): {missing}")
    t = Internet(tmp_path_factory.mktemp("internet"))
    try:
        t.setup()
        yield t
    finally:
        t.close()


class Sandbox:
    """One sandbox started with `matchlock run -d` inside the router namespace."""

    def __init__(self, internet, home, binary):
        self.internet = internet
        self.home = home
        self.binary = binary
        self.id = None

    def ml(self, *args, env=None, timeout=60, check=False):
        e = dict(os.environ)
        e["MATCHLOCK_HOME"] = str(self.home)
        e.update(env or {})
        p = subprocess.run(["nsenter", f"--net=/run/netns/{self.internet.router}", self.binary,
                            *map(str, args)], capture_output=True, text=True, env=e,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"matchlock {args}: {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def sh(self, script, timeout=60):
        return self.ml("exec", self.id, "--", "sh", "-c", script, timeout=timeout)

    def events(self):
        p = self.ml("events", self.id, "-o", "json", check=True)
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def agent_image(tmp_path_factory, image_fixtures):
    home = tmp_path_factory.mktemp("nethome")
    binary = os.environ.get("MATCHLOCK_BIN", str(egress.ROOT / "build" / "matchlock"))
    layout = image_fixtures["agent"] / "agent-oci"
    tar = subprocess.run(["tar", "-C", str(layout), "-cf", "-", "."], check=True,
                         capture_output=True).stdout
    e = dict(os.environ, MATCHLOCK_HOME=str(home))
    r = subprocess.run([binary, "image", "import", "agent:latest"], input=tar,
                       capture_output=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr
    return home, binary


@pytest.fixture(scope="module")
def sealed(internet, agent_image, kernel):
    """A sealed sandbox: an allow-list with a wildcard, a secret for allowed.test, the test
    internet's resolver and CA. Booted once for the module."""
    home, binary = agent_image
    sb = Sandbox(internet, home, binary)
    p = sb.ml("run", "-d", "--image", "agent:latest", "--allow-host", "allowed.test,*.wild.test",
              "--allow-host", "private.test", "--secret", "API_KEY@allowed.test,b.a.wild.test",
              "--dns-servers", DNS_IP, "--upstream-ca", internet.test_ca,
              "--add-host", "pinned.test:198.51.100.12",
              env={"API_KEY": SECRET_VALUE}, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    sb.id = p.stdout.strip().splitlines()[-1]
    try:
        yield sb
    finally:
        sb.ml("kill", sb.id, timeout=60)
        sb.ml("rm", "-f", sb.id, timeout=60)
        left = run(["ip", "netns", "list"]).stdout
        assert f"ml-{sb.id[3:]}" not in left, left


def curl(sb, url, *args):
    """curl from inside the guest, no TLS flags: returns (http code, body)."""
    q = " ".join(f"'{a}'" for a in args)
    p = sb.sh(f"curl -sS -m 10 -o /tmp/body -w '%{{http_code}}' {q} '{url}'; echo; "
              "cat /tmp/body 2>/dev/null")
    lines = p.stdout.split("\n", 1)
    return lines[0].strip(), (lines[1] if len(lines) > 1 else "") + p.stderr


def last_event(sb, host):
    for _ in range(40):
        evs = [e for e in sb.events() if e["network"]["host"] == host]
        if evs:
            return evs[-1]["network"]
        time.sleep(0.05)
    raise AssertionError(f"no event for {host}")


def test_guest_has_nic_resolver_ca_and_only_placeholders(sealed):
    p = sealed.sh("cat /proc/net/dev; cat /etc/resolv.conf; grep pinned /etc/hosts; "
                  "env | sort; ls /etc/ssl/certs/matchlock-ca.crt")
    assert "eth0:" in p.stdout and "nameserver 10.213." in p.stdout, p.stdout
    assert "198.51.100.12\tpinned.test" in p.stdout
    assert "API_KEY=SANDBOX_SECRET_" in p.stdout
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in p.stdout
    assert "NODE_EXTRA_CA_CERTS=/etc/ssl/certs/matchlock-ca.crt" in p.stdout
    assert SECRET_VALUE not in p.stdout


def test_allowed_host_over_https_with_no_flags(sealed):
    code, body = curl(sealed, "https://allowed.test/hello")
    assert code == "200", body
    assert "hello from 198.51.100.10 /hello" in body
    n = last_event(sealed, "allowed.test")
    assert n["status_code"] == 200 and not n["blocked"]
    # python's ssl trusts the sandbox CA as well (REQUESTS_CA_BUNDLE / system bundle).
    p = sealed.sh("python3 -c \"import urllib.request;"
                  "print(urllib.request.urlopen('https://allowed.test/py').status)\"")
    assert p.stdout.strip() == "200", p.stderr


def test_secret_substituted_in_header_and_query(sealed):
    internet = sealed.internet
    # The guest's shell expands $API_KEY: it only ever holds the placeholder.
    p = sealed.sh("curl -sS -m 10 -H \"Authorization: Bearer $API_KEY\" "
                  "\"https://allowed.test/secret?key=$API_KEY\"")
    assert SECRET_VALUE not in p.stdout + p.stderr
    seen = [r for r in internet.server_requests() if r["path"].startswith("/secret?key=sk")][-1]
    assert seen["headers"]["Authorization"] == f"Bearer {SECRET_VALUE}"
    assert seen["path"] == f"/secret?key={SECRET_VALUE}"
    events = (sealed.home / "events" / f"{sealed.id}.jsonl").read_text()
    assert SECRET_VALUE not in events
    for log in (sealed.home / "run" / sealed.id).glob("*.log"):
        assert SECRET_VALUE not in log.read_text(errors="replace"), log
    assert SECRET_VALUE.encode() not in (sealed.home / "state.db").read_bytes()
    # `run` read it from its env var; the supervisor and QEMU start with a reduced environment.
    import sqlite3
    db = sqlite3.connect(str(sealed.home / "state.db"))
    pid = db.execute("select supervisor_pid from sandboxes where id=?", (sealed.id,)).fetchone()[0]
    db.close()
    children = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert children, "no QEMU under the supervisor"
    for p in [pid, *children]:
        environ = pathlib.Path(f"/proc/{p}/environ").read_bytes()
        assert SECRET_VALUE.encode() not in environ and b"API_KEY=" not in environ, p


def test_placeholder_to_another_allowed_host_is_403(sealed):
    p = sealed.sh("curl -sS -m 10 -o /dev/null -w '%{http_code}' -H \"X-Key: $API_KEY\" "
                  "https://a.wild.test/leak")
    assert p.stdout.strip() == "403", p.stdout + p.stderr
    n = last_event(sealed, "a.wild.test")
    assert n["blocked"] and n["block_reason"] == "secret placeholder sent to unauthorized host"


def test_host_not_on_the_list_refused_with_reason(sealed):
    # Not resolvable through the sandbox resolver, and refused by the proxy when dialled by IP.
    p = sealed.sh("getent hosts other.test; echo rc=$?")
    assert "rc=2" in p.stdout, p.stdout
    code, body = curl(sealed, "https://other.test/", "--resolve", f"other.test:443:{GOOD_IP}")
    assert code == "403" and "host not in allowlist" in body
    n = last_event(sealed, "other.test")
    assert n["blocked"] and n["block_reason"] == "host not in allowlist"


def test_wildcard_semantics(sealed):
    assert curl(sealed, "https://b.a.wild.test/")[0] == "200"
    code, body = curl(sealed, "https://wild.test/", "--resolve", f"wild.test:443:{GOOD_IP}")
    assert code == "403"


def test_ip_never_resolved_for_the_name_fails(sealed):
    code, body = curl(sealed, "https://allowed.test/x", "--resolve",
                      f"allowed.test:443:{egress.OTHER_IP}")
    assert code == "403" and "was not resolved" in body, body


def test_udp_icmp_ipv6_metadata_and_private_fail(sealed):
    script = r"""
import socket
def t(f):
    try:
        f(); return "open"
    except Exception as e:
        return "fail"
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07allowed\x04test\x00\x00\x01\x00\x01",
             ("198.51.100.53", 5353)); s.recv(512)
def tcp(ip, port):
    def f():
        s = socket.create_connection((ip, port), timeout=3); s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        d = s.recv(100)
        if not d or b" 403 " in d: raise OSError("refused")
    return f
def v6():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.settimeout(2); s.connect(("fd00::1", 80))
print("udp", t(udp))
print("metadata", t(tcp("169.254.169.254", 80)))
print("private", t(tcp("10.99.0.2", 80)))
print("ipv6", t(v6))
print("direct", t(tcp("198.51.100.11", 80)))
"""
    p = sealed.sh(f"python3 - <<'EOF'\n{script}\nEOF\nping -c1 -W2 198.51.100.10 >/dev/null 2>&1; "
                  "echo ping=$?", timeout=90)
    out = p.stdout
    for probe in ("udp", "metadata", "private", "ipv6", "direct"):
        assert f"{probe} fail" in out, out + p.stderr
    assert "ping=0" not in out, out


BYPASS_SCRIPT = egress.ROOT / "tests" / "acceptance" / "framework" / "guest_bypass.py"
CAPTURE_SCRIPT = egress.ROOT / "tests" / "acceptance" / "framework" / "capture.py"


def test_bypass_suite_from_inside_the_guest(sealed):
    """Every attempt of framework/guest_bypass.py fails (docs/threat-model.md lists them with
    their expected outcomes), and the internet side confirms it: no packet from the guest's own
    addresses arrives there, no forbidden request reaches a server, no forbidden name reaches
    the DNS server."""
    internet = sealed.internet
    cap_file = internet.dir / "capture.jsonl"
    cap = internet.spawn(internet.inet, [egress.PYTHON, CAPTURE_SCRIPT, "i0", cap_file],
                         stdout=subprocess.PIPE)
    assert "ready" in egress.readline(cap.stdout)
    seen_before = len(internet.server_requests())
    placeholder = sealed.sh("echo $API_KEY").stdout.strip()
    assert placeholder.startswith("SANDBOX_SECRET_")
    script = BYPASS_SCRIPT.read_text()
    p = sealed.sh(f"cat > /tmp/bypass.py <<'PYEOF'\n{script}\nPYEOF\n"
                  f"python3 /tmp/bypass.py {placeholder}", timeout=300)
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(results) == script.count("\n@probe("), p.stdout + p.stderr
    assert len(results) + 11 >= 30  # with the 11 attempts of the tests above
    leaks = [r for r in results if not r["blocked"]]
    assert not leaks, json.dumps(leaks, indent=1)
    undocumented = [r for r in results if not r["as_documented"]]
    assert not undocumented, json.dumps(undocumented, indent=1)
    time.sleep(0.5)
    cap.terminate()
    cap.wait(timeout=5)

    guest_ip = sealed.sh("python3 -c \"import socket; s = socket.socket(2, 2); "
                         "s.connect(('198.51.100.10', 9)); print(s.getsockname()[0])\""
                         ).stdout.strip()
    assert guest_ip.startswith("10."), guest_ip
    packets = [json.loads(l) for l in cap_file.read_text().splitlines() if l.strip()]
    assert packets, "the capture saw nothing at all (not even the proxied requests)"
    router_ll = {l.split()[3].split("/")[0] for l in
                 run(["ip", "-n", internet.router, "-6", "-o", "addr", "show", "dev", "r1"]
                     ).stdout.splitlines()}
    from_guest = [x for x in packets if x["v"] == 4 and
                  (x["src"] in (guest_ip, "10.99.0.5") or x["proto"] not in (1, 6, 17))]
    assert not from_guest, from_guest
    v6 = [x for x in packets if x["v"] == 6 and x["src"] not in router_ll | {"::"}]
    assert not v6, v6

    # Nothing forbidden reached a server; the placeholder in a path stays a placeholder.
    reqs = internet.server_requests()[seen_before:]
    hosts = {r["headers"].get("Host", "") for r in reqs}
    assert hosts <= {"allowed.test", "a.wild.test"}, hosts
    paths = [r["path"] for r in reqs]
    for forbidden in ("/second", "/smuggled", "/abs", "/noproxy", "/plainleak"):
        assert not any(forbidden in x for x in paths), (forbidden, paths)
    leak = [x for x in paths if x.startswith("/pathleak/")]
    assert leak and placeholder in leak[0] and SECRET_VALUE not in leak[0], leak
    dns = internet.dns_log.read_text()
    assert "exfil" not in dns and "other.test" not in dns, dns[-2000:]


def test_allow_list_add_takes_effect_without_restart(sealed):
    pid = sealed.ml("inspect", sealed.id, check=True).stdout
    code, _ = curl(sealed, "https://late.test/", "--resolve", f"late.test:443:{GOOD_IP}")
    assert code == "403"
    p = sealed.ml("allow-list", "add", sealed.id, "late.test", check=True)
    assert f"Added to {sealed.id}: late.test" in p.stdout
    assert "Current allow-list:" in p.stdout and "late.test" in p.stdout
    assert curl(sealed, "https://late.test/")[0] == "200"
    p = sealed.ml("allow-list", "delete", sealed.id, "late.test", check=True)
    assert f"Removed from {sealed.id}: late.test" in p.stdout
    assert sealed.ml("inspect", sealed.id, check=True).stdout == pid


def test_no_network_has_only_lo(internet, agent_image, kernel):
    home, binary = agent_image
    sb = Sandbox(internet, home, binary)
    p = sb.ml("run", "--image", "agent:latest", "--no-network", "--", "sh", "-c",
              "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort", timeout=300)
    assert p.returncode == 0, p.stderr
    assert [d for d in p.stdout.split() if d not in ("sit0",)] == ["lo"], p.stdout


@pytest.mark.parametrize("fault", ["supervisor", "launch:intents", "launch:spawned"])
def test_sigkill_leaves_no_netns_tap_table_or_subnet(internet, agent_image, kernel, fault):
    """SIGKILL of the supervisor (running sandbox) or of `run` at a network step, then `prune`:
    nothing of the sandbox's network is left."""
    import signal
    import sqlite3
    home, binary = agent_image
    sb = Sandbox(internet, home, binary)
    before = set(run(["ip", "netns", "list"]).stdout.split())
    if fault == "supervisor":
        p = sb.ml("run", "-d", "--image", "agent:latest", timeout=300)
        assert p.returncode == 0, p.stderr
        sb.id = p.stdout.strip().splitlines()[-1]
        db = sqlite3.connect(str(home / "state.db"))
        pid = db.execute("select supervisor_pid from sandboxes where id=?", (sb.id,)).fetchone()[0]
        db.close()
        assert f"ml-{sb.id[3:]}" in run(["ip", "netns", "list"]).stdout
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    else:
        p = sb.ml("run", "-d", "--image", "agent:latest", env={"MATCHLOCK_FAULT": fault},
                  timeout=300)
        assert p.returncode != 0
    p = sb.ml("prune", timeout=120)
    assert p.returncode == 0, p.stderr
    after = set(run(["ip", "netns", "list"]).stdout.split())
    assert not {n for n in after - before if n.startswith("ml-")}, after
    db = sqlite3.connect(str(home / "state.db"))
    try:
        # Only sandboxes that still exist (the module's sealed one) hold a subnet or resources.
        assert db.execute("select count(*) from subnets where sandbox_id not in "
                          "(select id from sandboxes)").fetchone()[0] == 0
        assert db.execute("select count(*) from owned_resources where sandbox_id not in "
                          "(select id from sandboxes)").fetchone()[0] == 0
        live = db.execute("select count(*) from sandboxes").fetchone()[0]
        assert db.execute("select count(*) from subnets").fetchone()[0] == live
    finally:
        db.close()
    assert "ml_" not in run(["nft", "list", "tables"]).stdout  # never in the host namespace


UP_SPEC = """
name = "{project}"
[sandboxes.web]
image = "agent:latest"
ports = [{ports}]
[sandboxes.web.network]
allow_hosts = {allow}
block_private_ips = {block}
dns_servers = ["{dns}"]
upstream_ca = "{ca}"
{secret}{extra}"""
SECRET_BLOCK = """[[sandboxes.web.secrets]]
name = "API_KEY"
from_file = "key.txt"
hosts = ["allowed.test"]
"""


class Project:
    """A one-sandbox project (`web`) applied with `up` inside the router namespace."""

    def __init__(self, internet, agent_image, tmp_path, name):
        home, binary = agent_image
        self.sb = Sandbox(internet, home, binary)
        self.dir = tmp_path
        self.name = name
        self.spec = tmp_path / "sandbox.toml"

    def write(self, allow=("allowed.test",), block=True, key="sk-first-1a2b", extra="",
              ports=(), secret=True):
        (self.dir / "key.txt").write_text(key + "\n")
        self.spec.write_text(UP_SPEC.format(
            project=self.name, allow=json.dumps(list(allow)), block=str(block).lower(),
            dns=DNS_IP, ca=self.sb.internet.test_ca, extra=extra,
            secret=SECRET_BLOCK if secret else "",
            ports=", ".join(f"{{ host = {h}, guest = {g} }}" for h, g in ports)))

    def up(self, *args, env=None, check=True):
        p = self.sb.ml("up", "-f", self.spec, *args, env=env, timeout=300)
        if check:
            assert p.returncode == 0, p.stdout + p.stderr
        return p

    def record(self):
        import sqlite3
        db = sqlite3.connect(str(self.sb.home / "state.db"))
        try:
            return db.execute("select id, supervisor_pid, generation from sandboxes where "
                              "project=? and name='web'", (self.name,)).fetchone()
        finally:
            db.close()

    def attach(self):
        self.sb.id = self.record()[0]
        return self.sb


def secret_seen(sb, path):
    p = sb.sh(f"curl -sS -m 10 -o /dev/null -H \"Authorization: Bearer $API_KEY\" "
              f"https://allowed.test/{path}")
    assert "SANDBOX_SECRET_" not in p.stderr
    return [r for r in sb.internet.server_requests() if r["path"] == f"/{path}"][-1][
        "headers"]["Authorization"]


def host_get(internet, port):
    """GET / of the guest's web server through a published port, from the router namespace
    (where the supervisor and its listeners live)."""
    code = ("import urllib.request,sys;"
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/',timeout=10).status)")
    return subprocess.run(["nsenter", f"--net=/run/netns/{internet.router}", "python3", "-c",
                           code], capture_output=True, text=True, timeout=60)


def test_up_applies_egress_secret_and_port_changes_live(internet, agent_image, kernel, tmp_path):
    """`up` changes allow_hosts, block_private_ips, a secret's value and the published ports of a
    running sandbox at once (`~ update`, same supervisor and VMM), effective when `up` returns;
    a new secret recreates."""
    from framework.vm import qemu_pids
    port1 = 21000 + os.getpid() % 1000
    port2 = port1 + 1000
    proj = Project(internet, agent_image, tmp_path, "live")
    proj.write(ports=[(port1, 8000)])
    proj.up("--wait")
    sb = proj.attach()
    try:
        _, pid, gen = proj.record()
        vmm = qemu_pids(sb.id)
        assert len(vmm) == 1, vmm
        assert secret_seen(sb, "rot1") == "Bearer sk-first-1a2b"
        code, body = curl(sb, "https://private.test/")
        assert code in ("000", "403"), (code, body)
        sb.sh("setsid -f python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 </dev/null")
        deadline = time.monotonic() + 60
        while host_get(internet, port1).stdout.strip() != "200":
            assert time.monotonic() < deadline, host_get(internet, port1).stderr
            time.sleep(0.5)

        proj.write(allow=("allowed.test", "private.test"), block=False, key="sk-second-3c4d",
                   ports=[(port2, 8000)])
        p = proj.up("--wait")
        assert "~ update web" in p.stdout, p.stdout
        for reason in ("allow_hosts: +private.test", "block_private_ips: true → false",
                       "secret values rotated", f"+127.0.0.1:{port2}→8000/tcp"):
            assert reason in p.stdout, p.stdout
        assert "sk-" not in p.stdout + p.stderr
        _, pid2, gen2 = proj.record()
        assert pid2 == pid and gen2 == gen + 1
        assert qemu_pids(sb.id) == vmm
        # In effect when `up` returned: from the host (the new port, not the old) and the guest.
        assert host_get(internet, port2).stdout.strip() == "200"
        assert host_get(internet, port1).returncode != 0
        assert secret_seen(sb, "rot2") == "Bearer sk-second-3c4d"
        code, body = curl(sb, "https://private.test/")
        assert code == "200", (code, body)
        # Nothing left to do, and nothing of either value anywhere on disk.
        assert proj.up("--detailed-exitcode").returncode == 0
        db = (sb.home / "state.db").read_bytes()
        assert b"sk-first" not in db and b"sk-second" not in db
        for log in (sb.home / "run" / sb.id).glob("*.log"):
            assert "sk-second" not in log.read_text(errors="replace"), log

        # Private ranges blocked again: refused although the name stays allowed.
        proj.write(allow=("allowed.test", "private.test"), block=True, key="sk-second-3c4d",
                   ports=[(port2, 8000)])
        assert "~ update web" in proj.up().stdout
        code, body = curl(sb, "https://private.test/")
        assert code in ("000", "403"), (code, body)

        # A new secret needs a placeholder in the guest's env: that recreates.
        proj.write(key="sk-second-3c4d", ports=[(port2, 8000)], extra="""[[sandboxes.web.secrets]]
name = "OTHER"
from_file = "key.txt"
hosts = ["allowed.test"]
""")
        p = sb.ml("plan", "-f", proj.spec)
        assert "-/+ recreate web" in p.stdout and "secrets: +OTHER" in p.stdout, p.stdout
        assert proj.record()[1] == pid
        # Applied, it recreates (same id, new supervisor); the events of before are kept.
        assert "-/+ recreate web" in proj.up("--wait").stdout
        assert proj.record()[0] == sb.id and proj.record()[1] != pid
        assert "OTHER=SANDBOX_SECRET_" in sb.sh("env").stdout
        assert any(e["network"]["path"] == "/rot1" for e in sb.events())
    finally:
        sb.ml("down", "-p", "live", timeout=120)


def namespaces():
    return {n for n in run(["ip", "netns", "list"]).stdout.split() if n.startswith("ml-")}


def assert_no_network_leaks(home, before):
    """Exactly the recorded sandboxes' namespaces (each with its TAP and table only) and subnet
    rows exist, besides the namespaces that were there before the test."""
    import sqlite3
    db = sqlite3.connect(str(home / "state.db"))
    try:
        live = {r[0] for r in db.execute("select id from sandboxes")}
        subnets = {r[0] for r in db.execute("select sandbox_id from subnets")}
        assert subnets == live, (subnets, live)
        assert db.execute("select count(*) from owned_resources where sandbox_id not in "
                          "(select id from sandboxes)").fetchone()[0] == 0
        # Every network object on record is made, none half-made or orphaned.
        assert db.execute("select count(*) from owned_resources where kind in "
                          "('netns','tap','nft_table') and state != 'created'").fetchone()[0] == 0
    finally:
        db.close()
    want = {f"ml-{i[3:11]}" for i in live}
    assert namespaces() - before == want - before, (namespaces(), want)
    for ns in want - before:
        links = run(["ip", "-n", ns, "-o", "link"]).stdout
        assert len(links.splitlines()) == 2 and f" ml{ns[3:]}:" in links, links
        tables = run(["ip", "netns", "exec", ns, "nft", "list", "tables"]).stdout
        assert tables.split() == ["table", "inet", f"ml_{ns[3:]}"], tables
    assert ": ml" not in run(["ip", "-o", "link"]).stdout
    assert "ml_" not in run(["nft", "list", "tables"]).stdout


def wait_supervisor_gone(proj):
    for _ in range(300):
        rec = proj.record()
        if rec and rec[1]:
            try:
                os.kill(rec[1], 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    raise AssertionError(f"the supervisor did not die: {proj.record()}")


def test_sigkill_of_up_and_supervisor_at_each_network_step(internet, agent_image, kernel,
                                                           tmp_path):
    """SIGKILL of `up` (subnet allocated, intents recorded, live update sent) and of the
    supervisor (namespace made, TAP made, table installed), then `up`: it converges with one
    sandbox and exactly its network objects; `down` leaves none."""
    import signal
    proj = Project(internet, agent_image, tmp_path, "faults")
    home = proj.sb.home
    before = namespaces()
    proj.write()
    proj.up("--wait")
    try:
        for fault in ("launch:subnet", "launch:intents", "network:netns", "network:tap",
                      "network:nft"):
            p = proj.up("--force-recreate", env={"MATCHLOCK_FAULT": fault}, check=False)
            if fault.startswith("launch:"):
                assert p.returncode == -signal.SIGKILL, (fault, p.stdout, p.stderr)
            else:  # the supervisor dies; `up` itself returned once it was recorded
                assert p.returncode == 0, (fault, p.stdout, p.stderr)
                wait_supervisor_gone(proj)
            p = proj.up("--wait")
            assert "-/+ recreate web" in p.stdout, (fault, p.stdout)
            assert_no_network_leaks(home, before)
            assert proj.up("--detailed-exitcode").returncode == 0, fault
        # A live update sent, `up` killed before it recorded the new spec: the next `up` sends
        # it again (idempotent) and records it; the supervisor stays.
        pid = proj.record()[1]
        proj.write(allow=("allowed.test", "late.test"))
        p = proj.up(env={"MATCHLOCK_FAULT": "update:sent"}, check=False)
        assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
        p = proj.up()
        assert "~ update web" in p.stdout, p.stdout
        assert proj.record()[1] == pid
        assert proj.up("--detailed-exitcode").returncode == 0
        assert_no_network_leaks(home, before)
    finally:
        proj.sb.ml("down", "-p", "faults", timeout=120)
    assert namespaces() == before
    assert_no_network_leaks(home, before)


RULES = """
[[sandboxes.web.network.interception.rules]]
name = "tag"
hosts = ["allowed.test"]
set_headers = {{ X-Matchlock-Rule = "{tag}" }}
delete_headers = ["X-Remove-Me"]
[[sandboxes.web.network.interception.rules]]
name = "no-admin"
path = "/admin/*"
action = "block"
[[sandboxes.web.network.interception.rules]]
phase = "after"
path = "/sse"
body_replacements = [ {{ find = "event", replace = "EVENT" }} ]
[[sandboxes.web.network.interception.rules]]
phase = "after"
path = "/echo"
set_response_headers = {{ X-Rewritten = "yes" }}
body_replacements = [ {{ find = "hello", replace = "HOWDY" }} ]
"""


SDK_SOCKET = """
[sandboxes.web.network.interception]
callback_socket = "{sock}"
"""
SDK_RULE = """
[[sandboxes.web.network.interception.rules]]
name = "sdk"
path = "/sdk/*"
callback_id = "deny"
"""


def test_interception_rules_change_requests_and_responses_live(internet, agent_image, kernel,
                                                               tmp_path):
    """Spec network.interception.rules in the real proxy: a header set (and one removed) on the
    way out is what the test server sees, an SSE stream and a plain body are rewritten on the way
    back as the guest reads them, a blocked path never reaches the server, and a rule edit
    applies live (same supervisor)."""
    proj = Project(internet, agent_image, tmp_path, "rules")
    # Rules alone, without a secret, make the proxy look inside HTTP (the test server speaks
    # HTTP/1.1 only, so the h2 downgrade that rules imply is not exercised here).
    proj.write(extra=RULES.format(tag="v1"), secret=False)
    proj.up("--wait")
    sb = proj.attach()
    try:
        _, pid, _ = proj.record()
        code, _ = curl(sb, "https://allowed.test/tagged", "-H", "X-Remove-Me: 1")
        assert code == "200"
        seen = [r for r in internet.server_requests() if r["path"] == "/tagged"][-1]["headers"]
        assert seen.get("X-Matchlock-Rule") == "v1", seen
        assert "X-Remove-Me" not in seen, seen

        # SSE: each data line rewritten as it streams; framing intact.
        p = sb.sh("curl -sS -N -m 20 https://allowed.test/sse")
        assert p.stdout.split("\n\n")[:3] == ["data: EVENT 0", "data: EVENT 1", "data: EVENT 2"], \
            p.stdout + p.stderr
        # A plain body: replaced whole, with its length rewritten; a response header added.
        p = sb.sh("curl -sS -m 10 -D /tmp/h https://allowed.test/echo; cat /tmp/h")
        assert p.stdout.startswith("HOWDY from 198.51.100.10 /echo\n"), p.stdout + p.stderr
        assert "x-rewritten: yes" in p.stdout.lower(), p.stdout
        assert "content-length: 31" in p.stdout.lower(), p.stdout
        # Blocked before it leaves: 403 locally, the server never sees it, the event says so.
        before = len(internet.server_requests())
        code, body = curl(sb, "https://allowed.test/admin/users")
        assert code == "403" and "request blocked by policy" in body, (code, body)
        assert not [r for r in internet.server_requests()[before:] if r["path"] == "/admin/users"]
        n = last_event(sb, "allowed.test")
        assert n["blocked"] and n["block_reason"] == "request blocked by policy", n

        # A rule edit is live, and so is an SDK callback socket with its rule (§4.8).
        hooks = HookServer(tmp_path / "hooks.sock")
        proj.write(extra=SDK_SOCKET.format(sock=hooks.path) + RULES.format(tag="v2") + SDK_RULE,
                   secret=False)
        p = proj.up()
        assert "~ update web" in p.stdout and "interception.rules changed" in p.stdout, p.stdout
        assert "interception.callback_socket" in p.stdout, p.stdout
        assert proj.record()[1] == pid
        curl(sb, "https://allowed.test/tagged2")
        seen = [r for r in internet.server_requests() if r["path"] == "/tagged2"][-1]["headers"]
        assert seen.get("X-Matchlock-Rule") == "v2", seen
        before = len(internet.server_requests())
        code, body = curl(sb, "https://allowed.test/sdk/deny")
        assert code == "403" and "request blocked by policy" in body, (code, body)
        assert not [r for r in internet.server_requests()[before:] if r["path"] == "/sdk/deny"]
        assert [c["path"] for c in hooks.calls_for("deny")] == ["/sdk/deny"]
        hooks.close()
    finally:
        sb.ml("down", "-p", "rules", timeout=120)
