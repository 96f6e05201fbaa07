"""The load-test harness end to end on a tiny trace, against a gateway over FakeEngines (fakes only
at the engine boundary): every scenario runs at every load, records each request, and the report,
its headline and its plots are written. Checks the harness works, not how fast anything is."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from loadtests import bench, harness, predictor_ttft
from tests.fakes.fleet import fake_fleet
from tests.integration.gateway_process import ADMIN_KEY, API_KEY

FAKES = {
    "smoke@bf16": {"tpot_ms": 20, "ttft_ms": 30, "spec": {"method": "base"}},
    "smoke@int8": {"tpot_ms": 5, "ttft_ms": 10, "spec": {"method": "int8", "bits": 8, "ppl_delta": 0.02}},
}


def test_trace_is_seeded_and_scales_with_the_rate() -> None:
    spec = harness.TraceSpec(requests=50, seed=3, arrival="gamma")
    one, two = harness.make_trace(spec), harness.make_trace(spec)
    assert [(r.prompt, r.max_tokens, r.budget_factor, r.tier) for r in one] == \
        [(r.prompt, r.max_tokens, r.budget_factor, r.tier) for r in two]  # fmt: skip
    assert all(b.at_unit > a.at_unit for a, b in zip(one, one[1:], strict=False))
    assert {r.tier for r in one} <= {"default", "priority", "flex"}
    assert all(1 <= r.max_tokens <= spec.output_max for r in one)
    assert harness.percentile([1, 2, 3, 4], 0.5) == 2 and harness.percentile([], 0.5) is None


def test_predictor_ttft_rebuilds_what_was_prefilling_ahead_of_each_request() -> None:
    """loadtests.predictor_ttft: a request sent while another stream of the same engine had no first token
    finds that stream's prompt tokens ahead; one sent after it had its first token finds it decoding."""
    spec = harness.TraceSpec(requests=4, seed=5)
    trace = harness.make_trace(spec)

    def result(index: int, sent_at: float, ttft_ms: float, e2e_ms: float) -> dict:
        return {"index": index, "variant": "m@int8", "sent_at": sent_at, "ttft_ms": ttft_ms, "e2e_ms": e2e_ms,
                "predicted_ttft_ms": ttft_ms}  # fmt: skip

    run = {"seed": 5, "scenario": "pin:int8", "load": 1.0,
           "results": [result(0, 0.0, 100, 1000), result(1, 0.05, 100, 500), result(2, 0.5, 50, 200)]}  # fmt: skip
    rows = predictor_ttft.states({"trace": dataclasses.asdict(spec)}, run)
    assert rows[0].tolist() == [100, 100, trace[0].prompt_tokens, 0, 0]
    assert rows[1].tolist() == [100, 100, trace[1].prompt_tokens, trace[0].prompt_tokens, 0]
    assert rows[2].tolist() == [50, 50, trace[2].prompt_tokens, 0, 2]


SCENARIOS = (*bench.SCENARIOS, "singles")
EXPANDED = (*bench.SCENARIOS, "pin:bf16", "pin:int8")  # "singles": every ready variant pinned


def test_scenario_order_rotates_so_none_always_runs_last() -> None:
    orders = [bench.rotated(["pin:a", "pin:b", "router"], i) for i in range(3)]
    assert orders[0] == ["pin:a", "pin:b", "router"]
    assert {o[-1] for o in orders} == {"pin:a", "pin:b", "router"}
    assert all(sorted(o) == sorted(orders[0]) for o in orders)


def test_least_loaded_picks_the_variant_with_fewest_requests_in_flight() -> None:
    pick = bench.model_for("least-loaded", "m", "m@bf16", "m@int8", ["m@bf16", "m@int8"])
    first, second, third = pick(None), pick(None), pick(None)
    assert (first, second, third) == ("m@bf16", "m@int8", "m@bf16")
    pick.done("m@int8")
    assert pick(None) == "m@int8"
    with pytest.raises(SystemExit):
        bench.model_for("pin:fp8", "m", "m@bf16", "m@int8", ["m@bf16", "m@int8"])


def test_warmup_precedes_the_measured_requests_at_the_same_rate() -> None:
    spec = harness.TraceSpec(requests=50, seed=0)
    measured, warm = harness.make_trace(spec), harness.make_trace(harness.TraceSpec(requests=50, seed=7))
    sent, offset = bench.with_warmup(measured[:10], warm, rate=4.0, seconds=2.0)
    head = [r for r in sent if r.index < 0]
    assert offset == 2.0 and head and all(r.at_unit < 8.0 for r in head)  # 2 s at 4 req/s
    assert [r.index for r in sent if r.index >= 0] == list(range(10))
    assert [r.at_unit - 8.0 for r in sent if r.index >= 0] == pytest.approx([r.at_unit for r in measured[:10]])
    assert bench.with_warmup(measured[:10], warm, rate=4.0, seconds=0) == (measured[:10], 0.0)


def test_a_warmup_at_another_load_makes_the_run_a_step() -> None:
    # 3 s at 1 req/s, then the measured requests at 4 req/s: the head's arrivals are spaced as at 1 req/s.
    measured, warm = harness.make_trace(harness.TraceSpec(requests=20, seed=0)), harness.make_trace(
        harness.TraceSpec(requests=20, seed=7))
    sent, offset = bench.with_warmup(measured[:10], warm, rate=4.0, seconds=3.0, warmup_rate=1.0)
    head = [r for r in sent if r.index < 0]
    assert offset == 3.0
    assert [r.at_unit / 4.0 for r in head] == pytest.approx([r.at_unit for r in warm if r.at_unit < 3.0])
    assert [r.at_unit - 12.0 for r in sent if r.index >= 0] == pytest.approx([r.at_unit for r in measured[:10]])


def test_bench_runs_every_scenario_and_load_and_writes_its_report(tmp_path: Path) -> None:
    with fake_fleet(FAKES, "loadtest-smoke") as (gateway, _):
        args = bench.parser().parse_args([
            "--gateway", gateway.url, "--model", "smoke", "--label", "smoke", "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
            "--loads", "0.5,1.0", "--seconds-per-run", "1", "--capacity-s", "1", "--capacity-concurrency", "4",
            "--pause-s", "0", "--output-median", "8", "--output-max", "16", "--max-requests", "40",
            "--out", str(tmp_path), "--client-processes", "2", "--scenarios", ",".join(SCENARIOS),
            "--seeds", "0,1", "--idle-samples", "6", "--warmup-s", "0.5",
        ])  # fmt: skip
        bench.write(bench.run(args, gateway.url, tmp_path), tmp_path)
    report = json.loads((tmp_path / "bench-smoke.json").read_text())
    assert report["base"] == "smoke@bf16" and report["fastest"] == "smoke@int8"
    assert report["capacity_rps"] > 0
    # Budgets from the base's idle latency measured by the bench: the fake's 30 ms TTFT and 20 ms per token.
    fit = report["idle_fits"]["smoke@bf16"]
    assert 15 <= fit["itl_ms"] <= 60 and fit["samples"] == 6
    cells = [(seed, load) for seed in (0, 1) for load in (0.5, 1.0)]  # each runs every scenario, in turn first
    assert [(r["seed"], r["load"], r["scenario"]) for r in report["runs"]] == \
        [(seed, load, s) for i, (seed, load) in enumerate(cells) for s in bench.rotated(list(EXPANDED), i)]  # fmt: skip
    assert [r["scenario"] for r in report["runs"]][:: len(EXPANDED)] == list(EXPANDED[:4])
    assert report["warmup_s"] == 0.5
    for run in report["runs"]:
        assert run["errors"] == 0, run["error_statuses"]
        assert run["requests"] == len(run["results"]) >= 4
        assert sorted(r["index"] for r in run["results"]) == list(range(run["requests"]))  # no warm-up request
        assert all(r["ttft_ms"] is not None and r["budget_ms"] > 0 and r["met"] is not None for r in run["results"])
        expected = {"always-base": {"smoke@bf16"}, "always-fastest": {"smoke@int8"}, "pin:int8": {"smoke@int8"},
                    "pin:bf16": {"smoke@bf16"},
                    "round-robin": {"smoke@bf16", "smoke@int8"}}.get(run["scenario"])  # fmt: skip
        if expected:
            assert set(run["variants"]) == expected
    assert set(report["headline"]) == {"0.5", "1.0"}
    for headline in report["headline"].values():  # the best of always-*, pin:*, pooled over seeds, paired interval
        assert headline["seeds"] == [0, 1]
        assert headline["best_single"] in ("always-base", "always-fastest", "pin:bf16", "pin:int8")
        low, high = headline["goodput_ratio_ci95"]
        assert low is None or low <= headline["goodput_ratio"] <= high
    # The gateway's predictions against the client's measurements, per load and variant.
    errors = {(e["load"], e["variant"]): e for e in report["predictor_error"]}
    assert set(errors) == {(load, v) for load in (0.5, 1.0) for v in ("smoke@bf16", "smoke@int8")}
    assert all(e["e2e_abs_rel_error_p50"] is not None and e["requests"] > 0 for e in errors.values())
    markdown = (tmp_path / "bench-smoke.md").read_text()
    assert "| 1 | 1.0x | router |" in markdown and "Predictor error" in markdown
    for name in ("attainment", "goodput", "latency-cdf", "routing-mix", "tradeoff"):
        assert (tmp_path / f"bench-smoke-{name}.png").stat().st_size > 1000


def test_fake_throughput_bench_proxies_without_errors() -> None:
    from loadtests.overhead import fake_throughput

    rows = fake_throughput(seconds=2, concurrency=8)
    assert [r["stream"] for r in rows] == [True, False]
    for row in rows:
        assert row["errors"] == 0 and row["answered"] > 10
        assert row["requests_per_gateway_cpu_s"] > 0
