#!/bin/bash
# Starts four vLLM 0.22 engines on one H100 for the GPU load test: Llama-3.1-8B-shaped random weights
# (--load-format dummy; configs from shared/gpu/models, carried as .gpu/payload/models) as bf16, FP8
# (dynamic, on load), INT8 W8A8 (compressed-tensors) and W4A16 (GPTQ g128, Marlin). One after
# another, each given its own share of the GPU's memory, each with --scheduling-policy priority.
# Usage (device, repository root, after `bash .gpu/payload/unpack.sh && source .gpu/payload/env.sh`):
#   bash loadtests/gpu/engines.sh LOG_DIR
# PARALLEL=1: all four start at once, each with its KV cache given in bytes (KV_BYTES, default 12 GB), which
# skips the memory profiling that breaks when engines start side by side (2 min 44 s for all four, FACTS.md).
set -uo pipefail
LOG=${1:?log dir}
M=$PWD/.gpu/payload/models
mkdir -p "$LOG"
# A missing template path makes every engine exit at start (vLLM reads a path-like string that does not exist as an
# error), and waiting 300 s for each of four dead engines outlasts a device call: check it first.
# A carry built from a tokenizer folder without chat_template.jinja (transformers before 4.43 kept the template in
# tokenizer_config.json) still has it there: write the file from it.
if [ ! -f "$M/llama8b/chat_template.jinja" ] && [ -f "$M/llama8b/tokenizer_config.json" ]; then
  python3 -c 'import json, sys; t = json.load(open(sys.argv[1])).get("chat_template"); t and open(sys.argv[2], "w").write(t)' \
    "$M/llama8b/tokenizer_config.json" "$M/llama8b/chat_template.jinja"
fi
[ -f "$M/llama8b/chat_template.jinja" ] || { echo "no $M/llama8b/chat_template.jinja (copy the tokenizer folder's)" | tee -a "$LOG/engines.txt"; exit 1; }
declare -A PIDS
# The tokenizer is SmolLM2's (vocab 49152, as the configs say), chat template included.
# No prefix caching: every scenario replays the same prompts, and a cache warmed by the last one would flatter the next.
common=(--load-format dummy --tokenizer "$M/llama8b" --chat-template "$M/llama8b/chat_template.jinja" --max-model-len 2048 --scheduling-policy priority
        --disable-uvicorn-access-log --host 127.0.0.1 --no-enable-prefix-caching)
# EAGER=1: no torch.compile / CUDA graphs (~1 min to start instead of ~2; slower decode at small batch).
if [ "${EAGER:-0}" = 1 ]; then common+=(--enforce-eager); fi
launch() {  # name port model-dir gpu-share [extra args...]
  local name=$1 port=$2 dir=$3 share=$4; shift 4
  local memory=(--gpu-memory-utilization "$share")
  if [ "${PARALLEL:-0}" = 1 ]; then memory+=(--kv-cache-memory-bytes "${KV_BYTES:-12000000000}"); fi
  echo "$(date +%T) starting $name" >> "$LOG/engines.txt"
  setsid nohup python3 -m vllm.entrypoints.openai.api_server --model "$M/$dir" --served-model-name "llama-3.1-8b@$name" \
    --port "$port" "${memory[@]}" "${common[@]}" "$@" > "$LOG/engine-$name.log" 2>&1 < /dev/null &
  PIDS[$name]=$!
}
wait_ready() {  # name port
  local name=$1 port=$2
  for _ in $(seq 1 300); do
    if curl -fs "127.0.0.1:$port/health" > /dev/null 2>&1; then echo "$(date +%T) $name ready" >> "$LOG/engines.txt"; return 0; fi
    kill -0 "${PIDS[$name]}" 2> /dev/null || break  # the engine exited: no use waiting
    sleep 1
  done
  echo "$(date +%T) $name NOT ready" >> "$LOG/engines.txt"; tail -30 "$LOG/engine-$name.log" >> "$LOG/engines.txt"; return 1
}
start() { launch "$@"; wait_ready "$1" "$2"; }
if [ "${PARALLEL:-0}" = 1 ]; then
  launch bf16 8101 llama8b 0.30
  launch fp8 8102 llama8b 0.19 --quantization fp8
  launch int8 8103 llama8b_ct_w8a8_int8 0.19
  VLLM_DISABLED_KERNELS=MacheteLinearKernel launch w4a16 8104 llama8b_gptq_w4g128 0.15
  wait_ready bf16 8101; wait_ready fp8 8102; wait_ready int8 8103; wait_ready w4a16 8104
else
  start bf16 8101 llama8b 0.30
  start fp8 8102 llama8b 0.19 --quantization fp8
  start int8 8103 llama8b_ct_w8a8_int8 0.19
  VLLM_DISABLED_KERNELS=MacheteLinearKernel start w4a16 8104 llama8b_gptq_w4g128 0.15
fi
nvidia-smi --query-gpu=memory.used,memory.total --format=csv >> "$LOG/engines.txt"
