"""Engine preStop: let the Service drop this pod (ENDPOINT_GRACE_S), then wait until vLLM has no
running or waiting request, at most DRAIN_TIMEOUT_S; SIGTERM follows. The pod's
terminationGracePeriodSeconds covers both (k8s/engine/deployment.yaml says how it is sized)."""

import os
import time
import urllib.request

KEY = os.environ.get("VLLM_API_KEY")  # an engine started with server/engines/engine_guard.py asks it everywhere
REQUEST = urllib.request.Request("http://127.0.0.1:8000/metrics",
                                 headers={"Authorization": f"Bearer {KEY}"} if KEY else {})
time.sleep(float(os.environ.get("ENDPOINT_GRACE_S", "5")))
deadline = time.monotonic() + float(os.environ.get("DRAIN_TIMEOUT_S", "60"))
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(REQUEST, timeout=3) as response:
            lines = response.read().decode().splitlines()
    except Exception:  # noqa: BLE001 - the server is already gone: nothing left to drain
        break
    busy = sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")))
    if busy == 0:
        break
    time.sleep(1)
