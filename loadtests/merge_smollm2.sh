#!/bin/bash
# SmolLM2 merged through the registry (issue 18): a gateway with the bundled model's base only, a second parent
# registered from PARENT (an HF checkpoint of SmolLM2's shape), then `quantgate models merge` with SLERP and
# linear; every model's base is measured and gated by the registry (perplexity on the profile's windows, the
# chat set, next-token agreement). Writes OUT/models.json (GET /admin/models) and OUT/gateway.log.
# Usage: bash loadtests/merge_smollm2.sh PARENT OUT [PROFILE (full)]
set -euo pipefail
PARENT=$(realpath "${1:?an HF checkpoint of the shape of SmolLM2}")
OUT=${2:?out dir}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
export QUANTGATE_HOME=${QUANTGATE_HOME:-$OUT/home} QUANTGATE_PORT=${QUANTGATE_PORT:-8399}
export QUANTGATE_REGISTRY_PROFILE=${3:-full} QUANTGATE_DEFAULT_VARIANTS="" QUANTGATE_MAX_PPL_DELTA=100
PY=${PY:-.venv/bin/python}
setsid "$PY" -m server serve > "$OUT/gateway.log" 2>&1 &
GATEWAY=$!
trap 'kill -TERM -- -$GATEWAY 2>/dev/null || true' EXIT
ready() { curl -fs "127.0.0.1:$QUANTGATE_PORT/admin/models/$1" | "$PY" -c \
  "import json,sys; print(all(v['state'] in ('ready','rejected','failed') for v in json.load(sys.stdin)['variants']))" \
  2>/dev/null | grep -q True; }
until ready smollm2-135m; do sleep 5; done
"$PY" -m server models add "$PARENT" --name smollm2-other --variants "" --max-ppl-delta 100
"$PY" -m server models merge smollm2-135m smollm2-other --t 0.5 --name smollm2-slerp --variants "" --max-ppl-delta 100
"$PY" -m server models merge smollm2-135m smollm2-other --method linear --name smollm2-linear --variants "" \
  --max-ppl-delta 100
"$PY" -m server models list
curl -fs "127.0.0.1:$QUANTGATE_PORT/admin/models" > "$OUT/models.json"
