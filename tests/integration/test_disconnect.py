"""A client that goes away must not leave the engine generating for nobody."""

from __future__ import annotations

import json
import socket

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
    # A raw socket, closed by the test once the engine is generating: a client-side read timeout would
    # race the engine's first step on a slow box (the request must reach the engine before the client
    # gives up, and the gauge only moves after a step).
    body = json.dumps(LONG).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as client:
        client.sendall(head.encode() + body)
        reached = wait_for(lambda: _running(engine_url, engine_auth) >= 1, 120)
        client.setblocking(False)
        try:
            early = client.recv(65536)
        except BlockingIOError:
            early = b""
        assert reached, f"the request never reached the engine; the gateway said {early[:300]!r}"
        assert not early, f"the answer came before the client left; make it longer: {early[:300]!r}"
    # The connection is closed with 1,500 tokens still to generate (a minute and more on a CPU).
    idle = wait_for(lambda: _running(engine_url, engine_auth) == 0, 20)
    assert idle, "engine still generating after the client left"
