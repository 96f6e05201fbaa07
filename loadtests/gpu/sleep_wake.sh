#!/bin/bash
# vLLM sleep mode on the GPU machine: how long a rung takes to go to sleep (level 1: weights to host
# memory, KV cache dropped) and to wake, and what its first request costs after waking, against the same
# request awake: what a regime switch of the shared-device policy would cost if the inactive rungs slept.
# Stops the engines of engines.sh (if any) and starts bf16 and int8 with --enable-sleep-mode.
# Usage (device, repository root, env.sh sourced): bash loadtests/gpu/sleep_wake.sh OUT [REPEATS]
set -uo pipefail
OUT=${1:?out dir}
REPEATS=${2:-5}
W=/tmp/gpu-sleep
M=$PWD/.gpu/payload/models
mkdir -p "$OUT" "$W"
pkill -f "vllm.entrypoints.openai.api_server" 2>/dev/null; pkill -f "server serve" 2>/dev/null; sleep 5
export VLLM_SERVER_DEV_MODE=1  # /sleep, /wake_up and /is_sleeping are development endpoints in vLLM 0.22
common=(--load-format dummy --tokenizer "$M/llama8b" --chat-template "$M/llama8b/chat_template.jinja" --max-model-len 2048
        --disable-uvicorn-access-log --host 127.0.0.1 --no-enable-prefix-caching --enable-sleep-mode
        --kv-cache-memory-bytes 12000000000)
setsid nohup python3 -m vllm.entrypoints.openai.api_server --model "$M/llama8b" --served-model-name bf16 --port 8201 \
  --gpu-memory-utilization 0.40 "${common[@]}" > "$W/engine-bf16.log" 2>&1 < /dev/null &
setsid nohup python3 -m vllm.entrypoints.openai.api_server --model "$M/llama8b_ct_w8a8_int8" --served-model-name int8 \
  --port 8202 --gpu-memory-utilization 0.30 "${common[@]}" > "$W/engine-int8.log" 2>&1 < /dev/null &
for port in 8201 8202; do
  for _ in $(seq 1 300); do curl -fs "127.0.0.1:$port/health" > /dev/null 2>&1 && break; sleep 1; done
done
python3 - "$REPEATS" > "$OUT/sleep-wake.txt" 2>&1 <<'PY'
import json, statistics, sys, time, urllib.request

def post(url, body=None):
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
    return (time.perf_counter() - started) * 1000

def complete(port, name):
    body = {"model": name, "prompt": "the river of time " * 64, "max_tokens": 128, "ignore_eos": True, "temperature": 0}
    return post(f"http://127.0.0.1:{port}/v1/completions", body)

def mem():
    import subprocess
    return subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()

repeats = int(sys.argv[1])
for port, name in ((8201, "bf16"), (8202, "int8")):
    awake = [complete(port, name) for _ in range(3)]
    rows = []
    for _ in range(repeats):
        before = complete(port, name)
        sleep_ms = post(f"http://127.0.0.1:{port}/sleep?level=1")
        asleep = mem()
        wake_ms = post(f"http://127.0.0.1:{port}/wake_up")
        first = complete(port, name)
        rows.append((sleep_ms, wake_ms, first, before, asleep))
    print(f"{name}: awake e2e (256-token prompt, 128 out) {statistics.median(awake):.0f} ms; GPU memory awake {mem()}")
    for s, w, f, b, m in rows:
        print(f"  sleep {s:7.0f} ms  (GPU memory asleep {m})  wake {w:7.0f} ms  first request after wake {f:6.0f} ms"
              f"  (same request before sleep {b:6.0f} ms)")
    print(f"  median: sleep {statistics.median(r[0] for r in rows):.0f} ms, wake {statistics.median(r[1] for r in rows):.0f} ms, "
          f"first request after wake {statistics.median(r[2] for r in rows):.0f} ms vs {statistics.median(r[3] for r in rows):.0f} awake")
PY
tail -20 "$W/engine-int8.log" > "$OUT/sleep-engine-tail.txt"
