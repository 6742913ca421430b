#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Live updates through `up` against the recreate they replace, side by side (root): one busybox
# sandbox with a network; its allow_hosts and then its published port edited, applied by `up`
# (`~ update`, same supervisor), and the same edit applied with `up --force-recreate --wait`.
# Prints medians and the ratio (goal of the ports-live issue: live <= 10% of a recreate).
# Never a test: numbers move with machine load. No traffic leaves the machine.
#   bench/live_update.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
n=${1:-5}
ml=${MATCHLOCK_BIN:-build/matchlock}
tmp=$(mktemp -d)
export MATCHLOCK_HOME="$tmp/home"
cleanup() {
  "$ml" down -p livebench -v >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
import_busybox "$ml"

spec="$tmp/live.toml"
base=$((30000 + $$ % 10000))
write() {
  printf 'name = "livebench"\n[sandboxes.s]\nimage = "busybox:latest"\nmemory = "128MiB"\n' >"$spec"
  printf 'ports = [{ host = %s, guest = 80 }]\n' "${2:-$base}" >>"$spec"
  printf '[sandboxes.s.network]\nallow_hosts = ["%s.example"]\n' "$1" >>"$spec"
}

write a
"$ml" up -f "$spec" --wait >/dev/null 2>&1
live=$(for ((i = 0; i < n; i++)); do write "l$i"; ms "$ml" up -f "$spec"; done | median)
ports=$(for ((i = 0; i < n; i++)); do write "l$i" $((base + 1 + i)); ms "$ml" up -f "$spec"; done | median)
recreate=$(for ((i = 0; i < n; i++)); do
  write "r$i"
  ms "$ml" up -f "$spec" --force-recreate --wait
done | median)
noop=$(for ((i = 0; i < n; i++)); do ms "$ml" up -f "$spec"; done | median)

printf 'no-op up (baseline), median            %9.1f ms\n' "$noop"
printf 'allow_hosts edit, live up, median      %9.1f ms\n' "$live"
printf 'allow_hosts edit, recreate --wait      %9.1f ms\n' "$recreate"
printf 'ports edit, live up, median            %9.1f ms\n' "$ports"
printf 'live / recreate (allow_hosts):         %9s   (goal <= 0.10)\n' "$(ratio "$live" "$recreate")"
printf 'live / recreate (ports):               %9s   (goal <= 0.10)\n' "$(ratio "$ports" "$recreate")"
