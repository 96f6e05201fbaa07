#!/bin/bash
# The gateway and the load tests on the GPU machine, against the engines loadtests/gpu/engines.sh
# started. Quality of random weights means nothing: the ppl deltas declared here (FP8 +0.5 %, INT8
# +1 %, W4A16 +3 %) are assumptions of the order published for Llama-3.1-8B, not measurements; they
# only order the ladder. Usage (device, repository root, env.sh sourced): bash loadtests/gpu/bench.sh OUT
set -uo pipefail
OUT=${1:?out dir}
W=/tmp/gpu-bench
mkdir -p "$OUT" "$W"
export QUANTGATE_HOME=/tmp/qg-home QUANTGATE_PORT=8000 QUANTGATE_EMBEDDED_MODEL=false QUANTGATE_LOG_LEVEL=info
export QUANTGATE_REMOTE_ENGINES='{
 "llama-3.1-8b@bf16": {"url": "http://127.0.0.1:8101", "method": "base", "bits": 16, "ppl_delta": 0.0, "priority_scheduling": true},
 "llama-3.1-8b@fp8": {"url": "http://127.0.0.1:8102", "method": "fp8", "bits": 8, "ppl_delta": 0.005, "priority_scheduling": true},
 "llama-3.1-8b@int8": {"url": "http://127.0.0.1:8103", "method": "int8", "bits": 8, "ppl_delta": 0.01, "priority_scheduling": true},
 "llama-3.1-8b@w4a16": {"url": "http://127.0.0.1:8104", "method": "int4-gptq", "bits": 4, "ppl_delta": 0.03, "priority_scheduling": true}}'
# The gateway (one per machine: a later stage finds it running).
if ! curl -fs 127.0.0.1:8000/ready > /dev/null 2>&1; then
  setsid nohup python3 -m server serve > "$W/gateway.log" 2>&1 < /dev/null &
fi
for _ in $(seq 1 120); do
  curl -fs 127.0.0.1:8000/ready > /dev/null 2>&1 && break; sleep 1
done
# Every variant profiled (the gateway measures each engine once it is healthy).
for _ in $(seq 1 120); do
  python3 - <<'PY' && break
import json, sys, urllib.request
view = json.load(urllib.request.urlopen("http://127.0.0.1:8000/admin/routing/llama-3.1-8b"))["variants"]
sys.exit(0 if len(view) == 4 and all(v["priors"] and v["serving"] for v in view) else 1)
PY
  sleep 2
done
[ "${START_ONLY:-0}" = 1 ] && exit 0
# At most 8 files come back from the device: the reports (plots are drawn later from the JSON),
# the consoles, the gateway's log tail; copied after each step in case the call's time runs out.
# The report is rewritten after every run straight into OUT, so a call cut short keeps what it measured.
python3 -m loadtests.bench --gateway http://127.0.0.1:8000 --model llama-3.1-8b --label "${LABEL:-h100}" --out "$OUT" --compact \
  --loads "${LOADS:-0.25,0.5,1.0,1.5}" --scenarios "${SCENARIOS:-always-base,always-fastest,round-robin,least-loaded,router}" --seconds-per-run "${SECONDS_PER_RUN:-12}" --capacity-concurrency 64 --capacity-s 20 \
  --pause-s 2 --prompt-median 256 --prompt-max 1024 --output-median 128 --output-max 256 --max-requests 2000 \
  --client-processes "${CLIENT_PROCESSES:-1}" --seeds "${SEEDS:-0}" --warmup-s "${WARMUP_S:-0}" ${WARMUP_LOAD:+--warmup-load "$WARMUP_LOAD"} > "$OUT/bench.txt" 2>&1
[ "${OVERHEAD:-1}" = 1 ] && python3 -m loadtests.overhead --gateway http://127.0.0.1:8000 --model llama-3.1-8b --label h100 --out "$W" \
  --concurrency 1,16,64 --per-round 64 --rounds 2 --fake-seconds 10 > "$OUT/overhead.txt" 2>&1
[ "${OVERHEAD:-1}" = 1 ] && cp "$W/overhead-h100.json" "$W/overhead-h100.md" "$OUT/"
{ tail -50 "$W/gateway.log"; nvidia-smi; } > "$OUT/gateway-tail.txt" 2>&1
