#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Time to pull the agent test image from a loopback registry and build its rootfs disk.

  bench/image_pull.py [--binary build/matchlock] [--runs 3]

Starts Debian's docker-registry on 127.0.0.1 (plain HTTP), pushes the cached agent fixture
(tests/fixtures/build_images.py; built on first use, ~1 min of debootstrap), then measures:
  cold   empty cache: manifest + blobs + rootfs build (`matchlock pull`)
  split  empty cache: `pull --no-rootfs`, then `image rootfs` (download vs. ext4 build)
  warm   everything cached: `matchlock pull` again (manifest round trip only)
Prints medians; never asserts on timings.
"""
import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import registry  # noqa: E402


def timed(args, env):
    t0 = time.monotonic()
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {p.stderr}")
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "build" / "matchlock"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    fixture = pathlib.Path(subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fixtures" / "build_images.py"), "agent"],
        check=True, capture_output=True, text=True).stdout.strip())
    work = pathlib.Path(tempfile.mkdtemp(prefix="ml-bench-"))
    reg = registry.Registry(work / "registry").start()
    try:
        reg.push(fixture / "agent-oci", "bench/agent")
        ref = f"{reg.host}/bench/agent:latest"
        base = dict(os.environ, DOCKER_CONFIG=str(work / "docker"))
        cold, pull_only, build_only, warm = [], [], [], []
        for i in range(args.runs):
            env = dict(base, XDG_CACHE_HOME=str(work / f"cold{i}"))
            cold.append(timed([args.binary, "pull", "-q", "--insecure", ref], env))
            warm.append(timed([args.binary, "pull", "-q", "--insecure", ref], env))
            env = dict(base, XDG_CACHE_HOME=str(work / f"split{i}"))
            pull_only.append(timed([args.binary, "pull", "-q", "--no-rootfs", "--insecure", ref],
                                   env))
            build_only.append(timed([args.binary, "image", "rootfs", ref], env))
        size = sum(p.stat().st_size for p in (fixture / "agent-oci" / "blobs" / "sha256").iterdir())
        med = statistics.median
        print(f"agent image: {size / 1e6:.1f} MB of blobs, {args.runs} runs, medians")
        print(f"  cold pull + rootfs : {med(cold):6.2f} s")
        print(f"    download only    : {med(pull_only):6.2f} s")
        print(f"    rootfs build only: {med(build_only):6.2f} s")
        print(f"  warm pull          : {med(warm):6.2f} s")
        print(f"  cold/warm ratio    : {med(cold) / max(med(warm), 1e-6):6.1f}x")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
