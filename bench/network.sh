#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Sandbox network benchmark (root), side by side in one run:
#   - network setup and teardown per sandbox, as the supervisor measures them (namespace, TAP,
#     address, listeners, nftables batch; then proxy stop and namespace removal);
#   - boot-to-ready of `matchlock run -d --image busybox` with the network and with --no-network.
# Prints medians and the ratio. Never a test: numbers move with machine load. No traffic leaves
# the machine: the guests send nothing.
#   bench/network.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
n=${1:-5}
ml=${MATCHLOCK_BIN:-build/matchlock}
tmp=$(mktemp -d)
export MATCHLOCK_HOME="$tmp/home"
cleanup() {
  "$ml" kill --all >/dev/null 2>&1 || true
  "$ml" prune >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
import_busybox "$ml"

now() { date +%s.%N; }

: >"$tmp/setup" ; : >"$tmp/teardown"; : >"$tmp/boot-net"; : >"$tmp/boot-nonet"
for _ in $(seq "$n"); do
  for mode in net nonet; do
    flag=(); [[ $mode == nonet ]] && flag=(--no-network)
    t0=$(now)
    id=$("$ml" run -d "${flag[@]}" --image busybox:latest 2>/dev/null | tail -1)
    t1=$(now)
    echo "$t1 - $t0" | bc >>"$tmp/boot-$mode"
    log="$MATCHLOCK_HOME/run/$id/supervisor.log"
    "$ml" kill "$id" >/dev/null 2>&1
    if [[ $mode == net ]]; then
      for _ in $(seq 100); do grep -q "removed in" "$log" 2>/dev/null && break; sleep 0.05; done
      sed -n 's/.*ready in \([0-9]*\) us.*/\1/p' "$log" >>"$tmp/setup"
      sed -n 's/.*removed in \([0-9]*\) us.*/\1/p' "$log" >>"$tmp/teardown"
    fi
    "$ml" rm -f "$id" >/dev/null 2>&1 || true
  done
done
setup=$(median <"$tmp/setup"); teardown=$(median <"$tmp/teardown")
net=$(median <"$tmp/boot-net"); nonet=$(median <"$tmp/boot-nonet")
printf 'network setup (median of %d):     %8.1f ms\n' "$n" "$(echo "$setup / 1000" | bc -l)"
printf 'network teardown (median):        %8.1f ms\n' "$(echo "$teardown / 1000" | bc -l)"
printf 'setup + teardown:                 %8.1f ms   (goal <= 50 ms)\n' \
  "$(echo "($setup + $teardown) / 1000" | bc -l)"
printf 'run -d to ready, --no-network:    %8.3f s\n' "$nonet"
printf 'run -d to ready, with network:    %8.3f s\n' "$net"
printf 'ratio network / no-network:       %8.3f\n' "$(echo "$net / $nonet" | bc -l)"
