"""A client that goes away must not leave the engine generating for nobody.

The evidence is the engine's own counters, not its running gauge at one instant: a request the engine
ran to its end counts under `vllm:request_success_total{finished_reason="length"}` (these requests
ignore EOS), an aborted one does not, and `vllm:generation_tokens_total` says how far it got. On a
2-core box the engine's frontend can fall behind its core, so a stream may reach the client late;
an attempt in which the engine finished before the client's departure could reach it tests nothing
and is repeated."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from typing import NamedTuple

import httpx
import pytest

from tests.integration.gateway_process import API_KEY, GatewayProcess, engine_gauge, wait_for

pytestmark = pytest.mark.engine

MAX_TOKENS = 1900  # the prompt and this fit the test engine's 2,048-token context
LONG = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}  # fmt: skip
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ATTEMPTS = 3


class Counts(NamedTuple):
    ran_to_end: float
    generated: float


def _counts(engine_url: str, auth: dict[str, str]) -> Counts:
    text = httpx.get(f"{engine_url}/metrics", timeout=30, headers=auth).text
    ended = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} (\S+)$', text, re.M)
    tokens = re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    assert ended and tokens, f"the engine's counters are missing from {engine_url}/metrics"
    return Counts(float(ended.group(1)), float(tokens.group(1)))


def _running(engine_url: str, auth: dict[str, str]) -> float:
    return engine_gauge(f"{engine_url}/metrics", "vllm:num_requests_running", auth)


def _check_aborted(engine_url: str, auth: dict[str, str], leave: Callable[[], str]) -> None:
    """Run `leave` (send a long request, hang up mid-answer; it returns what it saw) until an attempt
    ends with the engine idle before running the request to its end, then check it stopped early."""
    seen = []
    for _ in range(ATTEMPTS):
        assert wait_for(lambda: _running(engine_url, auth) == 0, 60), "the engine is busy before the test"
        before = _counts(engine_url, auth)
        started = time.monotonic()
        saw = leave()
        # Without the abort the engine would run the rest of the 1,900 tokens (about 2 minutes here).
        idle = wait_for(lambda: _running(engine_url, auth) == 0, 180)
        after = _counts(engine_url, auth)
        seen.append(f"{saw}; idle after {time.monotonic() - started:.0f} s; "
                    f"{after.generated - before.generated:.0f} tokens; ran to end: {after.ran_to_end > before.ran_to_end}")  # fmt: skip
        assert idle, f"engine still generating 3 minutes after the client left: {seen}"
        if after.ran_to_end > before.ran_to_end:
            continue  # the engine was done before the departure reached it: this attempt says nothing
        assert after.generated - before.generated < MAX_TOKENS, seen
        return
    pytest.fail(f"the engine ran the request to its end in every attempt although the client left early: {seen}")


def test_stream_disconnect_aborts_the_engine_request(
    gateway: GatewayProcess, engine_url: str, engine_auth: dict[str, str]
) -> None:
    def leave() -> str:
        started = time.monotonic()
        with httpx.Client(timeout=120) as http, http.stream(
            "POST", f"{gateway.url}/v1/chat/completions", json={**LONG, "stream": True}, headers=HEADERS
        ) as response:
            assert response.status_code == 200, response.read()
            first = next(line for line in response.iter_lines() if line.startswith("data:"))
            assert '"choices"' in first, first
        return f"first data line after {time.monotonic() - started:.1f} s"

    _check_aborted(engine_url, engine_auth, leave)


def test_non_streaming_disconnect_aborts_the_engine_request(
    gateway: GatewayProcess, engine_url: str, engine_auth: dict[str, str]
) -> None:
    def leave() -> str:
        # A raw socket, closed by the test once the engine is generating: a client-side read timeout
        # would race the engine's first step on a slow box.
        body = json.dumps(LONG).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        before = _counts(engine_url, engine_auth).generated
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as client:
            client.sendall(head.encode() + body)
            # Generating is seen in either counter: a busy engine's /metrics can answer late.
            reached = wait_for(lambda: _running(engine_url, engine_auth) >= 1
                               or _counts(engine_url, engine_auth).generated > before, 120)  # fmt: skip
            client.setblocking(False)
            try:
                early = client.recv(65536)
            except BlockingIOError:
                early = b""
            if early:  # the whole answer beat the poll: the engine ran to its end and the attempt is repeated
                return f"the answer came after {time.monotonic() - started:.1f} s, before the client could leave"
            assert reached, "the request never reached the engine and no answer came in 2 minutes"
        return f"engine running it after {time.monotonic() - started:.1f} s"

    _check_aborted(engine_url, engine_auth, leave)
