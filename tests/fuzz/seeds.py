#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed inputs of the fuzz targets into tests/fuzz/corpus/<target>/seed-*.

The seeds are committed; this script documents how each was made and regenerates them (run it
from the repository root after changing a target's input format). Regression inputs of crashes
(regress-*) are committed by hand next to them and never touched here.
"""
import gzip
import io
import json
import pathlib
import ssl
import struct
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests/fuzz/corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


# ---- guest protocol ------------------------------------------------------------------------
def frame(ftype, stream, payload=b"", flags=0):
    return struct.pack(">BBHII", ftype, flags, 0, stream, len(payload)) + payload


HELLO = frame(1, 0, struct.pack(">HHII", 1, 0, 65536, 65536) + b"matchlock-guest")


def guestproto():
    exec_start = json.dumps({"argv": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "cwd": "/",
                             "user": "1000:1000", "tty": True, "rows": 40, "cols": 120,
                             "kill_grace_seconds": 3}).encode()
    stream = (HELLO + frame(2, 1, struct.pack(">I", 5000)) + frame(3, 1, b"data")
              + frame(4, 1, struct.pack(">I", 4096)) + frame(5, 1)
              + frame(6, 3, struct.pack(">I", 1) + b"reset") + frame(7, 0, struct.pack(">Q", 42))
              + frame(8, 0, struct.pack(">Q", 42)) + frame(9, 0, struct.pack(">I", 0) + b"bye"))
    write("guestproto_frames", "all-types", b"\x10" + stream)
    write("guestproto_frames", "one-byte-pieces", b"\x00" + HELLO + frame(3, 1, b"x" * 300))
    # Mux: mode 0 (host, Hello already in), then ops. Op 5+ feeds n*(op>>3 + 1) peer bytes.
    def peer(data):
        out = b""
        while data:
            piece = data[:255]
            out += bytes([5, len(piece)]) + piece
            data = data[255:]
        return out
    ops = (peer(frame(2, 1, struct.pack(">I", 5000)) + frame(3, 1, exec_start))
           + bytes([0, 4]) + b"pong" + bytes([1, 8]) + bytes([2, 0])
           + peer(frame(4, 1, struct.pack(">I", 100000)) + frame(5, 1))
           + bytes([4, 0]) + peer(frame(6, 1, struct.pack(">I", 2) + b"gone"))
           + peer(frame(7, 0, struct.pack(">Q", 7)) + frame(9, 0, struct.pack(">I", 1) + b"bye")))
    write("guestproto_mux", "open-data-close", b"\x00" + ops)
    write("guestproto_mux", "guest-role", b"\x03" + peer(HELLO + frame(2, 2, struct.pack(">I", 5001))))
    # Exec messages and payloads.
    msgs = b"".join(struct.pack(">BI", k, len(p)) + p for k, p in [
        (1, exec_start), (3, b"stdin"), (4, b""), (7, struct.pack(">HH", 50, 132)),
        (8, struct.pack(">I", 15)), (9, b'{"code":0,"signal":0,"error":""}')])
    write("guestproto_exec", "stream", msgs)
    write("guestproto_exec", "start", exec_start)
    write("guestproto_exec", "exit", b'{"code":137,"signal":9,"error":""}')
    write("guestproto_exec", "resize", struct.pack(">HH", 24, 80))


# ---- net -----------------------------------------------------------------------------------
PLACEHOLDER = "SANDBOX_SECRET_0123456789abcdef0123456789abcdef"


def http():
    reqs = {
        "get": "GET /v1/models?x=1 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/7.88\r\n"
               "Accept: */*\r\n\r\n",
        "secret-header": f"POST /v1/chat HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer "
                         f"{PLACEHOLDER}\r\nContent-Length: 5\r\n\r\nhello",
        "secret-query": f"GET /search?key={PLACEHOLDER}&q=a HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        "chunked": "POST /upload HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n",
        "absolute": "GET http://user@a.example:8080/x?q HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
        "smuggle": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    }
    for name, text in reqs.items():
        write("http", "req-" + name, b"\x02" + text.encode())
        write("http", "req-" + name + "-evil", b"\x00" + text.encode())
    resps = {
        "ok": "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
        "chunked": "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "close": "HTTP/1.0 404 Not Found\r\nConnection: close\r\n\r\nmissing",
        "no-content": "HTTP/1.1 204 No Content\r\n\r\n",
    }
    for name, text in resps.items():
        write("http", "resp-" + name, b"\x05" + text.encode())


def client_hello(server_name, alpn):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tls():
    write("tls_client_hello", "h2", client_hello("api.example.com", ["h2", "http/1.1"]))
    write("tls_client_hello", "http11", client_hello("a.example", ["http/1.1"]))
    write("tls_client_hello", "no-alpn", client_hello("x-y_z.example.org", None))
    name = b"api.example.com"
    sni = struct.pack(">HBH", len(name) + 3, 0, len(name)) + name
    write("tls_client_hello", "ext-sni", b"\xff" + sni)
    write("tls_client_hello", "ext-alpn", b"\xff" + b"\x00\x0c\x02h2\x08http/1.1")


def dns_name(name):
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"


def dns():
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + dns_name("api.example.com") + \
        struct.pack(">HH", 1, 1)
    write("dns", "query-a", q)
    write("dns", "query-aaaa", q[:-4] + struct.pack(">HH", 28, 1))
    answers = (b"\xc0\x0c" + struct.pack(">HHIH", 5, 1, 60, 6) + b"\x03www\xc0\x10"
               + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + bytes([192, 0, 2, 7])
               + b"\xc0\x0c" + struct.pack(">HHIH", 28, 1, 30, 16) + bytes(15) + b"\x01")
    resp = struct.pack(">HHHHHH", 0x1234, 0x8180, 1, 3, 0, 0) + q[12:] + answers
    write("dns", "response", resp)


# ---- spec and rpc --------------------------------------------------------------------------
def spec():
    formats = {".toml": b"\x00", ".yaml": b"\x01", ".yml": b"\x01", ".json": b"\x02"}
    sources = sorted((ROOT / "tests/data/spec").rglob("*")) + \
        sorted((ROOT / "examples/sandboxes").rglob("*"))
    for f in sources:
        if f.is_file() and f.suffix in formats and f.stat().st_size <= 4000:
            rel = f.relative_to(ROOT).as_posix().replace("/", "_")
            write("spec", rel, formats[f.suffix] + f.read_bytes())


def rpc():
    create = {"image": "busybox:latest", "privileged": False,
              "resources": {"cpus": 2, "memory_mb": 512, "disk_size_mb": 1024, "timeout_seconds": 60},
              "network": {"allowed_hosts": ["api.example.com", "*.example.org"],
                          "block_private_ips": True,
                          "secrets": {"TOKEN": {"value": "real-secret-value-1234",
                                                "hosts": ["api.example.com"]}}},
              "vfs": {"workspace": "/workspace",
                      "mounts": {"/workspace": {"type": "memory"},
                                 "/data": {"type": "host_fs", "host_path": "/tmp", "readonly": True}}},
              "image_config": {"user": "1000", "working_dir": "/w", "entrypoint": ["sh"],
                               "cmd": ["-c", "true"], "env": {"A": "1"}},
              "env": {"B": "2"}, "keep_on_disconnect": False, "launch_entrypoint": True}
    lines = {
        "create": {"jsonrpc": "2.0", "id": 1, "method": "create", "params": create},
        "create-min": {"jsonrpc": "2.0", "id": 2, "method": "create", "params": {"image": "alpine"}},
        "exec": {"jsonrpc": "2.0", "id": 3, "method": "exec",
                 "params": {"command": "echo hi", "working_dir": "/", "user": "root"}},
        "write": {"jsonrpc": "2.0", "id": "w", "method": "write_file",
                  "params": {"path": "/tmp/x", "content": "aGk=", "mode": 420}},
        "notify": {"jsonrpc": "2.0", "method": "exec_pipe.stdin", "params": {"id": 3, "data": "aGk="}},
    }
    for name, obj in lines.items():
        write("rpc", name, json.dumps(obj))


# ---- images --------------------------------------------------------------------------------
DIGEST = "sha256:" + "ab" * 32


def image_manifest():
    write("image_manifest", "manifest", json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST,
                   "size": 1234},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": DIGEST,
                    "size": 99}]}))
    write("image_manifest", "index", json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST,
                       "size": 500, "platform": {"architecture": "amd64", "os": "linux"}},
                      {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST,
                       "size": 500,
                       "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}]}))
    write("image_manifest", "config", json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"User": "1000:1000", "WorkingDir": "/app", "Entrypoint": ["/bin/sh"],
                   "Cmd": ["-c", "true"], "Env": ["PATH=/usr/bin", "A=1"],
                   "ExposedPorts": {"80/tcp": {}}, "Labels": {"a": "b"}},
        "rootfs": {"type": "layers", "diff_ids": [DIGEST]}}))
    for i, ref in enumerate(["busybox", "library/busybox:1.36", "127.0.0.1:5000/a/b:c",
                             "localhost/x@" + DIGEST, "linux/amd64", "linux/arm64/v8"]):
        write("image_manifest", f"ref-{i}", ref)


def tar_bytes(entries, compress=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.type = e.get("type", tarfile.REGTYPE)
            info.mode = e.get("mode", 0o644)
            info.uid = e.get("uid", 0)
            info.gid = e.get("gid", 0)
            info.linkname = e.get("link", "")
            if "pax" in e:
                info.pax_headers = e["pax"]
            data = e.get("data", b"")
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def image_layers():
    lower = tar_bytes([
        {"name": "etc", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "etc/passwd", "data": b"root:x:0:0::/root:/bin/sh\n"},
        {"name": "bin", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "bin/sh", "data": b"\x7fELF", "mode": 0o4755},
        {"name": "bin/ash", "type": tarfile.LNKTYPE, "link": "bin/sh"},
        {"name": "bin/link", "type": tarfile.SYMTYPE, "link": "/etc"},
        {"name": "dev", "type": tarfile.DIRTYPE},
        {"name": "dev/null", "type": tarfile.CHRTYPE, "mode": 0o666},
        {"name": "opt", "type": tarfile.DIRTYPE},
        {"name": "opt/old", "data": b"old"},
        {"name": "x", "data": b"xattr", "pax": {"SCHILY.xattr.user.k": "v"}},
    ])
    upper = tar_bytes([
        {"name": "etc/.wh.passwd"},
        {"name": "opt/.wh..wh..opq"},
        {"name": "opt/new", "data": b"new"},
        {"name": "./etc/hosts", "data": b"127.0.0.1 localhost\n"},
    ])
    write("image_layers", "one-layer", b"\x00\x00" + lower)
    write("image_layers", "gzip", b"\x00\x00" + tar_bytes([{"name": "a", "data": b"b"}], True))
    write("image_layers", "two-layers", struct.pack(">H", len(lower)) + lower + upper)
    write("image_layers", "escape", b"\x00\x00" + tar_bytes([
        {"name": "../evil", "data": b"x"}, {"name": "/abs", "data": b"x"},
        {"name": "l", "type": tarfile.SYMTYPE, "link": "/"}, {"name": "l/etc/x", "data": b"x"},
        {"name": "h", "type": tarfile.LNKTYPE, "link": "../../etc/shadow"}]))


# ---- vfs -----------------------------------------------------------------------------------
LOOKUP, GETATTR, SETATTR, READLINK, SYMLINK, MKDIR, UNLINK, RENAME, LINK, OPEN, READ, WRITE = (
    1, 3, 4, 5, 6, 9, 10, 12, 13, 14, 15, 16)
RELEASE, GETXATTR, LISTXATTR, OPENDIR, READDIR, CREATE, READDIRPLUS, RENAME2 = (
    18, 22, 23, 27, 28, 35, 44, 45)


def rec(opcode, node, body=b"", fh=0):
    return bytes([opcode, node, fh, len(body)]) + body


def read_in(size=4096, offset=0):
    return struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0)


def vfs_fuse():
    # Node list: [root]; each successful LOOKUP/CREATE/MKDIR/SYMLINK/LINK appends.
    # Handles: [0]; each OPEN/OPENDIR/CREATE appends; fh pick k>0 uses handles[(k-1) % n].
    ro = (rec(LOOKUP, 0, b"ro\0") + rec(LOOKUP, 1, b"hello\0") + rec(OPEN, 2, struct.pack("<II", 0, 0))
          + rec(READ, 2, read_in(), fh=2) + rec(RELEASE, 2, struct.pack("<QIIQ", 0, 0, 0, 0), fh=2)
          + rec(LOOKUP, 1, b"up\0") + rec(READLINK, 3) + rec(LOOKUP, 3, b"secret\0")
          + rec(LOOKUP, 1, b"abs\0") + rec(GETATTR, 4, bytes(16))
          + rec(OPENDIR, 1, struct.pack("<II", 0, 0)) + rec(READDIRPLUS, 1, read_in(), fh=3)
          + rec(LOOKUP, 1, b"..\0") + rec(LOOKUP, 0, b"..\0"))
    write("vfs_fuse", "read-only-mount", b"\x00" + ro)
    rw = (rec(LOOKUP, 0, b"rw\0") + rec(LOOKUP, 1, b"up\0")
          + rec(CREATE, 1, struct.pack("<IIII", 0o102, 0o100644, 0, 0) + b"f\0")
          + rec(WRITE, 3, struct.pack("<QQIIQII", 0, 0, 5, 0, 0, 0, 0) + b"hello", fh=2)
          + rec(MKDIR, 1, struct.pack("<II", 0o755, 0) + b"d\0")
          + rec(RENAME, 1, struct.pack("<Q", 1) + b"f\0g\0")
          + rec(SYMLINK, 1, b"s\0../outside/secret\0") + rec(LINK, 1, struct.pack("<Q", 3) + b"h\0")
          + rec(OPEN, 2, struct.pack("<II", 0o1001, 0)) + rec(UNLINK, 1, b"g\0")
          + rec(LOOKUP, 1, b"abs\0") + rec(OPEN, 7, struct.pack("<II", 0o1001, 0))
          + rec(SETATTR, 7, bytes(88)) + rec(LISTXATTR, 1, struct.pack("<II", 256, 0)))
    write("vfs_fuse", "writable-mount", b"\x00" + rw)
    mem = (rec(MKDIR, 0, struct.pack("<II", 0o755, 0) + b"m\0")
           + rec(CREATE, 1, struct.pack("<IIII", 0o102, 0o100600, 0, 0) + b"a\0")
           + rec(WRITE, 2, struct.pack("<QQIIQII", 0, 10, 3, 0, 0, 0, 0) + b"abc", fh=2)
           + rec(READ, 2, read_in(64), fh=2) + rec(RENAME2, 1, struct.pack("<QII", 1, 0, 0) + b"a\0b\0")
           + rec(OPENDIR, 0, struct.pack("<II", 0, 0)) + rec(READDIR, 0, read_in(), fh=3))
    write("vfs_fuse", "memory-mount", b"\x00" + mem)
    hdr = struct.pack("<IIQQIIII", 40 + 3, LOOKUP, 9, 1, 0, 0, 0, 0) + b"ro\0"
    write("vfs_fuse", "raw-stream", b"\x01" + hdr + hdr)


def virtqueue():
    # Guest memory image at guest-physical 0x10000: descriptor table at 0, available ring at
    # 0x800, used ring at 0xa00, buffers from 0x1000. Header: size exponent, base index (u16 BE).
    base = 0x10000
    def ring(chains, qexp=3, extra=b""):
        mem = bytearray(0x2000)
        descs = []
        heads = []
        for chain in chains:
            heads.append(len(descs))
            for i, (off, length, writable) in enumerate(chain):
                flags = (1 if i + 1 < len(chain) else 0) | (2 if writable else 0)
                descs.append((base + off, length, flags, len(descs) + 1 if i + 1 < len(chain) else 0))
        for i, d in enumerate(descs):
            mem[16 * i:16 * i + 16] = struct.pack("<QIHH", *d)
        mem[0x800:0x804] = struct.pack("<HH", 0, len(heads))
        for i, h in enumerate(heads):
            mem[0x804 + 2 * i:0x806 + 2 * i] = struct.pack("<H", h)
        mem[0x1000:0x1000 + len(extra)] = extra
        return bytes([qexp, 0, 0]) + bytes(mem)
    fuse_req = struct.pack("<IIQQIIII", 43, 1, 1, 1, 0, 0, 0, 0) + b"ro\0"
    write("virtqueue", "two-chains", ring([[(0x1000, len(fuse_req), False), (0x1100, 256, True)],
                                           [(0x1200, 16, False), (0x1210, 24, False),
                                            (0x1300, 4, True), (0x1304, 200, True)]], 3, fuse_req))
    write("virtqueue", "chain-of-two", ring([[(0x1000, 8, False), (0x1008, 8, False)]], 1))
    write("virtqueue", "outside", ring([[(0x100000, 8, False), (0x1100, 64, True)]], 2))
    write("virtqueue", "write-then-read", ring([[(0x1100, 64, True), (0x1000, 8, False)]], 2))


def main():
    guestproto()
    http()
    tls()
    dns()
    spec()
    rpc()
    image_manifest()
    image_layers()
    vfs_fuse()
    virtqueue()


if __name__ == "__main__":
    main()
