#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes a newc initramfs holding /init (a given binary) and /dev/console, without root.

Test helper for booting the guest kernel; the product assembles its initramfs in C++ (VM runtime).
Usage: mkinitramfs.py INIT_BINARY OUT.cpio
"""
import stat
import sys


def entry(name: str, mode: int, data: bytes = b"", rdev=(0, 0), ino=[0]) -> bytes:
    ino[0] += 1
    name_b = name.encode() + b"\0"
    fields = [ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = header + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def main() -> int:
    init, dest = sys.argv[1], sys.argv[2]
    with open(init, "rb") as f:
        init_data = f.read()
    blob = b"".join([
        entry("dev", stat.S_IFDIR | 0o755),
        entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        entry("init", stat.S_IFREG | 0o755, init_data),
        entry("TRAILER!!!", 0),
    ])
    blob += b"\0" * (-len(blob) % 512)
    with open(dest, "wb") as f:
        f.write(blob)
    return 0


if __name__ == "__main__":
    sys.exit(main())
