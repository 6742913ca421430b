#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# `exec` round trip over `matchlock rpc` against `matchlock exec` on the same running VM, side by
# side (root): one busybox sandbox without a network created over RPC; N `exec {"command":
# "true"}` calls timed at the client (each a full request -> guest fork+exec -> response), then N
# `matchlock exec ID -- true` processes. Prints medians and the ratio. Never a test: numbers move
# with machine load.
#   bench/rpc.sh [N]   (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
n=${1:-100}
ml=${MATCHLOCK_BIN:-build/matchlock}
tmp=$(mktemp -d)
export MATCHLOCK_HOME="$tmp/home"
trap 'rm -rf "$tmp"' EXIT
import_busybox "$ml"

/usr/bin/python3 - "$ml" "$n" <<'PY'
import statistics, subprocess, sys, time
sys.path.insert(0, "tests/acceptance")
from framework.rpc_client import RpcClient

ml, n = sys.argv[1], int(sys.argv[2])
with RpcClient(ml) as c:
    sid = c.call("create", {"image": "busybox:latest", "resources": {"memory_mb": 256},
                            "network": {"no_network": True}}, timeout=300)["id"]
    for _ in range(5):
        c.call("exec", {"command": "true"})
    rpc = []
    for _ in range(n):
        t = time.perf_counter()
        assert c.call("exec", {"command": "true"})["exit_code"] == 0
        rpc.append((time.perf_counter() - t) * 1000)
    cli = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([ml, "exec", sid, "--", "sh", "-c", "true"], check=True,
                       stdout=subprocess.DEVNULL)
        cli.append((time.perf_counter() - t) * 1000)
    c.close(timeout_seconds=0)
    subprocess.run([ml, "rm", sid], check=True, stdout=subprocess.DEVNULL)
r, m = statistics.median(rpc), statistics.median(cli)
print(f"matchlock exec (baseline), median of {n}   {m:9.1f} ms")
print(f"RPC exec round trip, median of {n}         {r:9.1f} ms   (p90 {sorted(rpc)[int(n*0.9)-1]:.1f})")
print(f"RPC / matchlock exec:                      {r / m:9.3f}")
PY
