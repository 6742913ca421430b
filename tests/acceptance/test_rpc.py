# SPDX-License-Identifier: Apache-2.0
"""`matchlock rpc` end to end (issue rpc): upstream's JSON-RPC surface driven by a client written
from the wire contract alone (framework/rpc_client.py), against real TCG micro-VMs booted from the
agent image (python3, curl). One sandbox is shared by most tests; the lifecycle tests (a second
create, a client that disappears, keep_on_disconnect) boot their own.

The server runs inside a network namespace this module creates (lo only), so the sandboxes'
proxies and the port forwards' listeners live there and nothing can leave it."""
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from framework.rpc_client import RpcClient, RpcError, b64, unb64
from framework.vm import VmEnv, qemu_pids, supervisor_pids

pytestmark = [pytest.mark.need_root, pytest.mark.need_qemu]

NETNS = f"ml-rpc-{os.getpid()}"
WEB_IP = "198.51.100.10"  # on NETNS's lo: the only "internet" there is
DNS_IP = "198.51.100.53"  # dnsmasq on NETNS's lo: web.test -> WEB_IP
CREATE = {"image": "agent:latest",
          "resources": {"cpus": 1, "memory_mb": 512},
          "network": {"allowed_hosts": ["allowed.test"], "block_private_ips": True,
                      "dns_servers": [DNS_IP]}}


def in_ns(*argv):
    return ["ip", "netns", "exec", NETNS, *argv]


class Env(VmEnv):
    def client(self):
        return RpcClient(self.binary, env=self.env, prefix=("ip", "netns", "exec", NETNS))

    def gone(self, sid, timeout=60):
        """True once nothing of sandbox `sid` is left: processes, run dir, record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = (qemu_pids(sid) or supervisor_pids(sid) or sid in self.run_dirs()
                    or any(s["id"] == sid for s in self.sandboxes()))
            if not left:
                return True
            time.sleep(0.5)
        return False


@pytest.fixture(scope="module")
def env(tmp_path_factory, kernel, image_fixtures):
    base = tmp_path_factory.mktemp("rpc")
    e = Env(base, kernel)
    web = dns = None
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        for cmd in (("ip", "link", "set", "lo", "up"),
                    ("ip", "addr", "add", f"{WEB_IP}/32", "dev", "lo"),
                    ("ip", "addr", "add", f"{DNS_IP}/32", "dev", "lo")):
            subprocess.run(in_ns(*cmd), check=True)
        web_root = base / "web"
        web_root.mkdir()
        (web_root / "hello.txt").write_text("hello from the test web server\n")
        (web_root / "hook").mkdir()
        for name in ("deny", "body"):
            (web_root / "hook" / name).write_text(f"the web server's own {name}\n")
        web = subprocess.Popen(in_ns("python3", "-m", "http.server", "80", "--bind", WEB_IP,
                                     "--directory", str(web_root)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dns = subprocess.Popen(in_ns("dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                     f"--listen-address={DNS_IP}", "--bind-interfaces",
                                     "--port=53", f"--pid-file={base / 'dnsmasq.pid'}",
                                     "--user=root", "--group=root",
                                     f"--address=/web.test/{WEB_IP}"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        e.import_layout(image_fixtures["agent"] / "agent-oci", "agent:latest")
        e.base = base
        yield e
    finally:
        for p in (web, dns):
            if p is not None:
                p.kill()
                p.wait()
        e.run("kill", "--all", timeout=120)
        e.run("prune", timeout=120)
        subprocess.run(["ip", "netns", "delete", NETNS])
        assert qemu_pids(str(e.home)) == []
        assert supervisor_pids(str(e.home)) == []


@pytest.fixture(scope="module")
def hooks(env):
    """The SDK side of callback rules: a Unix socket the shared sandbox's proxy calls."""
    from framework.hook_server import HookServer
    h = HookServer(env.base / "hooks.sock")
    yield h
    h.close()


@pytest.fixture(scope="module")
def rpc(env, hooks):
    """One client with one created sandbox, shared by the method tests. Its network carries SDK
    callback rules (reference §4.8) on web.test's /hook/ paths only."""
    c = env.client()
    create = json.loads(json.dumps(CREATE))
    create["network"]["interception"] = {
        "callback_socket": hooks.path,
        "rules": [{"name": "deny", "hosts": ["web.test"], "path": "/hook/deny",
                   "callback_id": "deny"},
                  {"name": "body", "phase": "after", "hosts": ["web.test"], "path": "/hook/body",
                   "callback_id": "body", "timeout_ms": 10000}]}
    try:
        res = c.call("create", create, timeout=300)
        c.vm_id = res["id"]
        yield c
        assert c.close(timeout_seconds=2) == {}
        assert c.wait_exit() == 0
        env.run("rm", c.vm_id, check=True)
    finally:
        if c.alive():
            c.kill()


def exec_ok(rpc, command, **kw):
    res = rpc.call("exec", {"command": command, **kw}, timeout=120)
    return res["exit_code"], unb64(res["stdout"]), unb64(res["stderr"])


def error_of(req, timeout=120):
    with pytest.raises(RpcError) as e:
        req.result(timeout)
    return e.value


# ---- no sandbox needed --------------------------------------------------------------------------

def test_framing_and_errors_without_a_sandbox(env):
    before = ids(env)
    with env.client() as c:
        c.send_raw(b"{not json")
        msg = c.wait_unrouted()
        assert msg["error"]["code"] == -32700 and "id" not in msg
        c.send_raw(b"")  # blank lines are skipped
        c.send_raw(b'{"jsonrpc":"2.0","params":{},"id":"x"}')
        assert c.wait_unrouted()["error"]["code"] == -32600
        assert error_of(c.start("no_such_method")).code == -32601
        # exec_pipe, exec_tty and log_stream need an id to route their notifications.
        for method in ("exec_pipe", "exec_tty", "log_stream"):
            c.notify(method, {"command": "true"})
            msg = c.wait_unrouted()
            assert msg["error"]["code"] == -32600, msg
        assert error_of(c.start("exec", {"command": "true"})).code == -32000
        assert error_of(c.start("read_file", {"path": "/etc/hostname"})).code == -32000
        # create's params go through the spec decoder: the field is named.
        e = error_of(c.start("create", {}))
        assert e.code == -32602 and "image" in e.message
        e = error_of(c.start("create", {"image": "agent:latest", "id": "vm-12345678"}))
        assert e.code == -32602 and "id" in e.message
        e = error_of(c.start("create", {"image": "agent:latest", "resources": {"cpus": "two"}}))
        assert e.code == -32602 and "cpus" in e.message, e.message
        e = error_of(c.start("create", {"image": "agent:latest",
                                        "network": {"no_network": True,
                                                    "allowed_hosts": ["a.test"]}}))
        assert e.code == -32602 and "no_network" in e.message, e.message
        # A wrong type where a string belongs once ended the server (found by fuzzing).
        e = error_of(c.start("create", {"image": "agent:latest", "vfs": {"workspace": 5}}))
        assert e.code == -32602 and "vfs.workspace must be a string" in e.message, e.message
        assert c.call("cancel", {"id": 999}) == {"cancelled": False}
        # A line far over 16 MiB is refused as a whole and the server keeps serving.
        c.send_raw(b'{"jsonrpc":"2.0","method":"exec","params":{"command":"' + b"x" * (17 << 20)
                   + b'"},"id":77}')
        assert c.wait_unrouted(60)["error"]["code"] == -32700
        assert c.call("cancel", {"id": 1}) == {"cancelled": False}
        assert c.close() == {}
        assert c.wait_exit() == 0
    assert ids(env) == before


# ---- exec family ------------------------------------------------------------------------------

def test_exec_exit_codes_and_split_output(rpc):
    code, out, err = exec_ok(rpc, "echo out; echo err >&2; exit 3")
    assert (code, out, err) == (3, b"out\n", b"err\n")
    res = rpc.call("exec", {"command": "pwd; id -u", "working_dir": "/tmp", "user": "nobody"})
    assert unb64(res["stdout"]).split() == [b"/tmp", b"65534"]
    assert res["exit_code"] == 0 and isinstance(res["duration_ms"], int)
    code, _, err = exec_ok(rpc, "no-such-command-here")
    assert code == 127 and b"not found" in err
    # Binary output survives base64 both ways.
    code, out, _ = exec_ok(rpc, "head -c 256 /dev/urandom | tee /tmp/r | sha256sum; cat /tmp/r")
    digest, data = out[:64], out[out.index(b"\n") + 1:]
    assert code == 0 and hashlib.sha256(data).hexdigest().encode() == digest


def test_exec_stream_in_order(rpc):
    req = rpc.start("exec_stream", {"command": "for i in $(seq 1 200); do echo $i; "
                                               "echo e$i >&2; done; exit 4"})
    res = req.result(120)
    assert res["exit_code"] == 4 and "stdout" not in res
    assert req.output("exec_stream.stdout") == "".join(f"{i}\n" for i in range(1, 201)).encode()
    assert req.output("exec_stream.stderr") == "".join(f"e{i}\n" for i in range(1, 201)).encode()
    assert all(n["params"]["id"] == req.id for n in req.notifications)


def test_exec_pipe_stdin_to_eof(rpc):
    payload = os.urandom(1 << 20)
    req = rpc.start("exec_pipe", {"command": "sha256sum; echo done >&2"})
    req.wait_notification("exec_pipe.ready")
    for i in range(0, len(payload), 100_000):
        req.stdin(payload[i:i + 100_000])
    req.stdin_eof()
    res = req.result(120)
    assert res["exit_code"] == 0
    assert req.output("exec_pipe.stdout").split()[0].decode() == hashlib.sha256(payload).hexdigest()
    assert req.output("exec_pipe.stderr") == b"done\n"


def test_stdin_into_a_slow_reader_keeps_flowing(rpc):
    # The guest withholds stdin credit while the process does not read, and must give it back
    # by itself once the pipe drains (a regression: the credit sat queued until unrelated
    # traffic flushed it, stalling writes for up to a minute).
    payload = os.urandom(8 << 20)
    req = rpc.start("exec_pipe", {"command": "sleep 2; sha256sum"})
    req.wait_notification("exec_pipe.ready")
    for i in range(0, len(payload), 1 << 20):
        req.stdin(payload[i:i + (1 << 20)])
    req.stdin_eof()
    started = time.monotonic()
    assert req.result(60)["exit_code"] == 0
    assert time.monotonic() - started < 30
    assert req.output("exec_pipe.stdout").split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_exec_tty_size_resize_and_merged_output(rpc):
    req = rpc.start("exec_tty", {"command": "stty size; echo to-stderr >&2; read x; stty size",
                                 "rows": 30, "cols": 100})
    req.wait_notification("exec_tty.ready")
    req.wait_output("exec_tty.stdout", b"to-stderr")
    req.resize(40, 120)
    time.sleep(0.3)
    req.stdin(b"\n")
    res = req.result(120)
    out = req.output("exec_tty.stdout")
    assert res["exit_code"] == 0
    assert b"30 100" in out and b"40 120" in out and b"to-stderr" in out
    assert out.index(b"30 100") < out.index(b"40 120")


def test_cancel_kills_the_guest_process_group(rpc):
    req = rpc.start("exec", {"command": "sleep 60 & sleep 61; wait"})
    time.sleep(1.5)
    started = time.monotonic()
    assert rpc.cancel(req) == {"cancelled": True}
    assert error_of(req, 10).code == -32003
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _, out, _ = exec_ok(rpc, "for p in /proc/[0-9]*; do tr '\\0' ' ' <$p/cmdline; echo; "
                                 "done 2>/dev/null | grep -c '^sleep 6[01]' || true")
        if out.strip() == b"0":
            break
        time.sleep(0.3)
    assert out.strip() == b"0", "the cancelled command's processes are still running"
    assert rpc.cancel(req) == {"cancelled": False}  # not in flight any more


def test_concurrent_requests_run_at_once(rpc):
    started = time.monotonic()
    reqs = [rpc.start("exec", {"command": f"sleep 2; echo {i}"}) for i in range(4)]
    outs = [unb64(r.result(120)["stdout"]) for r in reqs]
    assert outs == [f"{i}\n".encode() for i in range(4)]
    assert time.monotonic() - started < 7  # four 2 s sleeps, not run one after another


# ---- files ------------------------------------------------------------------------------------

def test_write_read_list_round_trip(rpc):
    small = bytes(range(256))
    assert rpc.call("write_file", {"path": "/tmp/rpc/a/b/small.bin", "content": b64(small)}) == {}
    assert unb64(rpc.call("read_file", {"path": "/tmp/rpc/a/b/small.bin"})["content"]) == small
    big = os.urandom(5 << 20)
    assert rpc.call("write_file", {"path": "/tmp/rpc/big.bin", "content": b64(big),
                                   "mode": 0o755}, timeout=300) == {}
    back = unb64(rpc.call("read_file", {"path": "/tmp/rpc/big.bin"}, timeout=300)["content"])
    assert hashlib.sha256(back).digest() == hashlib.sha256(big).digest()
    code, out, _ = exec_ok(rpc, "stat -c '%a' /tmp/rpc/a /tmp/rpc/a/b /tmp/rpc/a/b/small.bin "
                                "/tmp/rpc/big.bin")
    assert out.split() == [b"755", b"755", b"644", b"755"]
    files = {f["name"]: f for f in rpc.call("list_files", {"path": "/tmp/rpc"})["files"]}
    assert set(files) == {"a", "big.bin"}
    assert files["big.bin"]["size"] == len(big) and not files["big.bin"]["is_dir"]
    assert files["big.bin"]["mode"] & 0o777 == 0o755
    assert files["a"]["is_dir"] and files["a"]["mode"] & 0x80000000  # Go's os.ModeDir
    assert files["a"]["mod_time"].startswith(time.strftime("%Y-", time.gmtime()))


def test_file_errors(rpc):
    e = error_of(rpc.start("write_file", {"path": "/tmp/x", "content": "not base64!"}))
    assert e.code == -32602
    e = error_of(rpc.start("read_file", {"path": "/no/such/file"}))
    assert e.code == -32002 and "/no/such/file" in e.message
    e = error_of(rpc.start("read_file", {"path": "/tmp"}))
    assert e.code == -32002
    e = error_of(rpc.start("list_files", {"path": "/no/such/dir"}))
    assert e.code == -32002
    e = error_of(rpc.start("write_file", {"path": "/proc/version", "content": b64(b"x")}))
    assert e.code == -32002
    assert error_of(rpc.start("read_file", {})).code == -32602


# ---- egress: allow-list and events --------------------------------------------------------------

def test_allow_list_and_network_events(rpc, env):
    res = rpc.call("allow_list_add", {"hosts": ["api.test", "allowed.test"]})
    assert res["added"] == ["api.test"]
    assert sorted(res["allowed_hosts"]) == ["allowed.test", "api.test"]
    res = rpc.call("allow_list_delete", {"hosts": ["api.test", "never.test"]})
    assert res["removed"] == ["api.test"] and res["allowed_hosts"] == ["allowed.test"]
    assert error_of(rpc.start("allow_list_add", {"hosts": []})).code == -32602
    # The same sandbox from the CLI: it is a normal supervised sandbox.
    p = env.run("allow-list", "add", rpc.vm_id, "cli.test", check=True)
    assert "cli.test" in p.stdout
    rpc.call("allow_list_delete", {"hosts": ["cli.test"]})
    # A host off the list is refused by the proxy (never dialled) and reported; added, the very
    # next request goes through; deleted, the next one is refused again.
    curl = "curl -s -m 20 -w ' %{http_code}' http://web.test/hello.txt"
    _, out, _ = exec_ok(rpc, f"curl -s -m 20 -w ' %{{http_code}}' --resolve web.test:80:{WEB_IP} "
                             "http://web.test/hello.txt")
    assert out.endswith(b" 403") and b"host not in allowlist" in out, out
    ev = rpc.wait_event(lambda e: e.get("type") == "network"
                        and e["network"].get("host") == "web.test", timeout=30)
    assert ev["network"]["blocked"] and ev["network"]["block_reason"] == "host not in allowlist"
    rpc.call("allow_list_add", {"hosts": ["web.test"]})
    _, out, _ = exec_ok(rpc, curl)
    assert out == b"hello from the test web server\n 200", out
    rpc.wait_event(lambda e: e.get("type") == "network" and e["network"].get("host") == "web.test"
                   and e["network"].get("status_code") == 200, timeout=30)
    rpc.call("allow_list_delete", {"hosts": ["web.test"]})
    _, out, _ = exec_ok(rpc, curl)
    assert out.endswith((b" 403", b" 000")), out  # refused by the proxy, or no longer resolved


def test_sdk_callback_rules_from_create(rpc, env, hooks):
    """create's network.interception reaches the sandbox's proxy: a before-phase callback
    blocks a request from the guest, an after-phase one replaces the body the guest reads."""
    rpc.call("allow_list_add", {"hosts": ["web.test"]})
    try:
        _, out, _ = exec_ok(rpc, "curl -s -m 30 -w ' %{http_code}' http://web.test/hook/deny")
        assert out.endswith(b" 403") and b"request blocked by policy" in out, out
        assert [c["path"] for c in hooks.calls_for("deny")] == ["/hook/deny"]
        _, out, _ = exec_ok(rpc, "curl -s -m 30 -D /tmp/h http://web.test/hook/body; cat /tmp/h")
        assert out.startswith(b"replaced by the SDK\n"), out
        assert b"x-sdk: yes" in out.lower(), out
        (call,) = hooks.calls_for("body")
        assert call["host"] == "web.test" and call["status_code"] == 200
        # Other paths of the same host are not called back.
        _, out, _ = exec_ok(rpc, "curl -s -m 30 http://web.test/hello.txt")
        assert out == b"hello from the test web server\n"
        assert len(hooks.calls) == 2
    finally:
        rpc.call("allow_list_delete", {"hosts": ["web.test"]})


# ---- port forwards -----------------------------------------------------------------------------

def http_get(port):
    code = ("import urllib.request,sys;"
            f"r=urllib.request.urlopen('http://127.0.0.1:{port}/served.txt',timeout=10);"
            "sys.stdout.write(r.read().decode())")
    return subprocess.run(in_ns("python3", "-c", code), capture_output=True, text=True,
                          timeout=60)


def test_port_forward_to_a_guest_server(rpc, env):
    rpc.call("write_file", {"path": "/srv/served.txt", "content": b64(b"served from the guest\n")})
    server = rpc.start("exec_stream", {"command": "cd /srv && exec python3 -m http.server 8123 "
                                                  "--bind 127.0.0.1"})
    res = rpc.call("port_forward", {"forwards": [{"local_port": 0, "remote_port": 8123}]})
    (binding,) = res["bindings"]
    assert binding["address"] == "127.0.0.1" and binding["remote_port"] == 8123
    port = binding["local_port"]
    assert port > 0
    deadline = time.monotonic() + 60
    while True:
        r = http_get(port)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.stdout == "served from the guest\n", r.stderr
    # Several at once.
    procs = [subprocess.Popen(in_ns("python3", "-c", "import urllib.request;"
                                    f"print(urllib.request.urlopen('http://127.0.0.1:{port}/"
                                    "served.txt',timeout=30).read().decode(),end='')"),
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    assert [p.communicate(timeout=60)[0] for p in procs] == ["served from the guest\n"] * 6
    # A port already taken is refused with the port named; the previous set is replaced.
    taken = subprocess.Popen(in_ns("python3", "-c", "import socket,time;s=socket.socket();"
                                   "s.bind(('127.0.0.1',0));s.listen();"
                                   "print(s.getsockname()[1],flush=True);time.sleep(60)"),
                             stdout=subprocess.PIPE, text=True)
    try:
        busy = int(taken.stdout.readline())
        e = error_of(rpc.start("port_forward",
                               {"forwards": [{"local_port": busy, "remote_port": 8123}]}))
        assert e.code == -32000 and str(busy) in e.message, e.message
    finally:
        taken.kill()
        taken.wait()
    assert error_of(rpc.start("port_forward", {"forwards": []})).code == -32602
    # The CLI's port-forward reaches the same guest server.
    pf_port = 18000 + os.getpid() % 1000
    pf = subprocess.Popen(in_ns(env.binary, "port-forward", rpc.vm_id, f"{pf_port}:8123"),
                          env=env.env, stderr=subprocess.PIPE, text=True)
    try:
        line = pf.stderr.readline()
        assert f"127.0.0.1:{pf_port} -> 8123" in line, line
        assert http_get(pf_port).stdout == "served from the guest\n"
    finally:
        pf.send_signal(signal.SIGINT)
        assert pf.wait(timeout=30) == 0
    assert rpc.cancel(server) == {"cancelled": True}


# ---- the sandbox from the CLI --------------------------------------------------------------------

def test_cli_sees_and_reaches_the_rpc_sandbox(rpc, env, tmp_path):
    (row,) = [s for s in env.sandboxes() if s["id"] == rpc.vm_id]
    assert row["status"] == "running"
    p = env.run("exec", rpc.vm_id, "--", "sh", "-c", "echo from-cli", check=True)
    assert p.stdout == "from-cli\n"
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(300_000))
    os.chmod(src, 0o750)
    env.run("cp", src, f"{rpc.vm_id}:/tmp/cp/up.bin", check=True)
    _, out, _ = exec_ok(rpc, "sha256sum /tmp/cp/up.bin; stat -c %a /tmp/cp/up.bin")
    assert out.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest()
    assert out.split()[2] == b"750"
    env.run("cp", f"{rpc.vm_id}:/tmp/cp/up.bin", tmp_path / "down.bin", check=True)
    assert (tmp_path / "down.bin").read_bytes() == src.read_bytes()
    p = env.run("cp", f"{rpc.vm_id}:/no/such", tmp_path / "never.bin")
    assert p.returncode != 0 and "/no/such" in p.stderr
    assert not (tmp_path / "never.bin").exists()
    assert not list(tmp_path.glob("*partial*"))
    p = env.run("cp", tmp_path, f"{rpc.vm_id}:/tmp/")
    assert p.returncode != 0 and "directory" in p.stderr


def test_log_is_empty_without_an_entrypoint(rpc):
    assert rpc.call("log") == {"content": ""}
    req = rpc.start("log_stream")
    time.sleep(0.5)
    assert rpc.cancel(req) == {"cancelled": True}
    assert error_of(req, 10).code == -32003


# ---- lifecycle --------------------------------------------------------------------------------

def test_entrypoint_second_create_and_keep_on_disconnect(env):
    c = env.client()
    try:
        first = c.call("create", {**CREATE, "launch_entrypoint": True,
                                  "image_config": {"entrypoint": ["sh", "-c"],
                                                   "cmd": ["echo entry-started; sleep 600"]}},
                       timeout=300)["id"]
        stream = c.start("log_stream")
        stream.wait_output("log_stream.data", b"entry-started", timeout=60)
        assert b"entry-started" in unb64(c.call("log")["content"])
        # A second create stops the first sandbox (and ends its requests) instead of leaking it.
        second = c.call("create", {**CREATE, "keep_on_disconnect": True}, timeout=300)["id"]
        assert error_of(stream, 10).code == -32003
        assert env.gone(first), f"{first} was left behind"
        # The client goes away without close: a kept sandbox outlives it.
        c.close_stdin()
        assert c.wait_exit(60) == 0
        (row,) = [s for s in env.sandboxes() if s["id"] == second]
        assert row["status"] == "running"
        assert env.run("exec", second, "--", "true").returncode == 0
        env.run("rm", "-f", second, check=True)
        assert env.gone(second)
    finally:
        if c.alive():
            c.kill()


def ids(env):
    return {s["id"] for s in env.sandboxes()}


def test_entrypoint_that_fails_fails_create(env):
    before = ids(env)
    with env.client() as c:
        e = error_of(c.start("create", {**CREATE, "launch_entrypoint": True,
                                        "image_config": {"entrypoint": ["sh", "-c", "exit 9"]}}),
                     300)
        assert e.code == -32000 and "9" in e.message, e.message
        c.close_stdin()
        assert c.wait_exit(60) == 0
    assert ids(env) == before  # removed again, nothing left running
    assert not [d for d in env.run_dirs() if d not in before]


@pytest.mark.parametrize("how", ["sigkill", "stdin_eof"])
def test_a_client_that_disappears_leaves_nothing(env, how):
    c = env.client()
    sid = c.call("create", CREATE, timeout=300)["id"]
    req = c.start("exec", {"command": "sleep 300"})
    time.sleep(1)
    if how == "sigkill":
        c.kill()  # no close, no EOF handling: the supervisor notices its owner is gone
    else:
        c.close_stdin()
        assert c.wait_exit(60) == 0
        assert req.done() and "error" in req.response()
    assert env.gone(sid), f"{sid} left behind after {how}"
    assert owned_rows(env, sid) == 0


def owned_rows(env, sid):
    con = sqlite3.connect(env.home / "state.db")
    try:
        return con.execute("SELECT count(*) FROM owned_resources WHERE sandbox_id = ?",
                           (sid,)).fetchone()[0]
    finally:
        con.close()
