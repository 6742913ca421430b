#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes a newc initramfs without root: /init (a given binary), /dev/console, and optionally a
static busybox with its applet links plus minimal /etc files, for booting the guest kernel in
tests. The product assembles its own initramfs in C++ (VM runtime).

Usage: mkinitramfs.py INIT_BINARY OUT.cpio [--busybox PATH]
"""
import argparse
import stat
import subprocess

ino = [0]


def entry(name: str, mode: int, data: bytes = b"", rdev=(0, 0), uid=0, gid=0) -> bytes:
    ino[0] += 1
    name_b = name.encode() + b"\0"
    fields = [ino[0], mode, uid, gid, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = header + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("init")
    ap.add_argument("out")
    ap.add_argument("--busybox")
    args = ap.parse_args()
    with open(args.init, "rb") as f:
        init_data = f.read()
    parts = [entry("dev", stat.S_IFDIR | 0o755),
             entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
             entry("init", stat.S_IFREG | 0o755, init_data)]
    if args.busybox:
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc",
                  "sys", "run"):
            parts.append(entry(d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755)))
        with open(args.busybox, "rb") as f:
            parts.append(entry("bin/busybox", stat.S_IFREG | 0o755, f.read()))
        applets = subprocess.run([args.busybox, "--list-full"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for path in applets:
            if path != "bin/busybox":
                parts.append(entry(path, stat.S_IFLNK | 0o777, b"/bin/busybox"))
        parts.append(entry("etc/passwd", stat.S_IFREG | 0o644,
                           b"root:x:0:0:root:/root:/bin/sh\n"
                           b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"))
        parts.append(entry("etc/group", stat.S_IFREG | 0o644, b"root:x:0:\nnogroup:x:65534:\n"))
    parts.append(entry("TRAILER!!!", 0))
    blob = b"".join(parts)
    blob += b"\0" * (-len(blob) % 512)
    with open(args.out, "wb") as f:
        f.write(blob)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
