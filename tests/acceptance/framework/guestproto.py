# SPDX-License-Identifier: Apache-2.0
"""An independent Python client of the host<->guest protocol (schema/guest-protocol.v1.md).

Used by the acceptance tests to drive matchlock-guest directly, over a socketpair or a QEMU
virtio-serial socket. Written from the spec document, not from the C++ code, so the two
implementations check each other. Every wait is bounded.
"""
import json
import socket
import struct
import time

HELLO, OPEN, DATA, WINDOW, CLOSE, RESET, PING, PONG, GOAWAY = range(1, 10)
PORT_EXEC, PORT_VFS, PORT_READY = 5000, 5001, 5002
START, STARTED, STDIN, STDIN_EOF, STDOUT, STDERR, RESIZE, SIGNAL, EXIT = range(1, 10)
MAX_PAYLOAD = 65536


class ProtocolError(Exception):
    pass


class Stream:
    def __init__(self, sid, port, credit):
        self.id = sid
        self.port = port
        self.credit = credit
        self.data = bytearray()      # raw received stream data not yet parsed
        self.received = 0            # bytes received and not yet granted back
        self.remote_closed = False
        self.reset = None
        self.messages = []           # parsed exec messages (kind, payload)


class Client:
    """Host side: odd stream ids, our receive window per stream."""

    def __init__(self, sock: socket.socket, window=256 * 1024, grant=True):
        self.sock = sock
        self.window = window
        self.grant = grant           # False: never grant credit (tests the guest's backpressure)
        self.buf = b""
        self.streams = {}
        self.next_id = 1
        self.peer_window = None
        self.peer_agent = None
        self.guest_opened = []       # streams the guest opened (e.g. ready)

    # --- frames -----------------------------------------------------------------------------
    def send_frame(self, ftype, sid, payload=b""):
        assert len(payload) <= MAX_PAYLOAD
        self.sock.sendall(struct.pack(">BBHII", ftype, 0, 0, sid, len(payload)) + payload)

    def _read_frame(self, deadline):
        while len(self.buf) < 12 or len(self.buf) < 12 + struct.unpack(">I", self.buf[8:12])[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the guest in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout as e:
                raise TimeoutError("no frame from the guest in time") from e
            if not chunk:
                raise ConnectionError("guest closed the channel")
            self.buf += chunk
        ftype, flags, reserved, sid, length = struct.unpack(">BBHII", self.buf[:12])
        payload = self.buf[12:12 + length]
        self.buf = self.buf[12 + length:]
        if flags or reserved or not 1 <= ftype <= 9:
            raise ProtocolError(f"bad frame header {ftype} {flags} {reserved}")
        return ftype, sid, payload

    def handshake(self, timeout=30):
        self.send_frame(HELLO, 0, struct.pack(">HHII", 1, 0, MAX_PAYLOAD, self.window) +
                        b"pytest")
        deadline = time.monotonic() + timeout
        while self.peer_window is None:
            self._dispatch(*self._read_frame(deadline))

    def _dispatch(self, ftype, sid, payload):
        if ftype == HELLO:
            major, minor, max_payload, window = struct.unpack(">HHII", payload[:12])
            if major != 1:
                raise ProtocolError(f"guest speaks {major}.{minor}")
            self.peer_window = window
            self.peer_agent = payload[12:].decode()
        elif ftype == OPEN:
            (port,) = struct.unpack(">I", payload)
            self.streams[sid] = Stream(sid, port, self.peer_window)
            self.guest_opened.append(sid)
        elif ftype == DATA:
            s = self.streams[sid]
            s.data += payload
            s.received += len(payload)
            if s.received > self.window:
                raise ProtocolError("guest exceeded our window")
            self._parse(s)
        elif ftype == WINDOW:
            if sid in self.streams:
                self.streams[sid].credit += struct.unpack(">I", payload)[0]
        elif ftype == CLOSE:
            self.streams[sid].remote_closed = True
        elif ftype == RESET:
            if sid in self.streams:
                self.streams[sid].reset = struct.unpack(">I", payload[:4])[0]
        elif ftype == PING:
            self.send_frame(PONG, 0, payload)
        elif ftype == GOAWAY:
            raise ProtocolError("guest sent GoAway: " + payload[4:].decode(errors="replace"))

    def _parse(self, s):
        if s.port != PORT_EXEC:
            return
        while len(s.data) >= 5:
            kind, length = struct.unpack(">BI", bytes(s.data[:5]))
            if len(s.data) < 5 + length:
                break
            s.messages.append((kind, bytes(s.data[5:5 + length])))
            del s.data[:5 + length]

    def consume(self, s, n):
        """The application processed n bytes of stream s: grant them back."""
        if self.grant and n:
            s.received -= n
            self.send_frame(WINDOW, s.id, struct.pack(">I", n))

    def pump(self, deadline, until):
        while not until():
            self._dispatch(*self._read_frame(deadline))

    # --- streams ----------------------------------------------------------------------------
    def open(self, port):
        sid = self.next_id
        self.next_id += 2
        self.streams[sid] = Stream(sid, port, self.peer_window)
        self.send_frame(OPEN, sid, struct.pack(">I", port))
        return self.streams[sid]

    def send(self, s, data, deadline, progress=None):
        """Sends stream data within the guest's credit, waiting for Window frames. `progress` runs
        while waiting, so that a caller can keep consuming what arrives (a client that stops
        reading while it writes deadlocks against flow control, as it should)."""
        data = memoryview(data)

        def can_send():
            if progress:
                progress()
            return s.credit > 0 or s.reset is not None

        while data:
            if s.credit == 0:
                self.pump(deadline, can_send)
                if s.reset is not None:
                    raise ConnectionError(f"stream {s.id} reset ({s.reset})")
            n = min(len(data), s.credit, MAX_PAYLOAD)
            self.send_frame(DATA, s.id, bytes(data[:n]))
            s.credit -= n
            data = data[n:]

    def ready(self, timeout=30):
        """Waits for the guest's readiness stream (port 5002) and returns its JSON."""
        deadline = time.monotonic() + timeout
        self.pump(deadline, lambda: any(self.streams[i].port == PORT_READY and
                                        self.streams[i].remote_closed
                                        for i in self.guest_opened))
        sid = next(i for i in self.guest_opened if self.streams[i].port == PORT_READY)
        s = self.streams[sid]
        self.consume(s, len(s.data))
        self.send_frame(CLOSE, sid)
        return json.loads(bytes(s.data))

    def shutdown(self):
        s = self.open(PORT_READY)
        self.send_frame(DATA, s.id, b'{"op": "shutdown"}')
        self.send_frame(CLOSE, s.id)


def exec_message(kind, payload=b""):
    return struct.pack(">BI", kind, len(payload)) + payload


class Exec:
    """One process: start it, feed stdin, collect output and the exit."""

    def __init__(self, client, argv, env=None, cwd="", user="", tty=False, rows=24, cols=80):
        self.c = client
        self.s = client.open(PORT_EXEC)
        req = {"argv": argv, "env": env or {}, "cwd": cwd, "user": user, "tty": tty,
               "rows": rows, "cols": cols, "kill_grace_seconds": 2}
        self.deadline = time.monotonic() + 60
        client.send(self.s, exec_message(START, json.dumps(req).encode()), self.deadline)
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit = None
        self.pid = None
        self.events = []

    def stdin(self, data: bytes, eof=True):
        for i in range(0, len(data), 32 * 1024):
            self.c.send(self.s, exec_message(STDIN, data[i:i + 32 * 1024]), self.deadline,
                        self.drain)
        if eof:
            self.c.send(self.s, exec_message(STDIN_EOF), self.deadline, self.drain)

    def control(self, kind, payload):
        self.c.send(self.s, exec_message(kind, payload), self.deadline)

    def drain(self):
        """Moves parsed messages into stdout/stderr/exit and grants their bytes back."""
        for kind, payload in self.s.messages:
            self.events.append(kind)
            if kind == STDOUT:
                self.stdout += payload
            elif kind == STDERR:
                self.stderr += payload
            elif kind == STARTED:
                self.pid = json.loads(payload)["pid"]
            elif kind == EXIT:
                self.exit = json.loads(payload)
            self.c.consume(self.s, 5 + len(payload))
        self.s.messages.clear()

    def wait(self, timeout=60):
        deadline = time.monotonic() + timeout

        def finished():
            self.drain()
            return self.exit is not None and self.s.remote_closed

        self.c.pump(deadline, finished)
        return self.exit
