"""An engine SIGKILLed under concurrent streams: no request is lost before its first byte. `quantgate serve`
in front of two FakeEngines (a process boundary) for two rungs of one model; the most accurate one is
killed while streams run on it and more arrive."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import psutil

from tests.fakes.fleet import fake_fleet
from tests.integration.drills import record
from tests.integration.gateway_process import API_KEY, GatewayProcess

FAKES = {
    "kill@bf16": {"tpot_ms": 20, "ttft_ms": 20, "max_running": 64,
                  "spec": {"method": "base", "bits": 16, "ppl_delta": 0.0}},
    "kill@int8": {"tpot_ms": 20, "ttft_ms": 20, "max_running": 64,
                  "spec": {"method": "int8", "bits": 8, "ppl_delta": 0.01}},
}  # fmt: skip
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
STREAMS = 10  # in flight on the engine when it is killed, and as many sent right after


def _stream(gateway: GatewayProcess, first: threading.Barrier | None, out: list[dict]) -> None:
    """One streamed completion of 100 tokens (~2 s); what the client saw of it."""
    body = {"model": "kill", "prompt": "tell me", "max_tokens": 100, "ignore_eos": True, "stream": True}
    seen: dict = {"status": None, "variant": None, "text_chunks": 0, "error_before_text": False, "error": False,
                  "done": False}  # fmt: skip
    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{gateway.url}/v1/completions", json=body,
                                                           headers=HEADERS) as response:  # fmt: skip
            seen["status"], seen["variant"] = response.status_code, response.headers.get("x-quantgate-variant")
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    seen["done"] = True
                elif line.startswith("data:") and '"error"' in line:
                    seen["error"] = True
                    seen["error_before_text"] = seen["text_chunks"] == 0
                elif line.startswith("data:"):
                    seen["text_chunks"] += 1
                    if seen["text_chunks"] == 1 and first is not None:
                        first.wait(timeout=30)
    except httpx.HTTPError as exc:
        seen["error"], seen["error_before_text"] = f"broken: {type(exc).__name__}", seen["text_chunks"] == 0
    out.append(seen)


def _fake_process(variant_id: str) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "tests.fakes.fake_engine" in cmdline and variant_id in cmdline:
            return process
    raise AssertionError(f"no FakeEngine for {variant_id}")


def test_an_engine_killed_under_streams_loses_no_request_before_its_first_byte() -> None:
    with fake_fleet(FAKES, "engine-kill") as (gateway, _):
        first, running, after = threading.Barrier(STREAMS + 1), [], []
        threads = [threading.Thread(target=_stream, args=(gateway, first, running)) for _ in range(STREAMS)]
        for thread in threads:
            thread.start()
        first.wait(timeout=30)  # every stream has text from the engine about to die
        _fake_process("kill@bf16").send_signal(signal.SIGKILL)
        killed = time.monotonic()
        late = [threading.Thread(target=_stream, args=(gateway, None, after)) for _ in range(STREAMS)]
        for thread in late:
            thread.start()
        for thread in threads + late:
            thread.join(timeout=60)
        answered_s = time.monotonic() - killed
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    moved = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("quantgate_upstream_retries_total{"))  # fmt: skip
    assert len(running) == STREAMS and len(after) == STREAMS
    lost = [s for s in running + after if s["status"] != 200 or s["error_before_text"]]
    assert not lost, lost
    # Cut mid-stream: the client is told, with an error chunk and [DONE], never a silent end.
    assert all(s["variant"] == "kill@bf16" and s["error"] and s["done"] for s in running), running
    # Sent after the kill: served whole by the other rung (retried there before any byte, if sent to the dead one).
    assert all(s["done"] and not s["error"] and s["text_chunks"] >= 100 for s in after), after
    record("engine SIGKILL under streams", in_flight=STREAMS, sent_after=STREAMS, lost_before_first_byte=len(lost),
           in_flight_ended_with_error_chunk=sum(s["error"] and s["done"] for s in running),
           sent_after_served_by={v: sum(s["variant"] == v for s in after) for v in FAKES},
           moved_to_another_rung_before_any_byte=int(moved),
           all_answered_within_s=round(answered_s, 2))  # fmt: skip
