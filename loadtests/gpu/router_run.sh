#!/bin/bash
# The shared-device router on one H200, in stages that each fit one device call (10 minutes); processes
# started with setsid outlive a call, so the stages run in consecutive calls on the same warm machine.
#   start: the four engines of engines.sh at once (PARALLEL=1), then the gateway over them as remote
#          engines on one host (one device group), waiting until every variant is profiled;
#   bench: the router bench against every single variant pinned, round-robin and least-loaded at
#          LOADS and SEEDS, the client split over four processes, WARMUP_S (5) of unmeasured traffic
#          before each run (at WARMUP_LOAD x capacity when set: a load step, e.g. WARMUP_S=20
#          WARMUP_LOAD=0.5 LOADS=1.5); the report is rewritten after each run.
#   all:   both (default): one call, so no gap between calls can lose the warm machine; the start takes
#          ~150 s on an H100, which leaves room for about 6 cells of 20 s (SCENARIOS x LOADS x SEEDS).
# Usage (device, repository root, env.sh sourced): bash loadtests/gpu/router_run.sh OUT [start|bench|all]
set -uo pipefail
OUT=${1:?out dir}
STAGE=${2:-all}
W=/tmp/gpu-bench
mkdir -p "$OUT" "$W"
# Progress reaches OUT while the call runs: two earlier calls ran out their 600 s with nothing back.
( while sleep 15; do { date +%T; cat "$W/engines.txt"; for f in "$W"/engine-*.log "$W/gateway.log"; do
    [ -f "$f" ] && { echo "== $f"; tail -4 "$f"; }; done; nvidia-smi --query-gpu=memory.used --format=csv;
  } > "$OUT/progress.txt" 2>&1; done ) &
PROGRESS=$!
if [ "$STAGE" = start ] || [ "$STAGE" = all ]; then
  # No engines, no bench: waiting on the gateway's profiling of engines that never started spent a whole call
  # (545 s of device time, 2026-12-06).
  if ! PARALLEL=1 bash loadtests/gpu/engines.sh "$W"; then
    cp "$W/engines.txt" "$OUT/" 2>/dev/null; echo "engines.sh failed: see engines.txt" >&2; kill "$PROGRESS"; exit 2
  fi
  cp "$W/engines.txt" "$OUT/" 2>/dev/null
  START_ONLY=1 bash loadtests/gpu/bench.sh "$OUT"
  curl -fs 127.0.0.1:8000/admin/routing/llama-3.1-8b > "$OUT/routing-start.json"
fi
if [ "$STAGE" = bench ] && [ ! -f "$W/engines.txt" ]; then
  # A machine idle for 30 s between two calls is given back, and the next call gets a bare one: without this
  # check the bench polled a gateway that was never started for ~380 s of device time (twice, 2026-12-06).
  echo "bench stage on a machine without the start stage's engines (given back since?): run start again" \
    | tee "$OUT/bare.txt" >&2
  kill "$PROGRESS" 2>/dev/null; exit 3
fi
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  SCENARIOS=${SCENARIOS:-pin:bf16,pin:fp8,pin:int8,pin:w4a16,round-robin,least-loaded,router} LOADS=${LOADS:-0.5,1.0} \
    SECONDS_PER_RUN=${SECONDS_PER_RUN:-20} CLIENT_PROCESSES=${CLIENT_PROCESSES:-4} WARMUP_S=${WARMUP_S:-5} OVERHEAD=0 \
    bash loadtests/gpu/bench.sh "$OUT"
  curl -fs 127.0.0.1:8000/admin/routing/llama-3.1-8b > "$OUT/routing-end.json"
  # Every change of the active rung, with its time and reason, against the bench's own progress.
  grep "active rung" "$W/gateway.log" > "$OUT/switches.txt"
  # At most 8 files come back: the plots are drawn here from the JSON (python -m loadtests.plots), so the
  # routing view, the gateway's log tail and the progress come back instead; the JSON travels gzipped.
  rm -f "$OUT"/*.png; gzip -f "$OUT"/bench-*.json
fi
kill "$PROGRESS" 2>/dev/null
