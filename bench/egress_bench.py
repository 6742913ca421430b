#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Egress proxy benchmark: matchlock's MITM vs mitmproxy (Debian's mitmdump, transparent mode) in
the same namespace topology as tests/acceptance/test_egress.py, run side by side.

  throughput: N x 1 MiB HTTPS bodies over 16 parallel connections (curl --parallel)
  latency:    p50 of small HTTPS GETs on a kept-alive connection and with a new connection each,
              through each proxy, minus the same measured directly (a bypass address)
Prints the ratios. Needs root, iproute2, nftables, curl, openssl, dnsmasq, mitmproxy, nginx-light (server).
Timings are printed, never asserted.
"""
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "acceptance"))
from framework import egress  # noqa: E402

BENCH_IP = "198.51.100.14"   # nginx, reached through the proxy under test
BYPASS_IP = "198.51.100.15"  # the same nginx, reached directly (the baseline)
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "256"))
PARALLEL = 16
LAT_SAMPLES = int(os.environ.get("BENCH_LATENCY_SAMPLES", "300"))

LATENCY_CLIENT = r"""
import json, socket, ssl, sys, time
ip, cafile, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=cafile)
req = b"GET /echo HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(body) < length:
        body += s.recv(65536)
def connect():
    return ctx.wrap_socket(socket.create_connection((ip, 443), timeout=5), server_hostname="allowed.test")
keep, fresh = [], []
s = connect()
for _ in range(10):
    s.sendall(req); read_response(s)
for _ in range(n):
    t = time.perf_counter(); s.sendall(req); read_response(s); keep.append(time.perf_counter() - t)
s.close()
for _ in range(n // 3):
    t = time.perf_counter(); c = connect(); c.sendall(req); read_response(c); c.close()
    fresh.append(time.perf_counter() - t)
print(json.dumps({"keepalive": keep, "fresh": fresh}))
"""


def throughput(topo, cafile, ip):
    url = f"https://allowed.test/bytes/{1 << 20}"
    # --http1.1: 16 real connections (with h2, curl would multiplex everything over one).
    args = ["curl", "-sS", "--http1.1", "--parallel", "--parallel-immediate", "--parallel-max", str(PARALLEL),
            "--cacert", str(cafile), "--resolve", f"allowed.test:443:{ip}", "--max-time", "120",
            "-o", "/dev/null", "-w", "%{size_download}\n"]
    for _ in range(REQUESTS):
        args += [url, "-o", "/dev/null"]
    t = time.perf_counter()
    p = topo.ns(topo.client, *args, timeout=300)
    elapsed = time.perf_counter() - t
    total = sum(int(x) for x in p.stdout.split())
    if total != REQUESTS << 20:
        raise RuntimeError(f"short download: {total} bytes")
    return total / elapsed / (1 << 20)


def latency(topo, cafile, ip):
    p = topo.ns(topo.client, egress.PYTHON, "-c", LATENCY_CLIENT, ip, cafile, LAT_SAMPLES,
                timeout=300)
    r = json.loads(p.stdout)
    return statistics.median(r["keepalive"]) * 1000, statistics.median(r["fresh"]) * 1000


def start_mitmproxy(topo):
    confdir = topo.dir / "mitm"
    confdir.mkdir()
    p = topo.spawn(topo.router, [
        "mitmdump", "--mode", "transparent", "--listen-host", egress.ROUTER_IP,
        "--listen-port", str(egress.PROXY_PORT), "--set", f"confdir={confdir}",
        "--set", f"ssl_verify_upstream_trusted_ca={topo.test_ca}", "-q"])
    ca = confdir / "mitmproxy-ca-cert.pem"
    deadline = time.time() + 30
    while time.time() < deadline:
        probe = topo.ns(topo.client, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        "--max-time", "2", "--cacert", str(ca), "--resolve",
                        f"allowed.test:443:{egress.GOOD_IP}", "https://allowed.test/echo",
                        check=False, timeout=5) if ca.exists() else None
        if probe is not None and probe.stdout == "200":
            return p, ca
        time.sleep(0.3)
    raise RuntimeError("mitmproxy did not start")


def main():
    for tool in ("ip", "nft", "curl", "openssl", "dnsmasq", "mitmdump", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"missing {tool}")
    binary = egress.find_binary()
    if binary is None:
        sys.exit("build matchlock-egress-test first (or set MATCHLOCK_EGRESS_TEST_BIN)")
    topo = egress.Topology(pathlib.Path(tempfile.mkdtemp(prefix="ml-egress-bench-")),
                           bypass_ip=BYPASS_IP)
    results = {}
    try:
        topo.setup()
        topo.start_nginx([BENCH_IP, BYPASS_IP])
        results["direct"] = {"lat": latency(topo, topo.test_ca, BYPASS_IP),
                             "tput": throughput(topo, topo.test_ca, BYPASS_IP)}
        ml = egress.Proxy(topo, binary, ["--allow", "allowed.test"])
        results["matchlock"] = {"lat": latency(topo, ml.ca_file, BENCH_IP),
                                "tput": throughput(topo, ml.ca_file, BENCH_IP)}
        ml.stop()
        mitm, mitm_ca = start_mitmproxy(topo)
        results["mitmproxy"] = {"lat": latency(topo, mitm_ca, BENCH_IP),
                                "tput": throughput(topo, mitm_ca, BENCH_IP)}
        mitm.terminate()
    finally:
        topo.close()
        shutil.rmtree(topo.dir, ignore_errors=True)

    d = results["direct"]
    print(f"{'path':<10} {'MiB/s':>9} {'p50 keep-alive ms':>18} {'p50 new-conn ms':>16}")
    for name, r in results.items():
        print(f"{name:<10} {r['tput']:>9.1f} {r['lat'][0]:>18.3f} {r['lat'][1]:>16.3f}")
    ml, mp = results["matchlock"], results["mitmproxy"]
    added = lambda r, i: r["lat"][i] - d["lat"][i]  # noqa: E731
    print(f"added p50 (keep-alive): matchlock {added(ml, 0):.3f} ms, mitmproxy {added(mp, 0):.3f} ms")
    print(f"added p50 (new conn):   matchlock {added(ml, 1):.3f} ms, mitmproxy {added(mp, 1):.3f} ms")
    print(f"throughput ratio matchlock/mitmproxy: {ml['tput'] / mp['tput']:.1f}x (goal >= 10x)")
    print(f"throughput matchlock/direct: {ml['tput'] / d['tput']:.2f}")
    print(f"added-latency ratio mitmproxy/matchlock (keep-alive): "
          f"{added(mp, 0) / max(added(ml, 0), 1e-6):.1f}x (goal: matchlock <= 1 ms added)")


if __name__ == "__main__":
    main()
