#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# A published port against a direct connection to the same guest server, side by side (root):
# one agent-image sandbox without a network, an echo server in the guest on 127.0.0.1:9000,
# published on the host's 127.0.0.1:PORT. The direct path is the same client run inside the guest
# against 127.0.0.1:9000 (a sealed sandbox has no inbound path to compare with: its namespace
# sends every guest TCP flow to the proxy); the forwarded path goes host listener -> supervisor ->
# guest channel -> agent -> guest 127.0.0.1:9000. Prints echo throughput (MiB each way, one
# connection), connect+1-byte-echo latency, and the ratios. Never a test: numbers move with load.
# No traffic leaves the machine (loopback only).
#   bench/ports.sh [MIB] [N]   (defaults 64, 200)
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-64}
n=${2:-200}
ml=${MATCHLOCK_BIN:-build/matchlock}
tmp=$(mktemp -d)
export MATCHLOCK_HOME="$tmp/home"
id=
cleanup() {
  [ -n "$id" ] && "$ml" rm -f "$id" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
agent=$(/usr/bin/python3 tests/fixtures/build_images.py agent | tail -1)
tar -C "$agent/agent-oci" -cf - . | "$ml" image import agent:latest >/dev/null

port=$((30000 + $$ % 10000))
id=$("$ml" run -d --no-network --image agent:latest --memory 512 -p "$port:9000" 2>/dev/null | tail -1)
tools=tests/acceptance/framework/port_tools.py
"$ml" cp "$tools" "$id:/tmp/port_tools.py"
"$ml" exec "$id" -- sh -c 'setsid -f python3 /tmp/port_tools.py serve 9000 >/dev/null 2>&1 </dev/null'
python3 "$tools" wait "$port" 60

direct() { "$ml" exec "$id" -- python3 /tmp/port_tools.py "$@"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
d_tp=$(direct client 9000 "$mib" 1)
f_tp=$(python3 "$tools" client "$port" "$mib" 1)
d_lat=$(direct latency 9000 "$n")
f_lat=$(python3 "$tools" latency "$port" "$n")
f_many=$(python3 "$tools" client "$port" 1 64)

printf 'echo throughput, %s MiB each way, direct (baseline) %8s MiB/s\n' "$mib" "$(field "$d_tp" mib_per_s)"
printf 'echo throughput, %s MiB each way, forwarded         %8s MiB/s\n' "$mib" "$(field "$f_tp" mib_per_s)"
printf 'forwarded / direct throughput:                      %8s\n' "$(python3 -c "print(f'{$(field "$f_tp" mib_per_s) / $(field "$d_tp" mib_per_s):.3f}')")"
printf 'connect + 1-byte echo, direct (baseline), median  %8s ms\n' "$(field "$d_lat" median_ms)"
printf 'connect + 1-byte echo, forwarded, median          %8s ms (p90 %s)\n' "$(field "$f_lat" median_ms)" "$(field "$f_lat" p90_ms)"
printf 'forwarded / direct latency:                        %8s\n' "$(python3 -c "print(f'{$(field "$f_lat" median_ms) / $(field "$d_lat" median_ms):.3f}')")"
printf '64 concurrent connections x 1 MiB each way, forwarded: %s ok, %s s\n' "$(field "$f_many" ok)" "$(field "$f_many" seconds)"
