"""A build's progress: the job's layer forwards -> events -> phase, fraction and ETA -> API, CLI, metrics;
and the calibration's time budget, judged from the first layer's time."""

from __future__ import annotations

import pytest

from optimizers.progress import MIN_WINDOWS, LayerProgress, OverBudget, sized_windows
from server.cli_models import progress_note
from server.metrics import _progress_families
from server.registry.progress import BuildProgress, queued


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_layer_forwards_give_the_fraction_done_and_an_event_per_new_layer() -> None:
    clock, events = Clock(), []
    progress = LayerProgress(layers=4, windows=8, emit=lambda kind, **f: events.append((kind, f)),
                             interval_s=10, clock=clock)  # fmt: skip
    assert progress.fraction() == 0.0
    for _ in range(8):  # layer 0 calibrated: half its forwards
        progress.forward(0)
    assert progress.fraction() == pytest.approx(0.5 / 4)
    for _ in range(40):  # AWQ's search runs a layer more often: its share stops at 1
        progress.forward(0)
    assert progress.fraction() == pytest.approx(1 / 4)
    progress.forward(1)
    progress.forward(0)  # an earlier layer again says nothing new
    assert progress.fraction() == pytest.approx((1 + 1 / 16) / 4)
    # One event at each new layer; within a layer, none until interval_s has passed.
    assert [(f["layer"], f["fraction"]) for _, f in events] == [(1, round(1 / 64, 4)), (2, round(17 / 64, 4))]
    clock.now += 11
    progress.forward(1)
    assert events[-1] == (
        "progress",
        {"phase": "calibrating", "layer": 2, "layers": 4, "fraction": round(18 / 64, 4)},
    )


def test_the_eta_comes_from_the_rate_measured_in_the_phase() -> None:
    clock = Clock()
    builds = BuildProgress(min_fraction=0.05, clock=clock)
    builds.phase("m@int8", "compressing")
    builds.event("m@int8", {"event": "stage", "stage": "calibration-data"})
    assert builds.view("m@int8")["phase"] == "preparing calibration data"
    clock.now += 30
    builds.event(
        "m@int8", {"event": "progress", "phase": "calibrating", "layer": 1, "layers": 10, "fraction": 0.01}
    )
    assert builds.eta_s("m@int8") is None  # one point: no rate yet
    clock.now += 40
    builds.event(
        "m@int8", {"event": "progress", "phase": "calibrating", "layer": 3, "layers": 10, "fraction": 0.21}
    )
    # 0.2 in 40 s: 0.79 left takes 158 s; 8 s after the event, 150 s.
    clock.now += 8
    view = builds.view("m@int8")
    assert view == {"phase": "calibrating", "detail": "layer 3 of 10", "fraction": 0.21, "phase_elapsed_s": 48.0,
                    "elapsed_s": 78.0, "eta_s": 150.0}  # fmt: skip
    clock.now += 1000  # overdue: never a negative ETA
    assert builds.eta_s("m@int8") == 0.0


def test_no_eta_before_the_minimum_fraction_nor_for_phases_without_one() -> None:
    clock = Clock()
    builds = BuildProgress(min_fraction=0.05, clock=clock)
    builds.phase("m@awq", "compressing")
    builds.event("m@awq", {"event": "progress", "fraction": 0.0})
    clock.now += 10
    builds.event("m@awq", {"event": "progress", "fraction": 0.03})
    assert builds.eta_s("m@awq") is None
    builds.phase("m@awq", "asking the chat set")  # a new phase: its own clock, no fraction
    clock.now += 5
    assert builds.view("m@awq") == {"phase": "asking the chat set", "detail": None, "fraction": None,
                                    "phase_elapsed_s": 5.0, "elapsed_s": 15.0, "eta_s": None}  # fmt: skip
    builds.event("m@awq", {"event": "progress", "fraction": "half"})  # malformed: ignored
    assert builds.view("m@awq")["fraction"] is None
    builds.finish("m@awq")
    assert builds.view("m@awq") is None and builds.views() == {}


def test_the_cli_and_the_metrics_show_it() -> None:
    view = {"phase": "calibrating", "detail": "layer 12 of 30", "fraction": 0.37, "phase_elapsed_s": 100.0,
            "elapsed_s": 242.0, "eta_s": 200.0}  # fmt: skip
    assert progress_note(view) == "calibrating, layer 12 of 30, ████░░░░░░ 37%, ETA 3m 20s (4m 02s in)"
    assert (
        progress_note({**view, "detail": None, "fraction": None, "eta_s": None}) == "calibrating (4m 02s in)"
    )
    assert progress_note(None) == ""
    fraction, eta = _progress_families({"m@int8": view, "m@awq": {**view, "fraction": None, "eta_s": None}})
    assert [(s.labels, s.value) for s in fraction.samples] == [
        ({"variant": "m@int8", "phase": "calibrating"}, 0.37)
    ]
    assert [(s.labels, s.value) for s in eta.samples] == [
        ({"variant": "m@int8", "phase": "calibrating"}, 200.0)
    ]


def test_a_queued_variant_says_how_many_builds_run_before_it() -> None:
    assert queued(2, 61.04) == {"phase": "queued", "detail": "2 builds ahead", "fraction": None,
                                "phase_elapsed_s": 61.0, "elapsed_s": 61.0, "eta_s": None}  # fmt: skip
    assert queued(1, 0)["detail"] == "1 build ahead"
    assert progress_note(queued(1, 5)) == "queued, 1 build ahead (5s in)"


def _layer(progress: LayerProgress, index: int, clock: Clock, seconds: float) -> None:
    """One layer of the sequential pipeline: every window twice (calibrate, propagate), `seconds` in all."""
    for _ in range(2 * progress.windows):
        progress.forward(index)
        clock.now += seconds / (2 * progress.windows)


def test_the_first_layer_projects_the_calibration_and_past_its_budget_stops_it() -> None:
    clock = Clock()
    progress = LayerProgress(layers=30, windows=128, emit=lambda *a, **k: None, clock=clock, budget_s=300)
    _layer(progress, 0, clock, seconds=17.0)
    assert progress.projected_s() is None  # layer 0 not known done until layer 1 starts
    with pytest.raises(OverBudget) as over:
        progress.forward(1)
    assert over.value.first_layer_s == pytest.approx(17.0)
    assert over.value.projected_s == pytest.approx(510.0)
    assert over.value.windows == 128
    # 300 s with a 15% margin for the per-layer part that does not scale: 64 windows.
    assert sized_windows(128, over.value.projected_s, 300) == 64


def test_a_calibration_within_its_budget_or_without_one_runs_on() -> None:
    for budget in (600.0, None):
        clock = Clock()
        progress = LayerProgress(layers=30, windows=128, emit=lambda *a, **k: None, clock=clock, budget_s=budget)
        for layer in range(3):
            _layer(progress, layer, clock, seconds=17.0)
        assert progress.projected_s() == pytest.approx(510.0)
        assert progress.fraction() == pytest.approx(3 / 30)


@pytest.mark.parametrize(("windows", "projected", "budget", "expected"), [
    (128, 510.0, 300.0, 64),     # this AVX2 box's full-profile int8 under the default budget
    (128, 7200.0, 300.0, MIN_WINDOWS),  # two hours (an older CPU): the floor, not 4 windows
    (128, 200.0, 300.0, 128),    # already fits: never more than given
    (16, 30.0, 20.0, 8),         # even: prose and chat windows come in pairs
    (128, 0.0, 300.0, 128),      # nothing measured: unchanged
])  # fmt: skip
def test_sized_windows(windows: int, projected: float, budget: float, expected: int) -> None:
    assert sized_windows(windows, projected, budget) == expected


def test_the_budget_is_a_setting_and_part_of_the_artifact_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizers.job import DEFAULT_CALIBRATION_BUDGET_S, calibration_budget_s, calibration_tag
    from optimizers.registry import make_config

    int8, fp8 = make_config("int8", {}), make_config("fp8", {})
    monkeypatch.delenv("QUANTGATE_CALIBRATION_BUDGET_S", raising=False)
    assert calibration_budget_s() == DEFAULT_CALIBRATION_BUDGET_S
    default_tag = calibration_tag(int8, "full")
    monkeypatch.setenv("QUANTGATE_CALIBRATION_BUDGET_S", "120")
    assert calibration_budget_s() == 120.0
    assert calibration_tag(int8, "full") != default_tag and calibration_tag(int8, "full").endswith("/budget120s")
    assert calibration_tag(fp8, "full") == "none"  # calibrates on nothing: no budget in its key
    monkeypatch.setenv("QUANTGATE_CALIBRATION_BUDGET_S", "0")
    assert calibration_budget_s() is None and "budget" not in calibration_tag(int8, "full")
