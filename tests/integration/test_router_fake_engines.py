"""The latency-budget router in a real gateway process, over FakeEngines (processes speaking the
OpenAI protocol with set latencies; fakes only at that boundary). The gateway profiles them,
scrapes their vllm:* gauges and routes on what it measured, as it does with vLLM.

    fake@bf16   base, slow: 50 ms TTFT, 40 ms/token
    fake@int8   ppl +2 %, fast: 50 ms TTFT, 8 ms/token, 4 batch slots, slows down with batch
    fake@int4   ppl +20 %, 50 ms TTFT, 15 ms/token
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.fakes.fleet import fake_fleet
from tests.integration.gateway_process import API_KEY, GatewayProcess, admin, wait_for
from tests.integration.registry_steps import cli

FAKES = {
    "fake@bf16": {"tpot_ms": 40, "spec": {"method": "base"}},
    "fake@int8": {"tpot_ms": 8, "max_running": 4, "batch_slowdown": 0.5,
                  "spec": {"method": "int8", "bits": 8, "ppl_delta": 0.02, "size_bytes": 160}},
    "fake@int4": {"tpot_ms": 15, "spec": {"method": "int4-gptq", "bits": 4, "ppl_delta": 0.20, "size_bytes": 110,
                                          "max_in_flight": 2}},
}  # fmt: skip
# Two engines on one simulated GPU and one on another (the spec's `device`).
SHARED = {
    "dev@bf16": {"tpot_ms": 20, "spec": {"method": "base", "device": "gpu-0"}},
    "dev@int8": {"tpot_ms": 10, "spec": {"method": "int8", "bits": 8, "ppl_delta": 0.02, "device": "gpu-0"}},
    "dev@int4": {"tpot_ms": 10, "spec": {"method": "int4-gptq", "bits": 4, "ppl_delta": 0.2, "device": "gpu-1"}},
}  # fmt: skip
HELLO = [{"role": "user", "content": "hello"}]


@dataclass
class FakeFleet:
    gateway: GatewayProcess
    fakes: dict[str, str]  # variant id -> URL

    def configure(self, variant_id: str, **changes: object) -> None:
        httpx.post(f"{self.fakes[variant_id]}/fake/config", json=changes).raise_for_status()

    def stats(self, variant_id: str) -> dict:
        return httpx.get(f"{self.fakes[variant_id]}/fake/stats").json()

    def chat(self, max_tokens: int = 20, stream: bool = False, headers: dict | None = None,
             **body: object) -> httpx.Response:  # fmt: skip
        payload = {"model": "fake", "messages": HELLO, "max_tokens": max_tokens, "stream": stream, **body}
        return httpx.post(f"{self.gateway.url}/v1/chat/completions", json=payload, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})})


@pytest.fixture(scope="module")
def fleet() -> Iterator[FakeFleet]:
    routing = {"tiers": {"flex": {"policy": "reject"}}}
    with fake_fleet(FAKES, "router-fakes", QUANTGATE_ROUTING=json.dumps(routing),
                    QUANTGATE_LOAD_SCRAPE_INTERVAL_S="0.25") as (gateway, urls):
        yield FakeFleet(gateway, urls)


def test_profiles_measure_each_variant_s_own_speed_with_fake_engines(fleet: FakeFleet) -> None:
    rows = {r["variant"]: r for r in admin(fleet.gateway, "GET", "/admin/routing/fake").json()["variants"]}
    step = {v: {b: t for b, t in r["priors"]["step_ms"]} for v, r in rows.items()}
    assert step["fake@bf16"][1] == pytest.approx(40, rel=0.3)
    assert step["fake@int8"][1] == pytest.approx(8, rel=0.5)
    assert step["fake@int8"][16] > 2 * step["fake@int8"][1], "int8's batch slowdown was not measured"


@pytest.mark.parametrize(("budget_ms", "variant", "status"), [
    (None, "fake@bf16", "none"),
    ("5000", "fake@bf16", "met-predicted"),  # loose: the most accurate
    ("400", "fake@int8", "met-predicted"),  # tight: the fast one (bf16 needs ~810 ms for 20 tokens)
    ("20", "fake@int8", "degraded"),  # nothing fits: the fastest
])  # fmt: skip
def test_budget_picks_the_variant_with_fake_engines(fleet: FakeFleet, budget_ms: str | None, variant: str,
                                                    status: str) -> None:
    headers = {"x-latency-budget-ms": budget_ms} if budget_ms else {}
    response = fleet.chat(headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == variant
    assert response.headers["x-quantgate-variant"] == variant
    assert response.headers["x-quantgate-budget"] == status
    assert int(response.headers["x-quantgate-predicted-ms"]) > 0


def test_streamed_ttft_budget_and_body_budget_with_fake_engines(fleet: FakeFleet) -> None:
    streamed = fleet.chat(stream=True, headers={"x-llm-d-slo-tpot-ms": "20"})
    assert streamed.headers["x-quantgate-variant"] == "fake@int8" and "data: [DONE]" in streamed.text
    assert fleet.chat(latency_budget_ms=400).headers["x-quantgate-variant"] == "fake@int8"


def test_a_growing_queue_on_the_fast_variant_shifts_the_choice_with_fake_engines(fleet: FakeFleet) -> None:
    assert fleet.chat(headers={"x-latency-budget-ms": "400"}).headers["x-quantgate-variant"] == "fake@int8"

    async def flood() -> None:  # straight to the engine: the gateway learns of it only by scraping
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": "fake@int8", "prompt": "x", "max_tokens": 150}
            await asyncio.gather(*(http.post(f"{fleet.fakes['fake@int8']}/v1/completions", json=body)
                                   for _ in range(12)))  # fmt: skip

    def busy_then_route() -> str:
        wait_for(lambda: fleet.stats("fake@int8")["waiting"] >= 6, 10, 0.05)
        time.sleep(0.6)  # a scrape or two
        return fleet.chat(headers={"x-latency-budget-ms": "400"}).headers["x-quantgate-variant"]

    async def both() -> str:
        flooding = asyncio.create_task(flood())
        chosen = await asyncio.to_thread(busy_then_route)
        await flooding
        return chosen

    assert asyncio.run(both()) == "fake@int4"


def test_reject_policy_answers_429_with_retry_after_with_fake_engines(fleet: FakeFleet) -> None:
    response = fleet.chat(service_tier="flex", headers={"x-latency-budget-ms": "20"})
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "latency_budget_unmet"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    # flex without a budget: the cheapest variant within the floor, scheduled last in its engine
    served = fleet.chat(service_tier="flex")
    assert served.json()["model"] == "fake@int4" and served.json()["service_tier"] == "flex"
    assert fleet.stats("fake@int4")["priorities"][-1] == 10


def test_priority_tier_is_passed_to_the_engine_and_echoed_with_fake_engines(fleet: FakeFleet) -> None:
    response = fleet.chat(service_tier="priority")
    assert response.status_code == 200 and response.json()["service_tier"] == "priority"
    served = response.json()["model"]
    assert fleet.stats(served)["priorities"][-1] == -10
    assert "priority" not in json.dumps(fleet.chat().json()["choices"])


def test_retry_on_another_variant_before_the_first_byte_with_fake_engines(fleet: FakeFleet) -> None:
    fleet.configure("fake@int8", fail="500")
    try:
        for stream in (False, True):
            response = fleet.chat(stream=stream, headers={"x-latency-budget-ms": "400"})
            assert response.status_code == 200, response.text
            assert response.headers["x-quantgate-variant"] == "fake@int4"
        pinned = fleet.chat(model="fake@int8")  # a pinned variant is not rerouted
        assert pinned.status_code == 503
    finally:
        fleet.configure("fake@int8", fail=None)
    metrics = httpx.get(f"{fleet.gateway.url}/metrics").text
    assert 'quantgate_upstream_retries_total{model="fake",variant="fake@int8"} 2.0' in metrics, \
        [line for line in metrics.splitlines() if "retries_total" in line]


def test_pinned_variant_bypasses_routing_with_fake_engines(fleet: FakeFleet) -> None:
    response = fleet.chat(model="fake@bf16", headers={"x-latency-budget-ms": "50"})
    assert response.json()["model"] == "fake@bf16"
    assert response.headers["x-quantgate-budget"] == "none" and response.headers["x-quantgate-route"] == "pinned"


@pytest.mark.parametrize(("headers", "body", "param"), [
    ({"x-latency-budget-ms": "-1"}, {}, "x-latency-budget-ms"),
    ({"x-slo-tpot-ms": "fast"}, {}, "x-slo-tpot-ms"),
    ({}, {"latency_budget_ms": 0}, "latency_budget_ms"),
    ({}, {"service_tier": "scale"}, "service_tier"),
])  # fmt: skip
def test_bad_budgets_and_tiers_are_400_with_fake_engines(fleet: FakeFleet, headers: dict, body: dict,
                                                         param: str) -> None:
    response = fleet.chat(headers=headers, **body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_routing_metrics_and_the_openai_client_with_fake_engines(fleet: FakeFleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.gateway.url}/v1", api_key=API_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="fake", messages=HELLO, max_tokens=10, extra_headers={"x-latency-budget-ms": "400"})
    assert raw.parse().model == "fake@int8" and raw.headers["x-quantgate-budget"] == "met-predicted"
    metrics = httpx.get(f"{fleet.gateway.url}/metrics").text
    for fragment in ('quantgate_routing_decisions_total{model="fake",reason="within-budget",variant="fake@int8"}',
                     'quantgate_budget_outcomes_total{decision="met-predicted",model="fake",outcome="met",',
                     'quantgate_predictor_error_ratio_count{kind="e2e",variant="fake@int8"}',
                     'quantgate_engine_requests_running{variant="fake@int8"}',
                     'quantgate_budget_outcomes_total{decision="rejected",model="fake",outcome="rejected",'):
        assert fragment in metrics, fragment
    # openai-python's models.retrieve: GET /v1/models/{id} for a model and a variant, 404 for neither.
    assert client.models.retrieve("fake").variants == ["fake@bf16", "fake@int8", "fake@int4"]  # type: ignore[attr-defined]
    variant = client.models.retrieve("fake@int4")
    assert (variant.id, variant.object, variant.parent, variant.bits) == ("fake@int4", "model", "fake", 4)  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("fake@int3")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def _open_streams(stack: contextlib.ExitStack, gateway_url: str, model: str, count: int,
                  max_tokens: int = 200, messages: list[dict] = HELLO) -> None:
    """`count` streamed chats to `model` held open (headers received) until `stack` closes."""
    http = stack.enter_context(httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}))
    for _ in range(count):
        response = stack.enter_context(http.stream("POST", f"{gateway_url}/v1/chat/completions", json={
            "model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}))  # fmt: skip
        assert response.status_code == 200


def test_streams_before_their_first_token_are_prefills_ahead_with_fake_engines(fleet: FakeFleet) -> None:
    """The gateway counts a stream it has sent and seen no first token of as a prefill ahead of the next
    request on that engine (its prompt tokens too), and stops at the first token while it still decodes."""

    def load() -> dict:
        rows = admin(fleet.gateway, "GET", "/admin/routing/fake").json()["variants"]
        return next(r["load"] for r in rows if r["variant"] == "fake@bf16")

    long = [{"role": "user", "content": "word " * 800}]  # about 1,000 prompt tokens by the gateway's estimate
    fleet.configure("fake@bf16", prefill_ms_per_token=3.0)  # ~3 s to the first token
    try:
        with contextlib.ExitStack() as stack:
            _open_streams(stack, fleet.gateway.url, "fake@bf16", 2, max_tokens=300, messages=long)  # 12 s decoding
            before = load()
            assert before["in_flight"] == 2 and before["prefilling"] == 2, before
            assert 2 * 900 <= before["prefill_tokens"] <= 2 * 1200, before
            assert wait_for(lambda: load()["prefilling"] == 0, 15, 0.1), load()
            after = load()
            assert after["in_flight"] == 2 and after["prefill_tokens"] == 0, after
    finally:
        fleet.configure("fake@bf16", prefill_ms_per_token=0.0)
    assert wait_for(lambda: load()["in_flight"] == 0, 15, 0.2), load()


def test_overload_is_a_429_with_retry_after_before_the_engine_with_fake_engines(fleet: FakeFleet) -> None:
    """fake@int4 admits 2 requests at once (its spec's max_in_flight): a third pinned to it is a 429
    with Retry-After and never reaches it; routed requests go to the engines with room."""
    before = fleet.stats("fake@int4")["requests"]
    with contextlib.ExitStack() as stack:
        _open_streams(stack, fleet.gateway.url, "fake@int4", 2)
        refused = fleet.chat(model="fake@int4")
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "engines_at_capacity" and error["type"] == "rate_limit_error"
        assert "fake@int4: 2/2" in error["message"] and 1 <= int(refused.headers["retry-after"]) <= 60
        routed = fleet.chat(service_tier="flex")  # flex prefers int4, which has no room now
        assert routed.status_code == 200 and routed.json()["model"] != "fake@int4"
        assert fleet.stats("fake@int4")["requests"] == before + 2
    assert wait_for(lambda: fleet.chat(model="fake@int4").status_code == 200, 10, 0.2)


def test_engines_on_one_device_price_each_other_engines_on_another_do_not() -> None:
    with (fake_fleet(SHARED, "router-fakes-shared", QUANTGATE_LOAD_SCRAPE_INTERVAL_S="0.25") as (gateway, _),
          contextlib.ExitStack() as stack):
        _open_streams(stack, gateway.url, "dev@bf16", 1, max_tokens=1500)  # 30 s at 20 ms a token

        def view() -> dict[str, dict]:
            return {r["variant"]: r for r in admin(gateway, "GET", "/admin/routing/dev").json()["variants"]}

        def settled() -> bool:  # the profiles' last requests scraped away: only bf16's stream is running
            load = view()["dev@int8"]["load"]
            return load["running"] + load["waiting"] + load["in_flight"] == 0 and view()["dev@int4"]["load"][
                "running"] == 0
        assert wait_for(settled, 10, 0.2), view()
        rows = view()
        assert rows["dev@int8"]["load"]["device"] == "gpu-0" and rows["dev@int4"]["load"]["device"] == "gpu-1"
        assert rows["dev@int8"]["load"]["device_peers_busy"] == 1  # bf16 decodes on its GPU
        assert rows["dev@int4"]["load"]["device_peers_busy"] == 0
        int8 = rows["dev@int8"]["predicted"]
        assert int8["e2e_ms"] == pytest.approx(2 * int8["idle_e2e_ms"], rel=0.05)  # half the GPU's time
        int4 = rows["dev@int4"]["predicted"]
        assert int4["e2e_ms"] == pytest.approx(int4["idle_e2e_ms"], rel=0.05)


SIM_ROUTING = {"shared_device": {"evaluate_every_s": 0.25, "window_s": 5, "min_dwell_s": 0}}


def _simulated_device(tmp_path) -> dict:
    """Two FakeEngines on one simulated device (each token costs 1 + busy others times its own)."""
    device = tmp_path / "gpu-0"
    device.mkdir()
    return {
        "sim@bf16": {"tpot_ms": 20, "device_dir": str(device), "spec": {"method": "base", "device": "gpu-0"}},
        "sim@int8": {"tpot_ms": 8, "device_dir": str(device),
                     "spec": {"method": "int8", "bits": 8, "ppl_delta": 0.02, "device": "gpu-0"}},
    }  # fmt: skip


def test_rungs_of_one_simulated_device_take_turns_not_traffic_together(tmp_path) -> None:
    """Two FakeEngines simulate one device (each token costs 1 + busy others times its own). Under a
    steady mix of tight budgets (only int8 meets them: the base needs ~430 ms for 20 tokens alone) and
    loose ones (both meet them), the router makes int8 the device's active rung and sends the loose
    requests there too while the device is busy, instead of starting the base beside it."""
    with fake_fleet(_simulated_device(tmp_path), "router-fakes-sim", QUANTGATE_ROUTING=json.dumps(SIM_ROUTING),
                    QUANTGATE_LOAD_SCRAPE_INTERVAL_S="0.25") as (gateway, _):  # fmt: skip
        served: list[tuple[float, str, str]] = []  # (sent at, budget, variant)

        async def client(budget: str, until: float) -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                while time.monotonic() < until:
                    sent = time.monotonic()
                    r = await http.post(f"{gateway.url}/v1/chat/completions",
                                        json={"model": "sim", "messages": HELLO, "max_tokens": 20},
                                        headers={"Authorization": f"Bearer {API_KEY}",
                                                 "x-latency-budget-ms": budget})  # fmt: skip
                    assert r.status_code == 200, r.text
                    served.append((sent, budget, r.headers["x-quantgate-variant"]))

        async def load(seconds: float) -> None:
            until = time.monotonic() + seconds
            await asyncio.gather(*(client(b, until) for b in ("350", "350", "5000", "5000")))

        started = time.monotonic()
        asyncio.run(load(6))
        view = admin(gateway, "GET", "/admin/routing/sim").json()
        regime = {d["device"]: d for d in view["devices"]}["gpu-0"]
        assert regime["active"] == "sim@int8", regime
        rungs = {r["variant"]: r for r in regime["rungs"]}
        assert rungs["sim@int8"]["attainment"] > rungs["sim@bf16"]["attainment"], regime
        assert view["recommendation"]["gpu-0"]["resident"] == ["sim@int8"]
        assert view["recommendation"]["gpu-0"]["unload"] == ["sim@bf16"]
        shown = cli(gateway, "routing", "sim", timeout_s=60)
        assert shown.returncode == 0 and "keep sim@int8 only" in shown.stdout, shown.stdout + shown.stderr
        # Once the first evaluation has seen the traffic (a second in), loose requests stay on int8.
        loose = [v for at, b, v in served if b == "5000" and at > started + 1.5]
        assert len(loose) >= 10 and loose.count("sim@int8") >= 0.9 * len(loose), Counter(loose)
        assert all(v == "sim@int8" for at, b, v in served if b == "350" and at > started + 1.5)
        # Every switch of the active rung is counted, shown as a gauge and logged with its reason.
        metrics = httpx.get(f"{gateway.url}/metrics").text
        assert 'quantgate_active_rung{device="gpu-0",model="sim",variant="sim@int8"} 1.0' in metrics, metrics
        assert 'quantgate_active_rung{device="gpu-0",model="sim",variant="sim@bf16"} 0.0' in metrics, metrics
        switched = [line for line in metrics.splitlines() if line.startswith("quantgate_rung_switches_total{")]
        assert any('to="sim@int8"' in line and float(line.split()[-1]) >= 1 for line in switched), switched
        # (at no traffic the base is active: every rung meets every budget and it is the most accurate)
        assert "sim on gpu-0: active rung sim@bf16 -> sim@int8 (sim@int8 beat sim@bf16 by" in \
            gateway.log_path.read_text(), gateway.log_tail()


def test_pinned_traffic_counts_in_the_device_regime(tmp_path) -> None:
    """Requests pinned to a rung load the device like routed ones: with only pinned traffic (tight
    budgets, 4 at a time), the regime sees its rate and makes int8 active, so the first routed requests
    after it go to the rung that carries that load, not to the one chosen for an idle device."""
    with fake_fleet(_simulated_device(tmp_path), "router-fakes-pinned", QUANTGATE_ROUTING=json.dumps(SIM_ROUTING),
                    QUANTGATE_LOAD_SCRAPE_INTERVAL_S="0.25") as (gateway, _):  # fmt: skip
        idle = {d["device"]: d for d in admin(gateway, "GET", "/admin/routing/sim").json()["devices"]}["gpu-0"]
        assert idle["active"] == "sim@bf16" and idle["rate_rps"] == 0, idle

        async def client(until: float) -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                while time.monotonic() < until:
                    r = await http.post(f"{gateway.url}/v1/chat/completions",
                                        json={"model": "sim@int8", "messages": HELLO, "max_tokens": 20},
                                        headers={"Authorization": f"Bearer {API_KEY}",
                                                 "x-latency-budget-ms": "350"})  # fmt: skip
                    assert r.status_code == 200 and r.headers["x-quantgate-variant"] == "sim@int8", r.text

        async def load(seconds: float) -> None:
            until = time.monotonic() + seconds
            await asyncio.gather(*(client(until) for _ in range(4)))

        asyncio.run(load(3))
        regime = {d["device"]: d for d in admin(gateway, "GET", "/admin/routing/sim").json()["devices"]}["gpu-0"]
        assert regime["rate_rps"] > 1 and regime["active"] == "sim@int8", regime
        # A loose budget both rungs meet: the active rung takes it (on an idle regime, the base would).
        routed = httpx.post(f"{gateway.url}/v1/chat/completions",
                            json={"model": "sim", "messages": HELLO, "max_tokens": 20}, timeout=30,
                            headers={"Authorization": f"Bearer {API_KEY}", "x-latency-budget-ms": "5000"})
        assert routed.status_code == 200 and routed.headers["x-quantgate-variant"] == "sim@int8", routed.headers
