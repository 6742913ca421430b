#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Boot benchmark, side by side on this machine (QEMU microvm under TCG here; KVM where it works):
#   baseline: a bare qemu-system-x86_64 booting the same guest kernel with an initramfs whose init
#             powers off at once (matchlock.probe=1);
#   matchlock run --image busybox -- true   (supervisor, upper disk, overlay root, exec, teardown);
#   the same with MATCHLOCK_VMM_JAIL=off    (what the VMM's jail costs: namespaces, pivot_root,
#                                            uid, cgroup, QEMU's -sandbox; interleaved runs);
#   matchlock exec ID true                  (round trip on a running sandbox).
# Prints medians and the ratio. Never a test: numbers move with machine load.
#   bench/boot.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
n=${1:-7}
kernel=${MATCHLOCK_KERNEL:-$(guest/kernel/build.sh)}
guest=${MATCHLOCK_GUEST:-build/matchlock-guest}
ml=${MATCHLOCK_BIN:-build/matchlock}
tmp=$(mktemp -d)
export MATCHLOCK_HOME="$tmp/home" XDG_CACHE_HOME="$tmp/cache" MATCHLOCK_KERNEL="$kernel"
export MATCHLOCK_ACCEL=${MATCHLOCK_ACCEL:-auto}
cleanup() {
  "$ml" kill --all >/dev/null 2>&1 || true
  "$ml" prune >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
tests/tools/mkinitramfs.py "$guest" "$tmp/probe.cpio"
import_busybox "$ml"

now() { date +%s.%N; }

# Warm-up: builds the rootfs disk and initramfs, and settles --accel auto (probe cached).
"$ml" run --image busybox:latest -- true

for ((i = 0; i < n; i++)); do
  s=$(now)
  timeout 60 qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,acpi=off -accel tcg -smp 1 \
    -m 512 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel "$kernel" \
    -initrd "$tmp/probe.cpio" -append "console=ttyS0 reboot=t panic=-1 quiet matchlock.probe=1" \
    >"$tmp/out" 2>&1
  grep -q "init reached" "$tmp/out" || { echo "bare boot $i did not reach init" >&2; exit 1; }
  echo "$(now) - $s" | bc
done >"$tmp/bare"
: >"$tmp/run"
: >"$tmp/unjailed"
# Interleaved, the order swapped every round: neither side always follows the other's teardown.
timed_run() { # <jail on|off> <file>
  local s
  s=$(now)
  MATCHLOCK_VMM_JAIL=$1 "$ml" run --image busybox:latest -- true
  echo "$(now) - $s" | bc >>"$2"
}
for ((i = 0; i < n; i++)); do
  if ((i % 2 == 0)); then
    timed_run on "$tmp/run"
    timed_run off "$tmp/unjailed"
  else
    timed_run off "$tmp/unjailed"
    timed_run on "$tmp/run"
  fi
done
id=$("$ml" run -d --image busybox:latest)
for ((i = 0; i < n; i++)); do
  s=$(now)
  "$ml" exec "$id" -- true
  echo "$(now) - $s" | bc
done >"$tmp/exec"

bare=$(median <"$tmp/bare")
run=$(median <"$tmp/run")
unjailed=$(median <"$tmp/unjailed")
exec_rt=$(median <"$tmp/exec")
printf 'accelerator                                : %s\n' "$MATCHLOCK_ACCEL"
printf 'bare qemu boot to power-off (median of %d)  : %.3f s\n' "$n" "$bare"
printf 'matchlock run --image busybox -- true       : %.3f s\n' "$run"
printf 'ratio run / bare boot                       : %.2fx (goal <= 1.15x)\n' \
  "$(echo "$run / $bare" | bc -l)"
printf 'the same, VMM not jailed (JAIL=off)         : %.3f s\n' "$unjailed"
printf 'ratio jailed / not jailed                   : %.3fx (goal <= 1.05x)\n' \
  "$(echo "$run / $unjailed" | bc -l)"
printf 'matchlock exec ID true round trip           : %.3f s\n' "$exec_rt"
