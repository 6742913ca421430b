# SPDX-License-Identifier: Apache-2.0
"""An SDK-side callback server for interception rules (reference §4.8), written from the wire
contract: one connection per call, one JSON request line in, one JSON answer out.

Each callback_id picks a behaviour (see ANSWERS); every request is recorded for the tests."""
import base64
import json
import os
import socketserver
import threading
import time


def _answer(req):
    cb = req["callback_id"]
    if cb == "tag":
        headers = dict(req["request_headers"])
        headers["X-Hooked"] = ["by-sdk"]
        headers["Host"] = ["evil.test"]  # ignored: the connection's host stays
        return {"action": "mutate",
                "request": {"headers": headers, "query": {"from": "sdk"}, "path": "/hooked"}}
    if cb == "deny":
        return {"action": "block"}
    if cb == "slow":
        time.sleep(8)
        return {"action": "block"}
    if cb == "pretty":
        return ("pretty", json.dumps({"action": "block"}, indent=2))
    if cb == "garbage":
        return "this is not json"
    if cb == "error":
        return {"error": "the SDK handler raised"}
    if cb == "body":
        return {"response": {"headers": {"X-Sdk": "yes", "Content-Type": ["text/plain"]},
                             "set_body_base64": base64.b64encode(
                                 b"replaced by the SDK\n").decode()}}
    if cb == "sse":
        return {"response": {"body_replacements": [{"find": "event", "replace": "SDK-EVENT"}]}}
    return {}


class HookServer:
    def __init__(self, path):
        self.path = str(path)
        self.calls = []
        self.lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline()
                req = json.loads(line)
                with outer.lock:
                    outer.calls.append(req)
                ans = _answer(req)
                linger = isinstance(ans, tuple)  # answer, then keep the connection open
                if linger:
                    ans = ans[1]
                data = ans if isinstance(ans, str) else json.dumps(ans)
                try:
                    self.wfile.write(data.encode() + b"\n")
                    self.wfile.flush()
                    if linger:
                        time.sleep(8)
                except OSError:
                    pass  # the proxy gave up waiting

        if os.path.exists(self.path):
            os.unlink(self.path)
        self.server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def calls_for(self, callback_id):
        with self.lock:
            return [c for c in self.calls if c["callback_id"] == callback_id]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        if os.path.exists(self.path):
            os.unlink(self.path)
