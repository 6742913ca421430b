# SPDX-License-Identifier: Apache-2.0
"""Egress proxy (issue #6) against real curl, real servers and real nftables rules, in network
namespaces the tests create (see framework/egress.py). Needs root, iproute2, nftables, curl,
openssl and dnsmasq."""
import json
import shutil
import socket  # noqa: F401  (used inside client snippets)
import time

import pytest

from framework import egress
from framework.egress import GOOD_IP, OTHER_IP, BAD_CERT_IP, PRIVATE_IP

pytestmark = [pytest.mark.need_root]

TOOLS = ("ip", "nft", "curl", "openssl", "dnsmasq")
SECRET_VALUE = "sk-real-value-8f1c2e"


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {missing}")
    if egress.find_binary() is None:
        pytest.fail("matchlock-egress-test not built (set MATCHLOCK_EGRESS_TEST_BIN)")
    t = egress.Topology(tmp_path_factory.mktemp("egress"))
    try:
        t.setup()
        yield t
    finally:
        t.close()


def start_proxy(topo, *args, env=None):
    return egress.Proxy(topo, egress.find_binary(), list(args), env=env)


@pytest.fixture
def proxy(topo):
    p = start_proxy(topo, "--allow", "allowed.test", "--allow", "*.wild.test", "--allow",
                    "private.test", "--secret", "API_KEY@allowed.test",
                    env={"API_KEY": SECRET_VALUE})
    try:
        yield p
    finally:
        p.stop()


def last_event(p, host):
    for _ in range(20):
        evs = [e for e in p.events() if e["network"]["host"] == host]
        if evs:
            return evs[-1]
        time.sleep(0.05)
    raise AssertionError(f"no event for {host}: {p.events()}")


def test_allowed_host_passes_https_and_http(proxy):
    code, body, err = proxy.curl("https://allowed.test/echo", resolve_ip=GOOD_IP)
    assert code == 200, err
    assert "hello from 198.51.100.10 /echo" in body
    code, body, _ = proxy.curl("http://allowed.test/plain", resolve_ip=GOOD_IP)
    assert code == 200 and "/plain" in body
    ev = last_event(proxy, "allowed.test")
    assert ev["type"] == "network" and isinstance(ev["timestamp"], int)
    n = ev["network"]
    assert n["method"] == "GET" and n["status_code"] == 200 and not n["blocked"]
    assert n["url"] == "http://allowed.test/plain" and n["response_bytes"] > 0


def test_other_host_blocked_with_reason(proxy):
    code, body, _ = proxy.curl("https://other.test/", resolve_ip=GOOD_IP)
    assert code == 403
    assert "host not in allowlist" in body
    n = last_event(proxy, "other.test")["network"]
    assert n["blocked"] and n["block_reason"] == "host not in allowlist"
    code, body, _ = proxy.curl("http://other.test/", resolve_ip=GOOD_IP)
    assert code == 403 and "host not in allowlist" in body


def test_wildcard_semantics(proxy):
    assert proxy.curl("https://a.wild.test/", resolve_ip=GOOD_IP)[0] == 200
    assert proxy.curl("https://b.a.wild.test/", resolve_ip=GOOD_IP)[0] == 200
    assert proxy.curl("https://A.WILD.test/", resolve_ip=GOOD_IP)[0] == 200
    code, body, _ = proxy.curl("https://wild.test/", resolve_ip=GOOD_IP)
    assert code == 403 and "host not in allowlist" in body


def test_private_destination_blocked(proxy):
    # private.test is on the allow-list, but it points into 10/8.
    code, body, _ = proxy.curl("https://private.test/", resolve_ip=PRIVATE_IP)
    assert code == 403 and "blocked range (private)" in body
    code, body, _ = proxy.curl(f"http://{PRIVATE_IP}/")
    assert code == 403


def test_secret_placeholder_replaced(topo, proxy):
    ph = proxy.ready["placeholders"]["API_KEY"]
    assert ph.startswith("SANDBOX_SECRET_") and len(ph) == len("SANDBOX_SECRET_") + 32
    code, body, err = proxy.curl(f"https://allowed.test/secret?key={ph}", "-H",
                                 f"Authorization: Bearer {ph}", "-v", resolve_ip=GOOD_IP)
    assert code == 200
    assert SECRET_VALUE not in body and SECRET_VALUE not in err
    seen = [r for r in topo.server_requests() if r["path"].startswith("/secret")][-1]
    assert seen["headers"]["Authorization"] == f"Bearer {SECRET_VALUE}"
    assert seen["path"] == f"/secret?key={SECRET_VALUE}"
    # Nothing the host records carries the value.
    assert SECRET_VALUE not in proxy.events_file.read_text()
    assert SECRET_VALUE not in (topo.dir / "proxy.stderr").read_text()


def test_secret_placeholder_to_wrong_host_is_403(topo, proxy):
    ph = proxy.ready["placeholders"]["API_KEY"]
    before = len(topo.server_requests())
    code, body, _ = proxy.curl("https://a.wild.test/leak", "-H", f"X-Key: {ph}",
                               resolve_ip=GOOD_IP)
    assert code == 403 and "secret placeholder sent to unauthorized host" in body
    assert not [r for r in topo.server_requests()[before:] if r["path"] == "/leak"]
    n = last_event(proxy, "a.wild.test")["network"]
    assert n["blocked"] and n["block_reason"] == "secret placeholder sent to unauthorized host"


CLIENT_SSE = r"""
import json, socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[1])
s = ctx.wrap_socket(socket.create_connection(("198.51.100.10", 443), timeout=5),
                    server_hostname="allowed.test")
s.sendall(b"GET /sse HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
t0 = time.time(); times = []; buf = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    buf += d
    n = buf.count(b"data: event")
    while len(times) < n:
        times.append(time.time() - t0)
print(json.dumps(times))
"""


def test_sse_stream_arrives_incrementally(topo, proxy):
    p = topo.ns(topo.client, egress.PYTHON, "-c", CLIENT_SSE, proxy.ca_file, timeout=10)
    times = json.loads(p.stdout)
    assert len(times) == 3
    # Events are sent 0.4 s apart: if the proxy buffered, they would arrive together.
    assert times[2] - times[0] > 0.6, times


def test_upstream_with_bad_certificate_rejected(proxy):
    proxy.command("allow-add badcert.test")
    code, body, _ = proxy.curl("https://badcert.test/", resolve_ip=BAD_CERT_IP)
    assert code == 502
    assert "certificate verification failed" in body


def test_runtime_add_and_delete(proxy):
    assert proxy.curl("https://late.test/", resolve_ip=GOOD_IP)[0] == 403
    assert proxy.command("allow-add late.test") == {"added": ["late.test"]}
    assert proxy.curl("https://late.test/", resolve_ip=GOOD_IP)[0] == 200
    assert proxy.command("allow-del late.test") == {"removed": ["late.test"]}
    assert proxy.curl("https://late.test/", resolve_ip=GOOD_IP)[0] == 403


CLIENT_RAW = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.sendall(b"\x00\x01binary-protocol\r\n")
try:
    print(repr(s.recv(100)))
except (ConnectionResetError, socket.timeout) as e:
    print("reset")
"""


def test_non_http_tcp_to_non_allowed_destination_refused(topo, proxy):
    p = topo.ns(topo.client, egress.PYTHON, "-c", CLIENT_RAW, GOOD_IP, "2222", timeout=10)
    assert p.stdout.strip() in ("b''", "reset")
    ev = last_event(proxy, GOOD_IP)["network"]
    assert ev["blocked"] and ev["block_reason"] == "host not in allowlist"


def test_pipelined_requests(topo, proxy):
    script = r"""
import socket
s = socket.create_connection(("198.51.100.10", 80), timeout=5)
s.sendall(b"GET /p1 HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
          b"POST /p2 HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 4\r\n\r\nabcd"
          b"GET /p3 HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
buf = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    buf += d
print(buf.count(b"HTTP/1.1 200"), b"/p1" in buf, b"got 4 bytes" in buf, b"/p3" in buf)
"""
    p = topo.ns(topo.client, egress.PYTHON, "-c", script, timeout=10)
    assert p.stdout.split() == ["3", "True", "True", "True"]


def test_oversized_headers_get_431(proxy):
    code, _, _ = proxy.curl("http://allowed.test/", "-H", "X-Big: " + "a" * 40000,
                            resolve_ip=GOOD_IP)
    assert code == 431


@pytest.fixture
def dns_proxy(topo):
    p = start_proxy(topo, "--allow", "allowed.test", "--allow", "*.wild.test",
                    "--dns-listen", f"{egress.ROUTER_IP}:{egress.DNS_PORT}",
                    "--dns-upstream", f"{egress.DNS_IP}:53")
    try:
        yield p
    finally:
        p.stop()


RESOLVE = r"""
import socket, sys
try:
    print(socket.getaddrinfo(sys.argv[1], 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
except socket.gaierror as e:
    print("fail", e.errno)
"""


def test_dns_answers_only_allowed_names(topo, dns_proxy):
    p = topo.ns(topo.client, egress.PYTHON, "-c", RESOLVE, "allowed.test", timeout=10)
    assert p.stdout.strip() == GOOD_IP
    p = topo.ns(topo.client, egress.PYTHON, "-c", RESOLVE, "other.test", timeout=10)
    assert p.stdout.startswith("fail")


def test_raw_tcp_to_resolved_allowed_name(topo, dns_proxy):
    # Before any lookup the address is unknown: refused.
    p = topo.ns(topo.client, egress.PYTHON, "-c", CLIENT_RAW, GOOD_IP, "2222", timeout=10)
    assert p.stdout.strip() in ("b''", "reset")
    # After the sandbox resolver answered allowed.test -> GOOD_IP, non-HTTP TCP to it passes (the
    # test server answers the binary garbage with an error page).
    p = topo.ns(topo.client, egress.PYTHON, "-c", RESOLVE, "allowed.test", timeout=10)
    assert p.stdout.strip() == GOOD_IP
    p = topo.ns(topo.client, egress.PYTHON, "-c", CLIENT_RAW, GOOD_IP, "2222", timeout=10)
    assert "Error" in p.stdout


def test_unresolved_ip_of_allowed_name_refused(topo, dns_proxy):
    # Resolved through the sandbox resolver: allowed.test -> GOOD_IP is pinned.
    code, _, err = dns_proxy.curl("https://allowed.test/")
    assert code == 200, err
    # Same allowed name, an address the resolver never gave out: refused.
    code, body, _ = dns_proxy.curl("https://allowed.test/", resolve_ip=OTHER_IP)
    assert code == 403 and "was not resolved" in body
    # A name that was never resolved at all.
    code, body, _ = dns_proxy.curl("https://a.wild.test/", resolve_ip=GOOD_IP)
    assert code == 403 and "was not resolved" in body


def test_tls12_and_h2_clients(proxy):
    code, body, err = proxy.curl("https://allowed.test/v12", "--tlsv1.2", "--tls-max", "1.2",
                                 resolve_ip=GOOD_IP)
    assert code == 200 and "/v12" in body, err
    # h2-capable clients are offered http/1.1 only and fall back to it.
    code, body, err = proxy.curl("https://allowed.test/h2", "--http2", "-v", resolve_ip=GOOD_IP)
    assert code == 200 and "/h2" in body
    assert "ALPN: server accepted http/1.1" in err


def test_host_header_must_match_sni(proxy):
    code, body, _ = proxy.curl("https://allowed.test/", "-H", "Host: other.test",
                               resolve_ip=GOOD_IP)
    assert code == 421 and "does not match" in body


H2_IP = "198.51.100.16"


@pytest.fixture
def open_proxy(topo):
    """No secrets: HTTP/2 may be passed through."""
    p = start_proxy(topo, "--allow", "allowed.test")
    try:
        yield p
    finally:
        p.stop()


def test_h2_passed_through_when_upstream_speaks_it(topo, open_proxy):
    if shutil.which("nginx") is None:
        pytest.skip("nginx (h2 test server) not installed")
    if not getattr(topo, "nginx_started", False):
        topo.start_nginx([H2_IP], name="nginx-h2")
        topo.nginx_started = True
    code, body, err = open_proxy.curl("https://allowed.test/echo", "--http2", "-v",
                                      resolve_ip=H2_IP)
    assert code == 200 and "hello from nginx" in body
    assert "ALPN: server accepted h2" in err
    # h2 is relayed without parsing: one event when the tunnel closes (curl has exited).
    n = last_event(open_proxy, "allowed.test")["network"]
    assert n["url"] == "https://allowed.test/" and n["response_bytes"] > 0 and not n["blocked"]
    # Upstream without h2 (the Python server): the client is answered with http/1.1.
    code, _, err = open_proxy.curl("https://allowed.test/echo", "--http2", "-v",
                                   resolve_ip=GOOD_IP)
    assert code == 200 and "ALPN: server accepted http/1.1" in err
    # Policy still applies before anything is relayed.
    code, body, _ = open_proxy.curl("https://other.test/", "--http2", resolve_ip=H2_IP)
    assert code == 403


def test_large_body_with_slow_reader(proxy):
    # 4 MiB read at ~16 MiB/s: the proxy must apply backpressure, not drop or truncate.
    code, body, err = proxy.curl("https://allowed.test/bytes/4194304", "--limit-rate", "16M",
                                 resolve_ip=GOOD_IP)
    assert code == 200, err
    assert len(body) == 4194304
    n = last_event(proxy, "allowed.test")["network"]
    assert n["response_bytes"] == 4194304


# ---- SDK callback rules (reference §4.8) ---------------------------------------------------------

HOOK_RULES = [
    {"name": "tag", "path": "/hook/tag", "callback_id": "tag", "set_headers": {"X-Static": "1"}},
    {"name": "deny", "path": "/hook/deny", "callback_id": "deny"},
    {"name": "slow", "path": "/hook/slow", "callback_id": "slow", "timeout_ms": 300},
    {"name": "garbage", "path": "/hook/garbage", "callback_id": "garbage"},
    {"name": "pretty", "path": "/hook/pretty", "callback_id": "pretty", "timeout_ms": 4000},
    {"name": "error", "path": "/hook/error", "callback_id": "error"},
    {"name": "body", "phase": "after", "path": "/hook/body", "callback_id": "body"},
    {"name": "sse", "phase": "after", "path": "/sse", "callback_id": "sse"},
]


@pytest.fixture
def hooked(topo):
    from framework.hook_server import HookServer
    hooks = HookServer(topo.dir / "hooks.sock")
    rules = topo.dir / "hook-rules.json"
    rules.write_text(json.dumps({"rules": HOOK_RULES, "callback_socket": hooks.path}))
    p = start_proxy(topo, "--allow", "allowed.test", "--secret", "API_KEY@allowed.test",
                    "--rules", str(rules), env={"API_KEY": SECRET_VALUE})
    try:
        yield p, hooks
    finally:
        p.stop()
        hooks.close()


def test_callback_rules_mutate_and_block_requests(topo, hooked):
    """The SDK's answer is what the server sees: headers replaced (Host kept), query and path
    rewritten; secrets are substituted after the callback, which only ever sees placeholders; a
    block answer is a 403 that never reaches the server."""
    proxy, hooks = hooked
    ph = proxy.ready["placeholders"]["API_KEY"]
    code, body, err = proxy.curl("https://allowed.test/hook/tag?q=1", "-H",
                                 f"Authorization: Bearer {ph}", resolve_ip=GOOD_IP)
    assert code == 200, err
    seen = [r for r in topo.server_requests() if r["path"].startswith("/hooked")][-1]
    assert seen["path"] == "/hooked?from=sdk"
    assert seen["headers"]["X-Hooked"] == "by-sdk"
    assert seen["headers"]["X-Static"] == "1"  # the rule's own edits run before its call
    assert seen["headers"]["Host"] == "allowed.test"
    assert seen["headers"]["Authorization"] == f"Bearer {SECRET_VALUE}"
    (call,) = hooks.calls_for("tag")
    assert call["phase"] == "before" and call["host"] == "allowed.test"
    assert call["method"] == "GET" and call["path"] == "/hook/tag" and call["query"] == {"q": "1"}
    assert call["request_headers"]["Authorization"] == [f"Bearer {ph}"]
    assert SECRET_VALUE not in json.dumps(hooks.calls)

    before = len(topo.server_requests())
    code, body, _ = proxy.curl("https://allowed.test/hook/deny", resolve_ip=GOOD_IP)
    assert code == 403 and "request blocked by policy" in body
    assert not [r for r in topo.server_requests()[before:] if r["path"] == "/hook/deny"]
    n = last_event(proxy, "allowed.test")["network"]
    assert n["blocked"] and n["block_reason"] == "request blocked by policy"
    # A pretty-printed answer ended by a newline counts at once, though the SDK keeps the
    # connection open past the rule's deadline (else the rule would be skipped: a 200).
    code, body, _ = proxy.curl("https://allowed.test/hook/pretty", resolve_ip=GOOD_IP)
    assert code == 403 and "request blocked by policy" in body
    # Plain HTTP goes through the same rules.
    code, _, _ = proxy.curl("http://allowed.test/hook/deny", resolve_ip=GOOD_IP)
    assert code == 403


def test_callback_failures_fail_open_within_the_deadline(topo, hooked):
    """A callback that is too slow (timeout_ms 300, the handler sleeps 8 s and would block),
    answers garbage, or reports an error skips its rule: the request goes on unchanged, and the
    slow one is released by the deadline, well before curl's own 5 s limit."""
    proxy, hooks = hooked
    for name in ("slow", "garbage", "error"):
        code, body, err = proxy.curl(f"https://allowed.test/hook/{name}", resolve_ip=GOOD_IP)
        assert code == 200 and f"/hook/{name}" in body, (name, err)
        assert len(hooks.calls_for(name)) == 1
    log = (topo.dir / "proxy.stderr").read_text()
    assert "callback rule slow on allowed.test: no answer within 300 ms" in log, log
    assert "callback rule garbage on allowed.test: the answer is not a JSON object" in log, log
    assert "the callback reported: the SDK handler raised" in log, log
    # Keep-alive: two requests on one connection, each held for its callback in turn.
    p = topo.ns(topo.client, "curl", "-sS", "--max-time", "5", "--cacert", proxy.ca_file,
                "--resolve", f"allowed.test:443:{GOOD_IP}", "https://allowed.test/hook/error",
                "https://allowed.test/hook/tag", check=False)
    assert "hello from 198.51.100.10 /hook/error" in p.stdout, p.stderr
    assert "hello from 198.51.100.10 /hooked" in p.stdout, p.stderr


def test_callback_socket_missing_fails_open(topo):
    rules = topo.dir / "nosock-rules.json"
    rules.write_text(json.dumps({"rules": HOOK_RULES,
                                 "callback_socket": str(topo.dir / "no-such.sock")}))
    p = start_proxy(topo, "--allow", "allowed.test", "--rules", str(rules))
    try:
        code, body, _ = p.curl("https://allowed.test/hook/deny", resolve_ip=GOOD_IP)
        assert code == 200 and "/hook/deny" in body
    finally:
        p.stop()


def test_callback_rules_rewrite_responses(topo, hooked):
    """After phase: the callback sees the status and both header sets (placeholders only), may
    replace headers (the framing stays upstream's) and the whole body (its length recomputed),
    and its body replacements stream through an SSE response."""
    proxy, hooks = hooked
    ph = proxy.ready["placeholders"]["API_KEY"]
    p = topo.ns(topo.client, "curl", "-sS", "--max-time", "5", "--cacert", proxy.ca_file,
                "--resolve", f"allowed.test:443:{GOOD_IP}", "-D", "-", "-H", f"X-Key: {ph}",
                "https://allowed.test/hook/body", check=False)
    head, _, body = p.stdout.replace("\r\n", "\n").partition("\n\n")
    assert body == "replaced by the SDK\n", p.stdout + p.stderr
    assert "x-sdk: yes" in head.lower()
    assert f"content-length: {len(body)}" in head.lower()
    (call,) = hooks.calls_for("body")
    assert call["phase"] == "after" and call["status_code"] == 200 and call["is_sse"] is False
    assert call["request_headers"]["X-Key"] == [ph]
    assert call["response_headers"]["Content-Type"] == ["text/plain"]
    assert SECRET_VALUE not in json.dumps(hooks.calls)

    code, body, err = proxy.curl("https://allowed.test/sse", "-N", resolve_ip=GOOD_IP)
    assert code == 200, err
    assert body.split("\n\n")[:3] == ["data: SDK-EVENT 0", "data: SDK-EVENT 1",
                                      "data: SDK-EVENT 2"], body
    assert hooks.calls_for("sse")[-1]["is_sse"] is True
