# SPDX-License-Identifier: Apache-2.0
"""Test "internet" servers for the egress acceptance tests (stdlib only; run inside a netns).

usage: egress_servers.py CONFIG.json
CONFIG: {"log": path, "servers": [{"ip", "port", "tls": bool, "cert"?, "key"?}]}
Every request is appended to the log as a JSON line {"server","method","path","headers"} so that
tests can check what the server saw without echoing secrets back to the client.
Paths: /echo (small text), /sse (three events 0.4 s apart), /bytes/<n> (n bytes).
"""
import http.server
import json
import socketserver
import ssl
import sys
import threading
import time

CONFIG = json.load(open(sys.argv[1]))
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes

    def log_message(self, *args):
        pass

    def record(self):
        entry = {"server": f"{self.server.server_address[0]}:{self.server.server_address[1]}",
                 "method": self.command, "path": self.path, "headers": dict(self.headers)}
        with LOCK, open(CONFIG["log"], "a") as f:
            f.write(json.dumps(entry) + "\n")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        self.record()
        self.reply(200, b"got %d bytes\n" % len(body))

    def do_GET(self):
        self.record()
        if self.path.startswith("/sse"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                chunk = f"data: event {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(0.4)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.reply(200, b"x" * n)
            return
        path = self.path.split("?")[0]  # never reflect the query: it may carry secrets
        self.reply(200, f"hello from {self.server.server_address[0]} {path}\n".encode())

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer.server_bind() calls getfqdn(), a DNS lookup that times out in a netns.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def bind(spec):
    srv = Server((spec["ip"], spec["port"]), Handler)
    if spec.get("tls"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(spec["cert"], spec["key"])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    return srv


# Bind everything before announcing readiness; serve in threads.
for srv in [bind(s) for s in CONFIG["servers"]]:
    threading.Thread(target=srv.serve_forever, daemon=True).start()
print("ready", flush=True)
while True:
    time.sleep(3600)
