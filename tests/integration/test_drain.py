"""SIGTERM drains the gateway (server/drain.py) instead of cutting every stream: `quantgate serve`, a real
uvicorn, in front of FakeEngines (a process boundary), streams in flight when the signal comes."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.fakes.fleet import fake_fleet
from tests.integration.drills import record
from tests.integration.gateway_process import API_KEY, GatewayProcess

FAKES = {"drain@bf16": {"tpot_ms": 20, "ttft_ms": 20, "max_running": 32,
                        "spec": {"method": "base", "bits": 16, "ppl_delta": 0.0}}}  # fmt: skip
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
STREAMS = 10


def _stream(gateway: GatewayProcess, tokens: int, started: threading.Barrier, out: list[list[str]]) -> None:
    body = {"model": "drain", "prompt": "tell me", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{gateway.url}/v1/completions", json=body,
                                                           headers=HEADERS) as response:  # fmt: skip
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    if len(lines) == 1:
                        started.wait(timeout=30)
    except httpx.HTTPError as exc:
        lines.append(f"broken: {type(exc).__name__}")
    out.append(lines)


def _streams_then_sigterm(gateway: GatewayProcess, tokens: int) -> tuple[list[list[str]], float]:
    """STREAMS streams; once each has its first chunk, SIGTERM; then what a client sees while it drains."""
    started, out = threading.Barrier(STREAMS + 1), []
    threads = [threading.Thread(target=_stream, args=(gateway, tokens, started, out)) for _ in range(STREAMS)]
    for thread in threads:
        thread.start()
    started.wait(timeout=30)
    gateway.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.3)  # the signal handler runs at once; give the request a moment to be sent after it
    ready = httpx.get(f"{gateway.url}/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["draining"] is True, ready.text
    refused = httpx.post(f"{gateway.url}/v1/completions", headers=HEADERS, timeout=5,
                         json={"model": "drain", "prompt": "x", "max_tokens": 1})  # fmt: skip
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    for thread in threads:
        thread.join(timeout=60)
    return out, signalled


def test_sigterm_lets_streams_in_flight_finish_and_refuses_new_work() -> None:
    with fake_fleet(FAKES, "drain") as (gateway, _):
        out, signalled = _streams_then_sigterm(gateway, tokens=100)  # ~2 s a stream
        code = gateway.proc.wait(timeout=30)
        exited_s = time.monotonic() - signalled
    assert len(out) == STREAMS
    for lines in out:
        assert lines[-1] == "data: [DONE]" and not any("error" in line for line in lines), lines[-3:]
        assert len([line for line in lines if '"text"' in line]) >= 100
    assert code in (0, -signal.SIGTERM)
    assert exited_s < 15, f"exited {exited_s:.1f} s after SIGTERM, with nothing left in flight after ~2 s"
    record("SIGTERM with streams in flight", streams=STREAMS, completed_with_done=sum(
        lines[-1] == "data: [DONE]" and not any("error" in line for line in lines) for lines in out),
        gateway_exited_after_s=round(exited_s, 2), grace_s=60)  # fmt: skip


def test_streams_past_the_grace_end_with_an_error_chunk_and_done() -> None:
    with fake_fleet(FAKES, "drain-grace", QUANTGATE_DRAIN_GRACE_S="1") as (gateway, _):
        out, _ = _streams_then_sigterm(gateway, tokens=1000)  # ~20 s a stream, cut after 1 s
        code = gateway.proc.wait(timeout=30)
    assert len(out) == STREAMS
    for lines in out:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert "shutting down" in lines[-2], lines[-3:]
        assert len(lines) < 500
    assert code in (0, -signal.SIGTERM)
    record("SIGTERM, streams longer than the grace", streams=STREAMS, grace_s=1,
           ended_with_error_chunk_and_done=sum("shutting down" in lines[-2] and lines[-1] == "data: [DONE]"
                                               for lines in out))  # fmt: skip
