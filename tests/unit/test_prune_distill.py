"""distill's loss and training loop on tiny random Llamas built here (optimizers/distill.py), chains of methods
(optimizers/chain.py) and the registry's reuse of a chain's head. The handlers in the compression environment,
end to end, are tests/integration/test_handlers_tiny.py's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AutoModelForCausalLM

from optimizers.base import InvalidConfig, ModelInfo
from optimizers.distill import HISTORY, STATE, DistillConfig, distill, distill_loss, state_dir
from tests.unit.tiny_llamas import checkpoint, windows  # noqa: F401 - checkpoint is a fixture

def test_distill_loss_matches_a_hand_computed_value() -> None:
    student = torch.tensor([[[1.0, 0.0, -1.0]]])
    teacher = torch.tensor([[[0.0, 1.0, 0.0]]])
    t = 2.0
    p = [math.exp(v / t) for v in (0.0, 1.0, 0.0)]
    q = [math.exp(v / t) for v in (1.0, 0.0, -1.0)]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    # Hidden term: |s - h|^2 / |h|^2 per layer (means over elements), averaged over the two layers.
    s1, h1 = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[1.0, 0.0]]])
    s2, h2 = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[2.0, 2.0]]])
    hidden = ((0 + 4) / 2 / ((1 + 0) / 2) + (4 + 4) / 2 / ((4 + 4) / 2)) / 2  # (4.0 + 1.0) / 2
    total, got_kl, got_hidden = distill_loss(student, teacher, [s1, s2], [h1, h2], t, alpha=0.5, beta=3.0)
    assert got_kl == pytest.approx(kl, rel=1e-5)
    assert got_hidden == pytest.approx(hidden, rel=1e-6)
    assert float(total) == pytest.approx(0.5 * t * t * kl + 3.0 * hidden, rel=1e-5)
    # Identical distributions and states: zero.
    zero, kl0, h0 = distill_loss(teacher, teacher, [h1], [h1], t, 1.0, 1.0)
    assert (float(zero), kl0, h0) == (pytest.approx(0.0, abs=1e-7), pytest.approx(0.0, abs=1e-7), 0.0)
    assert F.softmax(student, -1).shape == student.shape


def _quick(**fields: object) -> DistillConfig:
    base = {"drop_layers": 1, "mlp_keep": 0.5, "steps": 40, "lr": 3e-3, "warmup_steps": 2, "seq_len": 32,
            "batch": 2, "eval_every": 10, "held_out": 0.25, "save_every_s": 1e-6}  # fmt: skip
    return DistillConfig(**{**base, **fields})


def test_a_short_distillation_lowers_the_student_s_loss(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / ".tiny@distill.tmp-1"
    out.mkdir()
    artifact = distill(_quick(), checkpoint, out, windows(8, 32))
    history = json.loads((out / HISTORY).read_text())
    losses = [r["loss"] for r in history["train"]]
    assert len(losses) == 40 and history["stopped_by"] == "steps"
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    held = history["held_out"]
    # Measured before training and every 10 steps (random tokens: what it says is SmolLM2's report's to judge).
    assert [r["step"] for r in held] == [0, 10, 20, 30, 40] and all(r["kl"] >= 0 for r in held), held
    assert (out / "distill-loss.png").read_bytes()[:4] == b"\x89PNG"
    # A smaller dense checkpoint in the source's dtype that loads as it is.
    saved = json.loads((out / "config.json").read_text())
    assert (saved["num_hidden_layers"], saved["intermediate_size"]) == (3, 64)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert next(student.parameters()).dtype == torch.bfloat16
    assert artifact.details["steps"] == 40 and artifact.calibration_samples == 6
    assert not state_dir(out).exists(), "the training state outlived a finished job"


def test_a_stopped_distillation_resumes_where_its_state_was_saved(checkpoint: Path, tmp_path: Path) -> None:
    first = tmp_path / ".tiny@distill.tmp-1"
    first.mkdir()
    # An attempt out of time before its first step: a student of the right shape, and no state left behind.
    distill(_quick(time_budget_s=1e-9, steps=40), checkpoint, first, windows(8, 32))
    stopped = json.loads((first / HISTORY).read_text())
    assert stopped["stopped_by"] == "time budget" and stopped["train"] == []
    state = state_dir(first)
    assert state == tmp_path / ".tiny@distill.distill-state"
    # What a job killed at step 30 leaves: its state, saved by the loop (here by the same function).
    config = _quick()
    student = AutoModelForCausalLM.from_pretrained(first).float()
    optimizer = torch.optim.AdamW(student.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    from optimizers.distill import _save_state

    history = {"train": [{"step": s, "loss": 1.0, "kl": 1.0, "hidden": 0.0} for s in range(1, 31)],
               "held_out": [{"step": 0, "ce": 1.0, "ppl": 2.7, "kl": 1.0}], "resumed_at": []}  # fmt: skip
    _save_state(state, student, optimizer, scheduler, 30, 5.0, history, config.fingerprint(), checkpoint)
    assert (state / STATE).is_file()
    second = tmp_path / ".tiny@distill.tmp-2"
    second.mkdir()
    distill(config, checkpoint, second, windows(8, 32))
    resumed = json.loads((second / HISTORY).read_text())
    assert resumed["resumed_at"] == [30] and len(resumed["train"]) == 40
    assert [r["step"] for r in resumed["train"][30:]] == list(range(31, 41))
    assert not state.exists()
    # Another config's state is not taken.
    _save_state(state, student, optimizer, scheduler, 30, 5.0, history, "another", checkpoint)
    third = tmp_path / ".tiny@distill.tmp-3"
    third.mkdir()
    distill(config, checkpoint, third, windows(8, 32))
    assert json.loads((third / HISTORY).read_text())["resumed_at"] == []


def test_a_chain_is_named_by_its_steps_and_takes_the_last_step_s_kernel_and_substitute() -> None:
    from optimizers.registry import make_config

    chained = make_config("distill+int8", {"steps": {"distill": {"steps": 5}}})
    assert (chained.method, chained.bits, chained.kernel, chained.needs_calibration) == ("distill+int8", 8, "w8a8", True)
    assert chained.parts()[0].steps == 5 and chained.parts()[1].method == "int8"
    # The registry stores the dump and makes the config again from it: the same job key.
    again = make_config(chained.method, chained.model_dump())
    assert again.fingerprint() == chained.fingerprint() != make_config("distill+int8").fingerprint()
    four = make_config("prune-structured+int4-gptq")
    assert (four.bits, four.kernel, four.substitute) == (4, "w4a16", "prune-structured+int4-ao")
    assert make_config("distill+int8-wo").substitute is None
    for bad, fragment in (("distill+int3", "unknown method 'int3'"), ("int8+int8", "each method once"),
                          ("distill+", "each method once")):  # fmt: skip
        with pytest.raises(InvalidConfig, match=fragment):
            make_config(bad)
    with pytest.raises(InvalidConfig, match="must map"):
        make_config("distill+int8", {"steps": {"awq": {}}})
    with pytest.raises(InvalidConfig, match="drop_layers"):
        make_config("distill+int8", {"steps": {"distill": {"drop_layers": -1}}})
    model = ModelInfo("LlamaForCausalLM", hidden_size=576, intermediate_size=1536, num_layers=30,
                      tie_word_embeddings=True)  # fmt: skip
    with pytest.raises(InvalidConfig, match="at least one must stay"):  # the first step is checked on the source
        make_config("distill+int8", {"steps": {"distill": {"drop_layers": 30}}}).check(model, "cpu")


def test_a_chain_splits_into_its_head_and_last_step() -> None:
    from optimizers.chain import split_last
    from optimizers.registry import make_config

    head, last = split_last(make_config("distill+int8", {"steps": {"distill": {"steps": 7}}}))
    assert head.fingerprint() == make_config("distill", {"steps": 7}).fingerprint() and last.method == "int8"
    head, last = split_last(make_config("prune-structured+distill+int8"))
    assert head.method == "prune-structured+distill" and last.method == "int8"


def test_the_builder_runs_only_the_last_step_on_a_head_it_built_already(tmp_path: Path) -> None:
    """server/registry/builder.py: `distill` and `distill+int8` registered together train once."""
    import time

    from optimizers.job import MANIFEST
    from optimizers.registry import make_config
    from server.registry.builder import built_head
    from server.registry.store import ModelRecord, Registry, VariantState

    registry = Registry(tmp_path / "registry.sqlite3")
    model = ModelRecord("m", "hf", "/src", "ab" * 32, "/src", "LlamaForCausalLM", 0.3, time.time())
    short, chained = make_config("distill", {"steps": 7}), make_config("distill+int8")
    registry.add_model(model, [("bf16", "base", 16, {}), ("distill", "distill", 16, short.model_dump()),
                               ("distill+int8", "distill+int8", 8, chained.model_dump())])  # fmt: skip
    def head_of(config):
        return built_head(registry, model, config)

    assert head_of(make_config("int8")) is None  # not a chain
    assert head_of(chained) is None  # its head not built
    artifact = tmp_path / "artifacts" / "k"
    artifact.mkdir(parents=True)
    registry.transition("m@distill", VariantState.COMPRESSING, artifact_key="k")
    registry.transition("m@distill", VariantState.EVALUATING, model_path=str(artifact), seconds_to_make=100.0)
    assert head_of(chained) is None  # no finished artifact on disk
    (artifact / MANIFEST).write_text("{}")
    assert head_of(chained) is None  # a `distill` of another config (7 steps) is not this chain's head
    head, last = head_of(make_config("distill+int8", {"steps": {"distill": {"steps": 7}}}))
    assert head.id == "m@distill" and last.method == "int8"


def test_the_admin_view_of_a_variant_carries_what_its_job_said_of_it(tmp_path: Path) -> None:
    """GET /admin/models: a variant's `details` come from its artifact's manifest (server/registry/service.py)."""
    from optimizers.job import MANIFEST
    from server.registry.service import variant_details

    (tmp_path / "artifacts" / "k").mkdir(parents=True)
    said = {"steps": 184, "held_out_ppl": "40.163 -> 22.457"}
    (tmp_path / "artifacts" / "k" / MANIFEST).write_text(json.dumps({"method": "distill", "details": said}))

    def details(key: str | None):
        return variant_details(tmp_path, key)

    assert details("k") == said
    assert details(None) is None and details("gone") is None
    (tmp_path / "artifacts" / "k" / MANIFEST).write_text("{not json")
    assert details("k") is None
