#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Boot benchmark. Baseline: a bare qemu-system-x86_64 (microvm, TCG) booting the guest kernel and
# an initramfs whose init powers off at once; median of N runs. The `matchlock run --image busybox
# -- true` side joins when the VM runtime lands (issue: vm-runtime); until then only the baseline
# is printed. Never used as a test: numbers vary with machine load.
#   bench/boot.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-7}
kernel=${MATCHLOCK_KERNEL:-$(guest/kernel/build.sh)}
guest=${MATCHLOCK_GUEST:-build/matchlock-guest}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tests/tools/mkinitramfs.py "$guest" "$tmp/probe.cpio"

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

for ((i = 0; i < n; i++)); do
  s=$(date +%s.%N)
  timeout 60 qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,acpi=off -accel tcg -smp 2 -m 256 \
    -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel "$kernel" \
    -initrd "$tmp/probe.cpio" -append "console=ttyS0 reboot=t panic=-1 quiet matchlock.probe=1" >"$tmp/out" 2>&1
  grep -q "init reached" "$tmp/out" || { echo "boot $i did not reach init" >&2; exit 1; }
  e=$(date +%s.%N)
  echo "$e - $s" | bc
done >"$tmp/times"
printf 'bare qemu boot to power-off (median of %d): %.3f s\n' "$n" "$(median <"$tmp/times")"
echo "matchlock run --image busybox -- true: not measured yet (needs the VM runtime)"
