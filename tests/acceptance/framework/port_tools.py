# SPDX-License-Identifier: Apache-2.0
"""Both ends of the published-port tests (stdlib only).

python3 port_tools.py serve PORT [ADDRESS]   (or python3 -c "$SERVE" PORT [ADDRESS])
    (in the guest) an echo server on ADDRESS:PORT (default 127.0.0.1): every connection gets back exactly what it
    sent, streamed, then a half-close; one thread per connection.
python3 port_tools.py client PORT MIB CONNS [ADDRESS]
    (on the host, inside the test's namespace) CONNS concurrent connections, each sending MIB MiB
    of seeded random bytes while it reads the echo; prints one JSON line:
    {"ok": n, "failed": [reasons], "seconds": s, "mib_per_s": x}.
python3 port_tools.py wait PORT [SECONDS] [ADDRESS]
    retries a small echo until it comes back (the guest server may still be starting).
python3 port_tools.py latency PORT N [ADDRESS]
    N sequential connections, each connect + 1-byte echo + close; prints the median and p90 in ms
    as JSON (bench/ports.sh).
"""
import hashlib
import json
import random
import socket
import sys
import threading
import time

CHUNK = 1 << 16

SERVE = r'''
import socket, sys, threading
def handle(c):
    try:
        while True:
            d = c.recv(1 << 16)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1])))
s.listen(256)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
'''


def one(port, nbytes, seed, address):
    sent = hashlib.sha256()
    got = hashlib.sha256()
    received = 0
    s = socket.create_connection((address, port), timeout=120)

    def writer():
        rng = random.Random(seed)
        left = nbytes
        while left > 0:
            n = min(CHUNK, left)
            block = rng.randbytes(n)
            sent.update(block)
            s.sendall(block)
            left -= n
        s.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    t.start()
    while True:
        d = s.recv(CHUNK)
        if not d:
            break
        got.update(d)
        received += len(d)
    t.join()
    s.close()
    if received != nbytes or got.hexdigest() != sent.hexdigest():
        return f"conn {seed}: {received} of {nbytes} bytes back, checksum " + (
            "ok" if got.hexdigest() == sent.hexdigest() else "mismatch")
    return None


def client(port, mib, conns, address="127.0.0.1"):
    nbytes = int(float(mib) * 1024 * 1024)
    results = [None] * conns

    def run(i):
        try:
            results[i] = one(port, nbytes, i, address)
        except OSError as e:
            results[i] = f"conn {i}: {e}"

    start = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - start
    failed = [r for r in results if r]
    return {"ok": conns - len(failed), "failed": failed, "seconds": round(secs, 3),
            "mib_per_s": round(nbytes * conns / (1 << 20) / secs, 2)}


def wait(port, seconds=60, address="127.0.0.1"):
    deadline = time.monotonic() + float(seconds)
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=10) as s:
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                if s.recv(16) == b"ping":
                    return True
                last = "no echo"
        except OSError as e:
            last = str(e)
        time.sleep(0.3)
    print(f"port {port}: {last}", file=sys.stderr)
    return False


def latency(port, n, address="127.0.0.1"):
    times = []
    for _ in range(int(n)):
        t = time.perf_counter()
        with socket.create_connection((address, port), timeout=30) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise SystemExit("no echo")
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median_ms": round(times[len(times) // 2], 3),
            "p90_ms": round(times[int(len(times) * 0.9) - 1], 3)}


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        sys.argv = [sys.argv[0], *sys.argv[2:]]
        exec(compile(SERVE, "serve", "exec"), {"__name__": "serve"})
    elif cmd == "client":
        print(json.dumps(client(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), *sys.argv[5:])))
    elif cmd == "latency":
        print(json.dumps(latency(int(sys.argv[2]), sys.argv[3], *sys.argv[4:])))
    elif cmd == "wait":
        sys.exit(0 if wait(int(sys.argv[2]), *sys.argv[3:]) else 1)
