#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# HTTPS throughput and added latency: matchlock's egress MITM vs mitmproxy, side by side, in
# network namespaces created (and removed) by the script. Needs root.
#   BENCH_REQUESTS=256 BENCH_LATENCY_SAMPLES=300 bench/egress.sh
exec /usr/bin/python3 "$(dirname "$0")/egress_bench.py" "$@"
