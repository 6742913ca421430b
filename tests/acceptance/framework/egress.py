# SPDX-License-Identifier: Apache-2.0
"""Network-namespace topology for the egress proxy tests (stdlib only).

  client netns  ──veth──  router netns (proxy + nftables REDIRECT)  ──veth──  internet netns
  192.168.77.2            192.168.77.1 | 198.51.100.1, 10.99.0.1             198.51.100.10-13,
                                                                              .53 (dnsmasq), 10.99.0.2

Every resource is created with a random suffix and removed by close(), even after failures.
198.51.100.0/24 is TEST-NET-2: it never leaves the namespaces.
"""
import json
import os
import pathlib
import secrets
import select
import shutil
import signal
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[3]
PYTHON = "/usr/bin/python3"
PROXY_PORT = 15001
DNS_PORT = 15053
ROUTER_IP = "192.168.77.1"
CLIENT_IP = "192.168.77.2"
GOOD_IP = "198.51.100.10"
OTHER_IP = "198.51.100.11"
BAD_CERT_IP = "198.51.100.13"
DNS_IP = "198.51.100.53"
PRIVATE_IP = "10.99.0.2"

NAMES = ["allowed.test", "other.test", "wild.test", "a.wild.test", "b.a.wild.test", "late.test",
         "private.test", "secret.test", "bench.test"]


def readline(pipe, timeout=10):
    """A bounded readline on a subprocess pipe ("" on timeout or EOF)."""
    ready, _, _ = select.select([pipe], [], [], timeout)
    return pipe.readline() if ready else ""


def run(cmd, timeout=20, check=True, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def find_binary():
    env = os.environ.get("MATCHLOCK_EGRESS_TEST_BIN")
    if env:
        return env
    for build in ("build", "build-net"):
        p = ROOT / build / "src" / "net" / "matchlock-egress-test"
        if p.exists():
            return str(p)
    return None


def make_ca(d: pathlib.Path, name: str):
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext",
         "keyUsage=critical,keyCertSign,cRLSign"])
    return key, crt


def make_leaf(d: pathlib.Path, name: str, ca_key, ca_crt, sans):
    key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=" + ",".join(sans) + "\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", f"/CN={name}"])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext])
    return key, crt


class Topology:
    def __init__(self, workdir: pathlib.Path, bypass_ip=None):
        """bypass_ip: an internet address the client reaches directly (benchmarks only)."""
        self.dir = workdir
        self.bypass_ip = bypass_ip
        sfx = secrets.token_hex(3)
        self.client = f"mlc{sfx}"
        self.router = f"mlr{sfx}"
        self.inet = f"mli{sfx}"
        self.procs = []
        self.netns_etc = pathlib.Path("/etc/netns") / self.client
        self.server_log = workdir / "server.log"
        self.dns_log = workdir / "dnsmasq.log"
        self.server_log.touch()

    # -- setup ---------------------------------------------------------------------------------

    def ns(self, name, *cmd, **kw):
        return run(["ip", "netns", "exec", name, *map(str, cmd)], **kw)

    def setup(self):
        c, r, i = self.client, self.router, self.inet
        for n in (c, r, i):
            run(["ip", "netns", "add", n])
        run(["ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "r0", "netns", r])
        run(["ip", "link", "add", "r1", "netns", r, "type", "veth", "peer", "i0", "netns", i])
        for n, dev in ((c, "c0"), (r, "r0"), (r, "r1"), (i, "i0")):
            self.ns(n, "ip", "link", "set", dev, "up")
        for n in (c, r, i):
            self.ns(n, "ip", "link", "set", "lo", "up")
        self.ns(c, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "c0")
        self.ns(c, "ip", "route", "add", "default", "via", ROUTER_IP)
        self.ns(r, "ip", "addr", "add", f"{ROUTER_IP}/24", "dev", "r0")
        self.ns(r, "ip", "addr", "add", "198.51.100.1/24", "dev", "r1")
        self.ns(r, "ip", "addr", "add", "10.99.0.1/24", "dev", "r1")
        for ip in (GOOD_IP, OTHER_IP, "198.51.100.12", BAD_CERT_IP, DNS_IP):
            self.ns(i, "ip", "addr", "add", f"{ip}/24", "dev", "i0")
        self.ns(i, "ip", "addr", "add", f"{PRIVATE_IP}/24", "dev", "i0")
        self.ns(i, "ip", "route", "add", "default", "via", "198.51.100.1")
        self.ns(r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # Sealed egress: all client TCP to the proxy, DNS to the resolver, everything else dropped.
        bypass = f'iifname "r0" ip daddr {self.bypass_ip} accept' if self.bypass_ip else ""
        rules = f"""
table ip matchlock_test {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {bypass}
    iifname "r0" meta l4proto tcp redirect to :{PROXY_PORT}
    iifname "r0" udp dport 53 redirect to :{DNS_PORT}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    {bypass}
    iifname "r0" drop
  }}
}}
"""
        self.ns(r, "nft", "-f", "-", input=rules)
        self.make_certs()
        self.start_servers()
        self.start_dnsmasq()

    def make_certs(self):
        d = self.dir
        self.test_ca_key, self.test_ca = make_ca(d, "internet-ca")
        self.rogue_ca_key, self.rogue_ca = make_ca(d, "rogue-ca")
        sans = [f"DNS:{n}" for n in NAMES] + ["DNS:*.wild.test", "DNS:*.a.wild.test",
                                              f"IP:{GOOD_IP}", f"IP:{OTHER_IP}"]
        self.good_key, self.good_crt = make_leaf(d, "good", self.test_ca_key, self.test_ca, sans)
        self.bad_key, self.bad_crt = make_leaf(d, "badcert", self.rogue_ca_key, self.rogue_ca,
                                               ["DNS:badcert.test"])

    def start_servers(self):
        servers = []
        for ip in (GOOD_IP, OTHER_IP, "198.51.100.12"):
            servers.append({"ip": ip, "port": 443, "tls": True, "cert": str(self.good_crt),
                            "key": str(self.good_key)})
            servers.append({"ip": ip, "port": 80, "tls": False})
        servers.append({"ip": BAD_CERT_IP, "port": 443, "tls": True, "cert": str(self.bad_crt),
                        "key": str(self.bad_key)})
        servers.append({"ip": PRIVATE_IP, "port": 80, "tls": False})
        servers.append({"ip": PRIVATE_IP, "port": 443, "tls": True, "cert": str(self.good_crt),
                        "key": str(self.good_key)})
        servers.append({"ip": GOOD_IP, "port": 2222, "tls": False})
        cfg = self.dir / "servers.json"
        cfg.write_text(json.dumps({"log": str(self.server_log), "servers": servers}))
        script = ROOT / "tests" / "acceptance" / "framework" / "egress_servers.py"
        p = self.spawn(self.inet, [PYTHON, str(script), str(cfg)], stdout=subprocess.PIPE)
        line = readline(p.stdout)
        if "ready" not in line:
            raise RuntimeError("test servers did not start")

    def start_dnsmasq(self):
        args = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                f"--listen-address={DNS_IP}", "--bind-interfaces", "--port=53",
                f"--pid-file={self.dir / 'dnsmasq.pid'}", "--user=root", "--group=root",
                "--log-queries", f"--log-facility={self.dns_log}"]
        for name in NAMES:
            args.append(f"--address=/{name}/{GOOD_IP}")
        args.append(f"--address=/private.test/{PRIVATE_IP}")
        self.spawn(self.inet, args)
        self.netns_etc.mkdir(parents=True, exist_ok=True)
        (self.netns_etc / "resolv.conf").write_text(f"nameserver {ROUTER_IP}\noptions timeout:2 attempts:1\n")
        # Wait until dnsmasq answers (bounded).
        deadline = time.time() + 5
        while time.time() < deadline:
            p = self.ns(self.router, PYTHON, "-c",
                        "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                        "s.settimeout(0.3);"
                        f"s.sendto(bytes.fromhex('12340100000100000000000007616c6c6f77656404746573740000010001'),('{DNS_IP}',53));"
                        "s.recv(512)", check=False, timeout=5)
            if p.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("dnsmasq did not start")

    def spawn(self, netns, cmd, **kw):
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(["ip", "netns", "exec", netns, *map(str, cmd)], text=True, **kw)
        self.procs.append(p)
        return p

    def start_nginx(self, ips, name="nginx"):
        """nginx (2 workers, HTTP/1.1 and h2 over TLS) on `ips`:443 in the internet netns."""
        d = self.dir / name
        (d / "www" / "bytes").mkdir(parents=True)
        (d / "www" / "bytes" / str(1 << 20)).write_bytes(b"x" * (1 << 20))
        for ip in ips:
            self.ns(self.inet, "ip", "addr", "add", f"{ip}/24", "dev", "i0")
        temp = " ".join(f"{k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi",
                                                             "uwsgi", "scgi"))
        listen = "\n".join(f"    listen {ip}:443 ssl http2;" for ip in ips)
        (d / "nginx.conf").write_text(f"""
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {temp}
  server {{
{listen}
    ssl_certificate {self.good_crt};
    ssl_certificate_key {self.good_key};
    keepalive_requests 100000;
    root {d}/www;
    location = /echo {{ default_type text/plain; return 200 "hello from nginx\\n"; }}
  }}
}}
""")
        self.spawn(self.inet, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g",
                               "daemon off;"])
        deadline = time.time() + 10
        while time.time() < deadline:
            p = self.ns(self.router, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        "--max-time", "2", "--cacert", str(self.test_ca), "--resolve",
                        f"allowed.test:443:{ips[0]}", "https://allowed.test/echo", check=False,
                        timeout=5)
            if p.stdout == "200":
                return
            time.sleep(0.2)
        raise RuntimeError(f"nginx did not start: {(d / 'error.log').read_text()}")

    # -- teardown ------------------------------------------------------------------------------

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=3)
        for n in (self.client, self.router, self.inet):
            run(["ip", "netns", "del", n], check=False)
        shutil.rmtree(self.netns_etc, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------

    def server_requests(self):
        return [json.loads(l) for l in self.server_log.read_text().splitlines() if l.strip()]


class Proxy:
    """matchlock-egress-test running in the router netns."""

    def __init__(self, topo: Topology, binary: str, args, env=None):
        self.topo = topo
        self.events_file = topo.dir / f"events-{secrets.token_hex(3)}.jsonl"
        self.ca_file = topo.dir / f"proxy-ca-{secrets.token_hex(3)}.pem"
        cmd = [binary, "--listen", f"{ROUTER_IP}:{PROXY_PORT}", "--events", self.events_file,
               "--ca-out", self.ca_file, "--upstream-ca", topo.test_ca, *args]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = topo.spawn(topo.router, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=open(topo.dir / "proxy.stderr", "a"), env=full_env)
        self.ready = json.loads(readline(self.proc.stdout) or "{}")
        if not self.ready.get("ready"):
            raise RuntimeError(f"proxy did not start: {(topo.dir / 'proxy.stderr').read_text()}")

    def command(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(readline(self.proc.stdout) or "{}")

    def events(self):
        if not self.events_file.exists():
            return []
        return [json.loads(l) for l in self.events_file.read_text().splitlines() if l.strip()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)

    def curl(self, url, *extra, resolve_ip=None, timeout=8):
        """curl in the client netns trusting only the proxy's CA; returns (code, body, stderr)."""
        cmd = ["curl", "-sS", "--max-time", "5", "--cacert", self.ca_file, "-o", "-",
               "-w", "\n%{http_code}"]
        if resolve_ip:
            host = url.split("/")[2]
            port = 443 if url.startswith("https") else 80
            if ":" in host:
                host, port = host.split(":")
            cmd += ["--resolve", f"{host}:{port}:{resolve_ip}"]
        cmd += [*extra, url]
        p = self.topo.ns(self.topo.client, *cmd, check=False, timeout=timeout)
        body, _, code = p.stdout.rpartition("\n")
        return int(code or 0), body, p.stderr
