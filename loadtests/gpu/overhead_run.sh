#!/bin/bash
# What the gateway adds on the GPU (issue 13), after `router_run.sh OUT start` on the same warm machine
# (four engines, the gateway over them). Both measurements pin the gateway to one variant (VARIANT, FP8 by
# default) and go direct to that variant's engine, so the difference is the gateway alone, not routing:
#   1. python -m loadtests.overhead: TTFT / e2e p50 and p99, direct vs gateway, alternating rounds, at
#      CONCURRENCY (1,16,64), ROUNDS rounds of PER_ROUND requests (short prompts, 16 output tokens, streamed);
#   2. vLLM's own client, `vllm bench serve` (random dataset, INPUT_LEN / OUTPUT_LEN tokens, --ignore-eos),
#      same flags both ways, paths alternating, at each concurrency; its result JSONs come back as one tarball
#      (loadtests/vllm_bench_table.py turns them into the report's table).
# Usage (device, repository root, env.sh sourced): bash loadtests/gpu/overhead_run.sh OUT
set -uo pipefail
OUT=${1:?out dir}
W=/tmp/gpu-bench
M=$PWD/.gpu/payload/models
VARIANT=${VARIANT:-llama-3.1-8b@fp8}
GATEWAY=http://127.0.0.1:8000
DIRECT=$(curl -fs "$GATEWAY/admin/engines" | python3 -c "import json,sys; print(next(e['base_url'] for e in
  json.load(sys.stdin)['engines'] if e['variant_id'] == '$VARIANT'))")
echo "direct: $DIRECT, gateway: $GATEWAY, both $VARIANT" | tee "$OUT/overhead.txt"
mkdir -p "$W/vb"
if [ "${SKIP_OVERHEAD:-0}" != 1 ]; then
  python3 -m loadtests.overhead --gateway "$GATEWAY" --model llama-3.1-8b --variant "$VARIANT" --label "${LABEL:-gpu}" \
    --out "$OUT" --skip-fake --concurrency "${CONCURRENCY:-1,16,64}" --per-round "${PER_ROUND:-64}" \
    --rounds "${ROUNDS:-4}" >> "$OUT/overhead.txt" 2>&1
fi
for c in ${VB_CONCURRENCY:-1 16 64}; do
  n=$(( c == 1 ? 32 : c * 4 ))
  for round in 1 2; do
    paths="direct gateway"; [ "$round" = 2 ] && paths="gateway direct"
    for path in $paths; do
      url=$DIRECT; [ "$path" = gateway ] && url=$GATEWAY
      timeout 240 python3 -m vllm.entrypoints.cli.main bench serve --backend openai-chat --endpoint /v1/chat/completions \
        --base-url "$url" --model "$VARIANT" --tokenizer "$M/llama8b" --dataset-name random \
        --random-input-len "${INPUT_LEN:-256}" --random-output-len "${OUTPUT_LEN:-128}" --ignore-eos \
        --num-prompts "$n" --max-concurrency "$c" --seed "$round" --percentile-metrics ttft,tpot,itl,e2el \
        --metric-percentiles 50,99 --save-result --result-dir "$W/vb" --result-filename "$path-c$c-r$round.json" \
        > "$W/vb/$path-c$c-r$round.txt" 2>&1 || echo "vllm bench serve $path c=$c round $round failed" >> "$OUT/overhead.txt"
    done
  done
done
tail -40 "$W"/vb/direct-c1-r1.txt >> "$OUT/overhead.txt" 2>/dev/null
tar czf "$OUT/vllm-bench.tgz" -C "$W" vb
{ tail -50 "$W/gateway.log"; nvidia-smi; } > "$OUT/gateway-tail.txt" 2>&1
