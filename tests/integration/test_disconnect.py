"""A client that goes away must not leave the engine generating for nobody."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.integration.gateway_process import API_KEY, GatewayProcess, engine_gauge, wait_for

pytestmark = pytest.mark.engine

LONG = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 1500, "ignore_eos": True, "temperature": 0}  # fmt: skip
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _running(engine_url: str, auth: dict[str, str]) -> float:
    return engine_gauge(f"{engine_url}/metrics", "vllm:num_requests_running", auth)


def test_stream_disconnect_aborts_the_engine_request(
    gateway: GatewayProcess, engine_url: str, engine_auth: dict[str, str]
) -> None:
    assert wait_for(lambda: _running(engine_url, engine_auth) == 0, 30)
    with httpx.Client(timeout=60) as http, http.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json={**LONG, "stream": True}, headers=HEADERS
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        data = [line for line in (next(lines) for _ in range(12)) if line.startswith("data:")]
        assert data, "no SSE data before disconnecting"
        assert _running(engine_url, engine_auth) >= 1
    # The connection is closed mid-stream: 1,500 tokens would take a minute more.
    idle = wait_for(lambda: _running(engine_url, engine_auth) == 0, 10)
    assert idle, "engine still generating after the client left"


def test_non_streaming_disconnect_aborts_the_engine_request(
    gateway: GatewayProcess, engine_url: str, engine_auth: dict[str, str]
) -> None:
    assert wait_for(lambda: _running(engine_url, engine_auth) == 0, 30)
    errors: list[Exception] = []

    def impatient_client() -> None:
        try:
            httpx.post(f"{gateway.url}/v1/chat/completions", json=LONG, headers=HEADERS, timeout=4)
        except httpx.ReadTimeout as exc:  # the point: it gives up and closes the connection
            errors.append(exc)

    thread = threading.Thread(target=impatient_client)
    thread.start()
    assert wait_for(lambda: _running(engine_url, engine_auth) >= 1, 4), "the request never reached the engine"
    thread.join()
    assert errors, "the request finished before the client gave up; make it longer"
    idle = wait_for(lambda: _running(engine_url, engine_auth) == 0, 10)
    assert idle, "engine still generating after the client left"
