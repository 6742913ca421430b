# SPDX-License-Identifier: Apache-2.0
# Helpers the bench scripts share (sourced, not run).

# median of the numbers on stdin, one per line
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# wall time of a command in ms (its output discarded; a failing command fails the bench)
ms() { python3 -c 'import sys,time; t=time.perf_counter(); import subprocess; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True); print(f"{(time.perf_counter()-t)*1000:.1f}")' "$@"; }

# A / B with 3 decimals
ratio() { python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.3f}")' "$1" "$2"; }

# imports the busybox test fixture as busybox:latest into $MATCHLOCK_HOME using binary $1
import_busybox() {
  local fixture
  fixture=$(/usr/bin/python3 tests/fixtures/build_images.py busybox | tail -1)
  "$1" image import busybox:latest <"$fixture/busybox-save.tar" >/dev/null 2>&1
}
