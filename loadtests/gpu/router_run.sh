#!/bin/bash
# The shared-device router on one H200 in one call (10 minutes): the four engines of engines.sh started at
# once (PARALLEL=1), the gateway over them as remote engines on one host (one device group), and the router
# bench against every single variant pinned, round-robin and least-loaded at LOADS, the client split over
# four processes. Usage (device, repository root, env.sh sourced):
#   bash loadtests/gpu/router_run.sh OUT
set -uo pipefail
OUT=${1:?out dir}
W=/tmp/gpu-bench
mkdir -p "$OUT" "$W"
# Progress reaches OUT while the call runs: two earlier calls ran out their 600 s with nothing back.
( while sleep 15; do { cat "$W/engines.txt"; for f in "$W"/engine-*.log "$W/gateway.log"; do
    [ -f "$f" ] && { echo "== $f"; tail -4 "$f"; }; done; nvidia-smi --query-gpu=memory.used --format=csv;
  } > "$OUT/progress.txt" 2>&1; done ) &
PARALLEL=1 bash loadtests/gpu/engines.sh "$W"
cp "$W/engines.txt" "$OUT/" 2>/dev/null
SCENARIOS=${SCENARIOS:-pin:bf16,pin:fp8,pin:int8,pin:w4a16,round-robin,least-loaded,router} LOADS=${LOADS:-0.5,1.0} \
  SECONDS_PER_RUN=${SECONDS_PER_RUN:-12} CLIENT_PROCESSES=${CLIENT_PROCESSES:-4} OVERHEAD=0 bash loadtests/gpu/bench.sh "$OUT"
