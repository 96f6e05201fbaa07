"""Engine readiness: ready only when vLLM lists the variant it is meant to serve (SERVED_MODEL_NAME),
which it does once the weights are loaded and the KV cache is allocated."""

import json
import os
import sys
import urllib.request

# The engine's key (k8s/engine/deployment.yaml): /v1/* answers only with it.
KEY = os.environ.get("VLLM_API_KEY")
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}
try:
    request = urllib.request.Request("http://127.0.0.1:8000/v1/models", headers=HEADERS)
    with urllib.request.urlopen(request, timeout=3) as response:
        served = {model["id"] for model in json.load(response)["data"]}
except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
    sys.exit(f"not ready: {exc}")
sys.exit(0 if os.environ["SERVED_MODEL_NAME"] in served else f"not serving {os.environ['SERVED_MODEL_NAME']}: {served}")
