# SPDX-License-Identifier: Apache-2.0
"""A synchronous client for `matchlock rpc` (stdlib only), written from the wire contract in
reference/upstream-matchlock.md §2: JSON-RPC 2.0, one JSON object per line on the server's
stdin/stdout, request ids allocated from 1, request-scoped notifications routed by `params.id`,
`event` notifications (no request id) collected on the side, base64 for every binary payload.

A reader thread owns the server's stdout and a second one drains stderr, so nothing can block on a
full pipe; every wait is bounded and a timeout names what was awaited plus the tail of stderr."""
import base64
import itertools
import json
import queue
import subprocess
import threading
import time

DEFAULT_TIMEOUT = 60.0
STDERR_KEEP = 1 << 20


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class RpcError(Exception):
    """An error response: `code` and `message` as the server sent them (`data` if any)."""

    def __init__(self, code, message, data=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class RpcTimeout(AssertionError):
    """A bounded wait ran out (an AssertionError, so pytest reports it as a test failure)."""


class Request:
    """One request in flight: its notifications in arrival order and, once it came, its final
    response. Filled by the client's reader thread; waited on by the test."""

    def __init__(self, client, req_id, method):
        self.client = client
        self.id = req_id
        self.method = method
        self._cond = threading.Condition()
        self._notes = []
        self._response = None

    # -- fed by the reader thread --------------------------------------------------------------

    def _add_notification(self, msg):
        with self._cond:
            self._notes.append(msg)
            self._cond.notify_all()

    def _finish(self, msg):
        with self._cond:
            self._response = msg
            self._cond.notify_all()

    def _wake(self):
        with self._cond:
            self._cond.notify_all()

    # -- state ---------------------------------------------------------------------------------

    def done(self) -> bool:
        with self._cond:
            return self._response is not None

    @property
    def notifications(self):
        """Every notification received so far: [{"method", "params"}, ...]."""
        with self._cond:
            return list(self._notes)

    def output(self, method) -> bytes:
        """The decoded `data` of every `method` notification so far, concatenated in order."""
        return b"".join(unb64(n["params"]["data"]) for n in self.notifications
                        if n.get("method") == method)

    # -- waits ---------------------------------------------------------------------------------

    def _wait(self, pred, timeout, what, stop_when_done=True):
        """Wait until pred() (called under the lock) is truthy. Fails early when the response
        came (if stop_when_done) or the server is gone, since nothing more can arrive then."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = pred()
                if value:
                    return value
                if stop_when_done and self._response is not None:
                    raise RpcTimeout(f"request {self.id} ({self.method}) finished before {what}: "
                                     f"{_short(self._response)}{self.client._tail_note()}")
                if self.client._eof.is_set() and self._response is None:
                    raise RpcTimeout(f"server exited before {what} (request {self.id}, "
                                     f"{self.method}){self.client._tail_note()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RpcTimeout(f"timed out after {timeout}s waiting for {what} (request "
                                     f"{self.id}, {self.method}){self.client._tail_note()}")
                self._cond.wait(min(left, 0.5))

    def wait_notification(self, method, timeout=DEFAULT_TIMEOUT):
        """The first `method` notification of this request (waiting for it if needed)."""
        def first():
            return next((n for n in self._notes if n.get("method") == method), None)
        return self._wait(first, timeout, f"a {method} notification")

    def wait_output(self, method, needle: bytes, timeout=DEFAULT_TIMEOUT) -> bytes:
        """Wait until the concatenated `method` data contains needle; returns all of it."""
        def has():
            data = b"".join(unb64(n["params"]["data"]) for n in self._notes
                            if n.get("method") == method)
            return data if needle in data else None
        return self._wait(has, timeout, f"{needle!r} in {method}")

    def response(self, timeout=DEFAULT_TIMEOUT):
        """The raw final response object."""
        return self._wait(lambda: self._response, timeout, "the response", stop_when_done=False)

    def result(self, timeout=DEFAULT_TIMEOUT):
        """The final result; raises RpcError for an error response."""
        msg = self.response(timeout)
        if "error" in msg:
            err = msg["error"] or {}
            raise RpcError(err.get("code"), err.get("message"), err.get("data"))
        return msg.get("result")

    def __iter__(self):
        """Notifications in order, ending once the response has come and all were yielded."""
        i = 0
        while True:
            self._wait(lambda: len(self._notes) > i or self._response is not None,
                       DEFAULT_TIMEOUT, f"notification #{i + 1}", stop_when_done=False)
            with self._cond:
                if len(self._notes) > i:
                    note = self._notes[i]
                else:
                    return
            i += 1
            yield note

    # -- input notifications for exec_pipe / exec_tty -----------------------------------------

    def stdin(self, data: bytes):
        self.client.notify(f"{self.method}.stdin", {"id": self.id, "data": b64(data)})

    def stdin_eof(self):
        self.client.notify(f"{self.method}.stdin_eof", {"id": self.id})

    def resize(self, rows, cols):
        self.client.notify(f"{self.method}.resize", {"id": self.id, "rows": rows, "cols": cols})


class RpcClient:
    """`[*prefix, binary, "rpc"]` as a child process with `env`; see the module docstring.

    prefix runs the server through a wrapper that execs it (e.g. `nsenter --net=...`), so the
    process the client holds is the server itself."""

    def __init__(self, binary, env=None, prefix=()):
        self.argv = [*prefix, binary, "rpc"]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()          # ids and the request table
        self._write_lock = threading.Lock()    # one line at a time on stdin
        self._requests = {}
        self._unrouted = queue.Queue()         # responses with no (or an unknown) id
        self.stray = []                        # notifications for no known request
        self._events_cond = threading.Condition()
        self.events = []                       # `event` notifications' params, in order
        self._stderr = bytearray()
        self._stderr_lock = threading.Lock()
        self._eof = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._drainer = threading.Thread(target=self._drain_stderr, daemon=True)
        self._reader.start()
        self._drainer.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.alive():
            self.kill()

    # -- threads -------------------------------------------------------------------------------

    def _read_stdout(self):
        try:
            for line in self.proc.stdout:
                line = line.strip()
                if line:
                    self._route(line)
        finally:
            self._eof.set()
            with self._lock:
                pending = list(self._requests.values())
            for req in pending:
                req._wake()
            with self._events_cond:
                self._events_cond.notify_all()

    def _route(self, line: bytes):
        try:
            msg = json.loads(line)
        except ValueError:
            self._unrouted.put({"unparsable": line.decode("utf-8", "replace")})
            return
        if not isinstance(msg, dict):
            self._unrouted.put({"unexpected": msg})
            return
        if "method" in msg and "id" not in msg:
            self._route_notification(msg)
            return
        with self._lock:
            req = self._requests.get(_int_id(msg.get("id")))
        if req is None:
            self._unrouted.put(msg)
        else:
            req._finish(msg)

    def _route_notification(self, msg):
        params = msg.get("params")
        if msg["method"] == "event":
            with self._events_cond:
                self.events.append(params)
                self._events_cond.notify_all()
            return
        req_id = params.get("id") if isinstance(params, dict) else None
        with self._lock:
            req = self._requests.get(_int_id(req_id))
        if req is None:
            self.stray.append(msg)
        else:
            req._add_notification(msg)

    def _drain_stderr(self):
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            with self._stderr_lock:
                self._stderr += chunk
                if len(self._stderr) > STDERR_KEEP:
                    del self._stderr[:len(self._stderr) - STDERR_KEEP]

    # -- diagnostics ---------------------------------------------------------------------------

    def stderr_text(self) -> str:
        with self._stderr_lock:
            return self._stderr.decode("utf-8", "replace")

    def stderr_tail(self, n=3000) -> str:
        return self.stderr_text()[-n:]

    def _tail_note(self):
        tail = self.stderr_tail()
        return f"\n--- server stderr (tail) ---\n{tail}" if tail else "\n(server stderr empty)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- sending -------------------------------------------------------------------------------

    def send_raw(self, line: bytes):
        """Write bytes as one line (a newline is added when missing)."""
        if not line.endswith(b"\n"):
            line += b"\n"
        with self._write_lock:
            try:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError) as e:
                raise ConnectionError(f"server stdin closed: {e}{self._tail_note()}") from None

    def _send(self, obj):
        self.send_raw(json.dumps(obj, separators=(",", ":")).encode())

    def start(self, method, params=None) -> Request:
        """Send a request and return its handle without waiting."""
        with self._lock:
            req = Request(self, next(self._ids), method)
            self._requests[req.id] = req
        msg = {"jsonrpc": "2.0", "method": method, "id": req.id}
        if params is not None:
            msg["params"] = params
        self._send(msg)
        return req

    def call(self, method, params=None, timeout=DEFAULT_TIMEOUT):
        """Send a request and wait for its result (RpcError for an error response)."""
        return self.start(method, params).result(timeout)

    def notify(self, method, params=None):
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self._send(msg)

    def cancel(self, req, timeout=DEFAULT_TIMEOUT):
        """`cancel` for a Request or a bare id; returns the result ({"cancelled": bool})."""
        req_id = req.id if isinstance(req, Request) else req
        return self.call("cancel", {"id": req_id}, timeout=timeout)

    # -- unrouted input and events -------------------------------------------------------------

    def wait_unrouted(self, timeout=10.0):
        """The next response that carried no id (or an id of no request of ours)."""
        try:
            return self._unrouted.get(timeout=timeout)
        except queue.Empty:
            raise RpcTimeout(f"no id-less response within {timeout}s{self._tail_note()}") from None

    def wait_event(self, pred, timeout=DEFAULT_TIMEOUT):
        """The first collected `event` whose params satisfy pred."""
        deadline = time.monotonic() + timeout
        with self._events_cond:
            while True:
                hit = next((e for e in self.events if pred(e)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0 or self._eof.is_set():
                    raise RpcTimeout(f"no matching event within {timeout}s; got "
                                     f"{_short(self.events)}{self._tail_note()}")
                self._events_cond.wait(min(left, 0.5))

    # -- ending --------------------------------------------------------------------------------

    def close(self, timeout_seconds=2.0, wait=120.0):
        """`close {timeout_seconds}`, then stdin EOF and a bounded wait for the process to exit
        (SIGKILL if it does not). Returns close's result; re-raises its RpcError after the
        process is gone."""
        try:
            return self.call("close", {"timeout_seconds": timeout_seconds}, timeout=wait)
        finally:
            self.close_stdin()
            try:
                self.wait_exit(wait)
            except RpcTimeout:
                self.kill()
                raise

    def close_stdin(self):
        with self._write_lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait_exit(self, timeout=60.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RpcTimeout(f"server still running {timeout}s later{self._tail_note()}") from None
        self._reader.join(timeout=10)
        self._drainer.join(timeout=10)
        return code

    def kill(self) -> int:
        """SIGKILL the server process and reap it."""
        if self.alive():
            self.proc.kill()
        return self.wait_exit(30)


def _int_id(value):
    """Our ids are positive integers; anything else (None, null, strings, lists) routes nowhere."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _short(obj, limit=600):
    text = json.dumps(obj, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
