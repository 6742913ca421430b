#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Reconciler benchmark on a 10-sandbox spec (busybox fixture, 128 MiB each), side by side:
#   no-op `up` (everything already running): median of N, against the goal of 50 ms;
#   baseline `matchlock validate` of the same spec (just reading and checking it), for the ratio;
#   10 sandboxes brought up with --parallel 10 vs --parallel 1 (both --wait, `down` in between).
# Prints medians and ratios. Never a test: numbers move with machine load.
#   bench/up.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
n=${1:-11}
kernel=${MATCHLOCK_KERNEL:-$(guest/kernel/build.sh)}
ml=${MATCHLOCK_BIN:-build/matchlock}
tmp=$(mktemp -d)
export MATCHLOCK_HOME="$tmp/home" XDG_CACHE_HOME="$tmp/cache" MATCHLOCK_KERNEL="$kernel"
export MATCHLOCK_ACCEL=${MATCHLOCK_ACCEL:-auto}
cleanup() {
  "$ml" down -p bench -v >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
import_busybox "$ml"

spec="$tmp/ten.toml"
echo 'name = "bench"' >"$spec"
for i in $(seq 0 9); do
  printf '[sandboxes.s%d]\nimage = "busybox:latest"\nmemory = "128MiB"\ndisk = "256MiB"\n' "$i" >>"$spec"
  printf 'network = { no_network = true }\n' >>"$spec"
done


"$ml" up -f "$spec" --wait --parallel 10 >/dev/null 2>&1   # warm-up: rootfs, initramfs, accel probe
"$ml" down -p bench >/dev/null

serial=$(ms "$ml" up -f "$spec" --wait --parallel 1)
"$ml" down -p bench >/dev/null
parallel=$(ms "$ml" up -f "$spec" --wait --parallel 10)

noop=$(for ((i = 0; i < n; i++)); do ms "$ml" up -f "$spec" --detailed-exitcode; done | median)
validate=$(for ((i = 0; i < n; i++)); do ms "$ml" validate -f "$spec"; done | median)

printf '10 sandboxes up --wait, --parallel 1   %9.1f ms\n' "$serial"
printf '10 sandboxes up --wait, --parallel 10  %9.1f ms   (%sx faster; %s cores)\n' "$parallel" \
  "$(ratio "$serial" "$parallel")" "$(nproc)"
printf 'validate the spec (baseline), median   %9.1f ms\n' "$validate"
printf 'no-op up (all running), median         %9.1f ms   (%sx validate; goal <= 50 ms)\n' \
  "$noop" "$(ratio "$noop" "$validate")"
