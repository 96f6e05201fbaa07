"""optimizers/merge.py: SLERP and linear merges against hand-computed values, mergekit's schedules, and whole
checkpoints of tiny Llamas (a merge of a model with itself, two different ones, mismatched ones refused)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from optimizers.chat_quality import ChatGate, ChatScore
from optimizers.merge import (
    MergeError,
    check_compatible,
    check_schedule,
    evaluate,
    layer_position,
    linear,
    main,
    merge_checkpoints,
    slerp,
)
from server.registry.merging import ParentScore, judge_merge
from tests.unit.tiny_llamas import checkpoint, llama  # noqa: F401 - a fixture


def test_orthogonal_unit_vectors_meet_halfway_on_the_circle() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = slerp(0.5, a, b)
    assert torch.allclose(half, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    third = slerp(1 / 3, a, b)  # 30 degrees along the quarter circle
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    assert torch.linalg.vector_norm(slerp(0.77, a, b)).item() == pytest.approx(1.0, abs=1e-6)


def test_the_ends_return_the_inputs_exactly() -> None:
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.equal(slerp(1.0, a, b), b)


def test_magnitudes_are_interpolated_linearly_and_directions_on_the_sphere() -> None:
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    half = slerp(0.5, a, b)
    assert torch.linalg.vector_norm(half).item() == pytest.approx(3.0, abs=1e-6)  # (2 + 4) / 2
    assert torch.allclose(half / 3.0, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)


def test_parallel_and_opposite_vectors_fall_back_to_linear_interpolation() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    parallel = slerp(0.25, a, 3 * a)  # sin(theta) = 0: the spherical formula divides by zero
    assert torch.allclose(parallel, 0.75 * a + 0.25 * 3 * a)
    opposite = slerp(0.5, a, -a)
    assert torch.allclose(opposite, torch.zeros(3))
    nearly = a + torch.tensor([1e-4, 0.0, 0.0])
    assert torch.isfinite(slerp(0.5, a, nearly)).all()
    zero = slerp(0.5, torch.zeros(3), a)  # no direction to follow
    assert torch.allclose(zero, 0.5 * a)


def test_a_tensor_is_interpolated_whole_in_its_own_dtype() -> None:
    a, b = torch.randn(4, 3).bfloat16(), torch.randn(4, 3).bfloat16()
    merged = slerp(0.5, a, b)
    assert merged.dtype == torch.bfloat16 and merged.shape == (4, 3)
    x, y = a.float().flatten(), b.float().flatten()
    theta = torch.arccos(torch.dot(x / x.norm(), y / y.norm()))
    expected = (torch.sin(theta / 2) / torch.sin(theta)) * (x / x.norm() + y / y.norm()) * (x.norm() + y.norm()) / 2
    assert torch.allclose(merged.float().flatten(), expected, atol=2e-2)
    with pytest.raises(MergeError, match="shapes differ"):
        slerp(0.5, torch.zeros(2, 3), torch.zeros(3, 2))


def test_linear_is_the_normalized_weighted_mean() -> None:
    tensors = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([3.0, 3.0])]
    assert torch.allclose(linear(tensors, [1, 1, 2]), torch.tensor([1.75, 1.75]))


def test_schedules_follow_mergekit() -> None:
    # A gradient over the layers, interpolated between its points (mergekit's evaluate_setting).
    assert evaluate([0.0, 1.0], "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate([0.0, 0.5, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)
    filters = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.9}, {"value": 0.3}]
    assert evaluate(filters, "model.layers.0.self_attn.q_proj.weight", 1.0) == pytest.approx(1.0)
    assert evaluate(filters, "model.layers.0.mlp.up_proj.weight", 0.0) == pytest.approx(0.9)
    assert evaluate(filters, "model.norm.weight", 0.0) == pytest.approx(0.3)
    assert evaluate([{"filter": "mlp", "value": 0.9}], "model.norm.weight", 0.0) is None
    assert layer_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_position("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_position("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_position("model.embed_tokens.weight", 5) == 0.0


@pytest.mark.parametrize("bad", [1.5, -0.1, True, [], [0.2, "x"], [{"filter": "mlp"}], [{"value": 2}], "0.5",
                                 [{"filter": 3, "value": 0.5}]])  # fmt: skip
def test_bad_schedules_are_refused(bad: object) -> None:
    with pytest.raises(MergeError):
        check_schedule(bad)


def _save(model: LlamaForCausalLM, path: Path, source: Path) -> Path:
    model.to(torch.bfloat16).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((source / name).read_bytes())
    return path


def test_a_model_merged_with_itself_is_the_same_model(checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "self"
    record = merge_checkpoints([checkpoint, checkpoint], out, "slerp", 0.5)
    original, merged = load_file(str(checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == merged.keys()
    for name, tensor in original.items():
        assert torch.equal(merged[name], tensor), name
    assert record["linear_fallbacks"] == len(original)  # identical tensors: parallel, so linear
    assert (out / "tokenizer.json").is_file() and json.loads((out / "merge.json").read_text())["method"] == "slerp"


def test_two_different_models_merge_per_tensor_and_load(checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    other = _save(llama(seed=5), tmp_path / "other", checkpoint)
    out = tmp_path / "merged"
    schedule = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]
    merge_checkpoints([checkpoint, other], out, "slerp", schedule)
    a, b = load_file(str(checkpoint / "model.safetensors")), load_file(str(other / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(merged[name].float(), slerp(0.5, a[name], b[name]).float())
    first, last = "model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"
    assert torch.equal(merged[first], a[first]) and torch.equal(merged[last], b[last])  # t = 0 and t = 1
    model = LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    averaged = tmp_path / "avg"
    merge_checkpoints([checkpoint, other, checkpoint], averaged, "linear", weights=[1, 2, 1])
    mean = load_file(str(averaged / "model.safetensors"))[name].float()
    assert torch.allclose(mean, (a[name].float() + b[name].float()) / 2, atol=1e-2)


def test_checkpoints_of_other_shapes_are_refused_by_name(checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    deeper = _save(llama(layers=5), tmp_path / "deeper", checkpoint)
    with pytest.raises(MergeError, match="num_hidden_layers"):
        check_compatible([checkpoint, deeper], "slerp")
    wider = _save(llama(intermediate=96), tmp_path / "wider", checkpoint)
    with pytest.raises(MergeError, match="intermediate_size"):
        check_compatible([checkpoint, wider], "slerp")
    with pytest.raises(MergeError, match="exactly two"):
        check_compatible([checkpoint, checkpoint, checkpoint], "slerp")
    with pytest.raises(MergeError, match="weights"):
        check_compatible([checkpoint, checkpoint], "linear", [1.0])
    with pytest.raises(MergeError, match="config.json"):
        check_compatible([checkpoint, tmp_path], "linear")


def test_the_job_reports_a_refusal_as_an_event(checkpoint: Path, tmp_path: Path,  # noqa: F811
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    deeper = _save(llama(layers=5), tmp_path / "deeper", checkpoint)
    assert main([str(checkpoint), str(deeper), "--out", str(tmp_path / "x")]) == 2
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["event"] == "error" and "num_hidden_layers" in event["message"]
    assert not (tmp_path / "x").exists()
    assert main([str(checkpoint), str(checkpoint), "--out", str(tmp_path / "y"), "--t", "[0.2, 0.8]"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["event"] == "done"


def _score(correct: int, loops: int = 0, prompts: int = 49) -> ChatScore:
    return ChatScore(answers=tuple(f"answer {i}" for i in range(prompts)), correct=correct, loops=loops,
                     prompts=prompts)  # fmt: skip


def test_a_merged_model_is_judged_against_its_better_parent() -> None:
    """The SmolLM2 merge of loadtests/results/2026-12-08/merge.md: 11.587 and 40/49 against parents 11.348/44 and
    12.498/34. The better parent (A) is the reference: within the +30% floor and 6 fewer facts, it passes."""
    gate = ChatGate()
    a, b = ParentScore("a", 11.348, _score(44)), ParentScore("b", 12.498, _score(34))
    merged = ChatScore(answers=a.chat.answers, correct=40, loops=0, prompts=49)
    assert judge_merge(11.587, merged, [b, a], 0.30, gate) == (None, a)
    reason, parent = judge_merge(11.587, _score(37), [b, a], 0.30, gate)  # 7 fewer than A's: out
    assert parent == a and reason.startswith("against its parent a: chat: 37/49"), reason
    reason, _ = judge_merge(15.0, merged, [a, b], 0.30, gate)
    assert reason == "ppl delta +32.2% against its parent a exceeds the model's floor of +30.0%"
    assert judge_merge(99.0, merged, [], 0.30, gate) == (None, None)  # no parent measured: nothing to judge by
