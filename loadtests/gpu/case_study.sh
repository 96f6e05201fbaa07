#!/bin/bash
# The article's case study on the GPU machine: the Llama-3.1-8B-shaped model (random weights: memory and
# latency only) at FP32, BF16, INT8 W8A8 and INT4 W4A16 (GPTQ g128, Marlin), started side by side with
# their KV cache given in bytes (as engines.sh PARALLEL=1), then measured one at a time by
# loadtests/case_study.py (batch 1: TTFT, decode ms/token, e2e; the weights vLLM loaded).
# Usage (device, repository root, after `bash .gpu/payload/unpack.sh && source .gpu/payload/env.sh`):
#   bash loadtests/gpu/case_study.sh OUT
set -uo pipefail
OUT=${1:?out dir}
W=/tmp/case-study
M=$PWD/.gpu/payload/models
mkdir -p "$OUT" "$W"
common=(--load-format dummy --tokenizer "$M/llama8b" --max-model-len 2048 --disable-uvicorn-access-log
        --host 127.0.0.1 --no-enable-prefix-caching --kv-cache-memory-bytes "${KV_BYTES:-2000000000}")
launch() {  # name port model-dir gpu-share [extra args...]
  local name=$1 port=$2 dir=$3 share=$4; shift 4
  echo "$(date +%T) starting $name" >> "$W/engines.txt"
  setsid nohup python3 -m vllm.entrypoints.openai.api_server --model "$M/$dir" --served-model-name "llama-3.1-8b@$name" \
    --port "$port" --gpu-memory-utilization "$share" "${common[@]}" "$@" > "$W/engine-$name.log" 2>&1 < /dev/null &
}
launch fp32 8201 llama8b 0.45 --dtype float32
launch bf16 8202 llama8b 0.25
launch int8 8203 llama8b_ct_w8a8_int8 0.14
VLLM_DISABLED_KERNELS=MacheteLinearKernel launch w4a16 8204 llama8b_gptq_w4g128 0.10
for port in 8201 8202 8203 8204; do
  for _ in $(seq 1 360); do curl -fs "127.0.0.1:$port/health" > /dev/null 2>&1 && break; sleep 1; done
done
date +%T >> "$W/engines.txt"; nvidia-smi --query-gpu=memory.used,memory.total --format=csv >> "$W/engines.txt"
engines=()
for pair in fp32:8201 bf16:8202 int8:8203 w4a16:8204; do
  name=${pair%%:*} port=${pair##*:}
  curl -fs "127.0.0.1:$port/health" > /dev/null 2>&1 || { echo "$name not ready" >> "$W/engines.txt"; tail -20 "$W/engine-$name.log" >> "$W/engines.txt"; continue; }
  engines+=(--engine "$name=http://127.0.0.1:$port,llama-3.1-8b@$name,$W/engine-$name.log")
done
[ ${#engines[@]} -gt 0 ] && python3 -m loadtests.case_study "${engines[@]}" --runs "${RUNS:-7}" --label "${LABEL:-gpu}" --out "$OUT"
cp "$W/engines.txt" "$OUT/"
for name in fp32 bf16 int8 w4a16; do grep -h "Model loading took\|KV cache\|ERROR" "$W/engine-$name.log" | tail -3; done > "$OUT/engine-lines.txt" 2>&1
