#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Long fuzzing runs of the libFuzzer targets in tests/fuzz (docs/fuzzing.md), for the CPU time
# the short ctest runs cannot give. Builds the clang ASan+UBSan tree (build-asan, as scripts/test
# does) when needed, then runs each target for SECONDS with its committed seeds plus a working
# corpus kept under ${XDG_CACHE_HOME:-~/.cache}/matchlock/fuzz/<target>, so that runs add up.
# Two targets run at a time (one per core). Prints one line per target: CPU seconds, executions,
# executions per second, coverage, corpus size, and the crash or timeout file if one was found.
# With --merge, inputs that add coverage are minimized into tests/fuzz/corpus/<target>/ (review
# and commit them by hand).
#   bench/fuzz.sh [--merge] [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
merge=0
[[ "${1:-}" == "--merge" ]] && { merge=1; shift; }
secs=${1:-600}
shift || true
build=${ML_FUZZ_BUILD:-build-asan}
if [[ ! -f $build/build.ninja ]]; then
  CC=clang-14 CXX=clang++-14 cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
    -DML_WERROR=ON -DML_SANITIZE=address,undefined >/dev/null
fi
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(ls tests/fuzz/targets/*.cc | xargs -n1 basename | sed 's/\.cc$//')
fi
ninja -C "$build" "${targets[@]/#/fuzz_}" >/dev/null
cache="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock/fuzz"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

run_one() {
  local t=$1 work="$cache/$1" artifacts="$cache/$1-artifacts"
  mkdir -p "$work" "$artifacts"
  local start end
  start=$(date +%s)
  # CPU time of the run (user + system), from the child's rusage.
  python3 -c 'import resource, subprocess, sys
with open(sys.argv[2], "w") as log:
    subprocess.run(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{r.ru_utime} {r.ru_stime}\n")' "$logs/$t.time" "$logs/$t.log" \
    "$build/tests/fuzz/fuzz_$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "$work" "tests/fuzz/corpus/$t" || true
  end=$(date +%s)
  echo "$((end - start))" >"$logs/$t.wall"
}
export -f run_one
export build secs cache logs
printf '%s\n' "${targets[@]}" | xargs -P 2 -I{} bash -c 'run_one {}'

printf '%-18s %8s %12s %9s %8s %7s  %s\n' target cpu_s execs exec/s cov corpus finding
for t in "${targets[@]}"; do
  cpu=$(awk '{printf "%.0f", $1 + $2}' "$logs/$t.time" 2>/dev/null || echo "?")
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$logs/$t.log" | tail -1 | cut -d' ' -f2)
  corpus=$(ls "$cache/$t" | wc -l)
  finding=$(grep -oE '(crash|timeout|oom|leak)-[0-9a-f]+' "$logs/$t.log" | tail -1 || true)
  [[ -n $finding ]] && finding="$cache/$t-artifacts/$finding"
  printf '%-18s %8s %12s %9s %8s %7s  %s\n' "$t" "$cpu" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
    "$corpus" "${finding:--}"
  if ((merge)); then
    "$build/tests/fuzz/fuzz_$t" -merge=1 "tests/fuzz/corpus/$t" "$cache/$t" >/dev/null 2>&1 || true
  fi
done
