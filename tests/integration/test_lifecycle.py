"""Engine supervision for real: crash and restart, Ctrl-C without orphans, remote engines."""

from __future__ import annotations

import os
import signal
import time

import openai
import psutil
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engines.local import free_loopback_port
from server.settings import Settings
from tests.integration.gateway_process import ADMIN_KEY, GatewayProcess, alive, start_gateway, wait_for

pytestmark = pytest.mark.engine

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_remote_engine_serves_through_the_same_client_path(engine_url: str, tmp_path) -> None:
    """A second gateway that owns no engine, pointed at the first one's engine by URL."""
    settings = Settings(home=tmp_path, embedded_model=False, remote_engines={"smollm2-135m@bf16": engine_url},
                        admin_key=ADMIN_KEY)
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
    assert wait_for(lambda: gateway.engines()[0]["state"] != "ready", 10, 0.1)
    assert wait_for(lambda: gateway.engines()[0]["state"] == "ready", 300, 1), gateway.log_tail()
    (after,) = gateway.engines()
    assert after["restarts"] == before["restarts"] + 1
    assert after["pid"] != before["pid"]
    assert not alive(group), f"the crashed engine's children were left running: {[p.pid for p in alive(group)]}"
    completion = client.chat.completions.create(model="smollm2-135m", messages=FRANCE, temperature=0, max_tokens=20)
    assert "Paris" in completion.choices[0].message.content


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
