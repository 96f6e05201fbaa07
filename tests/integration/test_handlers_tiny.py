"""Each handler on a tiny random Llama built here, in the real compression environment:
the tensors it writes have the shapes and dtypes vLLM expects, and the config it records
round-trips."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from optimizers.job import read_manifest
from optimizers.registry import make_config
from server.jobs.compress import CompressionFailed, CompressionJob, run_compression
from server.models.embedded import ensure_checkpoint, find_bundled_gguf
from tests.integration.gateway_process import TEST_HOME
from tests.integration.tiny import HIDDEN, INTERMEDIATE
from tests.integration.tiny import tiny_llama as make_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama() -> Path:
    return make_tiny_llama()


def _compress(method: str, source: Path, out: Path, config: dict | None = None,
              events: list | None = None) -> dict:  # fmt: skip
    job = CompressionJob(method, source, out, profile="fast", device="cpu", config=tuple((config or {}).items()))
    on_event = events.append if events is not None else lambda event: None
    return asyncio.run(run_compression(job, out.parent / f"{method}.log", timeout_s=900, on_event=on_event))


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        slices = {k: handle.get_slice(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return {k: (str(s.get_dtype()), tuple(s.get_shape())) for k, s in slices.items()}


def test_int8_w8a8_tensors(tiny_llama: Path, tmp_path: Path) -> None:
    events: list[dict] = []
    manifest = _compress("int8", tiny_llama, tmp_path / "int8", events=events)
    # The job reports each decoder layer it calibrates (optimizers/progress.py), in order.
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["layer"] for e in progress] == sorted(e["layer"] for e in progress)
    assert {(e["phase"], e["layer"], e["layers"]) for e in progress} == {("calibrating", n, 2) for n in (1, 2)}
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] <= 1
    tensors = _tensors(tmp_path / "int8")
    assert tensors["model.layers.0.self_attn.q_proj.weight"] == ("I8", (HIDDEN, HIDDEN))
    assert tensors["model.layers.0.mlp.down_proj.weight"] == ("I8", (HIDDEN, INTERMEDIATE))
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"][1] == (HIDDEN, 1)
    quant = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    group = quant["config_groups"]["group_0"]
    assert (group["weights"]["num_bits"], group["input_activations"]["num_bits"]) == (8, 8)
    assert group["input_activations"]["dynamic"] is True
    assert quant["ignore"] == ["lm_head"]
    assert make_config("int8", manifest["config"]).fingerprint() == manifest["fingerprint"]


def test_a_calibration_over_its_time_budget_starts_again_on_fewer_windows(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # No first layer takes under 1 ms: the 16 windows of the fast profile project past the budget, and the
    # job calibrates again on the floor of 8 (optimizers/progress.py: sized_windows), to its end.
    monkeypatch.setenv("QUANTGATE_CALIBRATION_BUDGET_S", "0.001")
    events: list[dict] = []
    manifest = _compress("int8", tiny_llama, tmp_path / "int8", events=events)
    resized = [e for e in events if e["event"] == "stage" and e["stage"] == "calibration-resized"]
    assert len(resized) == 1
    assert (resized[0]["was"], resized[0]["windows"], resized[0]["budget_s"]) == (16, 8, 0.001)
    assert resized[0]["projected_s"] > 0.001
    assert (manifest["calibration_samples"], manifest["calibration_windows_offered"]) == (8, 16)
    assert manifest["calibration_budget_s"] == 0.001
    # The second run is the one saved: whole, and its progress reaches the end after the resize.
    after = [e for e in events[events.index(resized[0]):] if e["event"] == "progress"]
    assert after and after[-1]["fraction"] == 1.0
    assert _tensors(tmp_path / "int8")["model.layers.1.mlp.down_proj.weight"] == ("I8", (HIDDEN, INTERMEDIATE))


@pytest.mark.parametrize(("method", "symmetric"), [("int4-gptq", True), ("awq", False)])
def test_w4a16_group_tensors(method: str, symmetric: bool, tiny_llama: Path, tmp_path: Path) -> None:
    manifest = _compress(method, tiny_llama, tmp_path / method)
    tensors = _tensors(tmp_path / method)
    # 8 int4 values packed per int32; one scale per 64 input columns.
    assert tensors["model.layers.1.mlp.down_proj.weight_packed"] == ("I32", (HIDDEN, INTERMEDIATE // 8))
    assert tensors["model.layers.1.mlp.down_proj.weight_scale"][1] == (HIDDEN, INTERMEDIATE // 64)
    assert ("model.layers.1.mlp.down_proj.weight_zero_point" in tensors) is (not symmetric)
    weights = json.loads((tmp_path / method / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 64, symmetric)
    assert read_manifest(tmp_path / method) == manifest
    assert manifest["size_bytes"] > 0


def test_int4_gptq_ao_writes_gptq_s_4_bit_values_dense_for_int4_ao_to_load(tiny_llama: Path, tmp_path: Path) -> None:
    """optimizers/int4_gptq_ao.py: a dense checkpoint whose every decoder-linear group of 64 holds at most 16
    values (GPTQ's levels), most of them spanning their group's min..max in 15 equal steps, served with
    int4-ao's engine arguments (HQQ's fit at load)."""
    import torch

    manifest = _compress("int4-gptq-ao", tiny_llama, tmp_path / "g")
    assert manifest["on_load"] is False and manifest["model_path"] == "."
    args = manifest["engine_args"]
    assert args[args.index("--quantization") + 1] == "torchao" and "hqq" in args[args.index("--hf-overrides") + 1]
    assert "quantization_config" not in json.loads((tmp_path / "g" / "config.json").read_text())
    weights = _weights(tmp_path / "g")
    source = _weights(tiny_llama)
    on_grid = total = 0
    for name, weight in weights.items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            assert weight.equal(source[name]), name  # embeddings and norms untouched
            continue
        groups = weight.float().reshape(-1, 64)
        assert max(len(torch.unique(g)) for g in groups) <= 16, name
        low, high = groups.min(-1, keepdim=True).values, groups.max(-1, keepdim=True).values
        steps = (groups - low) / ((high - low) / 15).clamp_min(1e-12)
        on_grid += int(((steps - steps.round()).abs().amax(-1) < 0.1).sum())
        total += groups.shape[0]
        assert not weight.equal(source[name]), name  # quantized
    assert on_grid / total > 0.7, (on_grid, total)
    assert manifest["details"]["quantized_layers"] == 14


def test_a_finished_variant_is_reused(tiny_llama: Path, tmp_path: Path) -> None:
    first = _compress("int4-gptq", tiny_llama, tmp_path / "v")
    events: list[dict] = []
    job = CompressionJob("int4-gptq", tiny_llama, tmp_path / "v", profile="fast", device="cpu")
    again = asyncio.run(run_compression(job, tmp_path / "again.log", timeout_s=300, on_event=events.append))
    assert again == first
    assert {"event": "stage", "stage": "cached"} in events


@pytest.mark.parametrize(("method", "config", "kind", "fragment"), [
    ("int4-gptq", {"group_size": 128}, "invalid_config", "group_size=128 does not divide"),
    ("int4-gptq", {"bits": 3}, "invalid_config", "bits: Extra inputs are not permitted"),
    ("fp8", {}, "unsupported", "fp8 is refused on CPU"),
    ("bnb-nf4", {}, "unsupported", "bnb-nf4 is refused on CPU"),
])  # fmt: skip
def test_refused_jobs_fail_fast_and_leave_nothing(method: str, config: dict, kind: str, fragment: str,
                                                  tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressionFailed) as info:
        _compress(method, tiny_llama, tmp_path / "out", config)
    assert info.value.kind == kind
    assert fragment in info.value.message
    assert list(tmp_path.glob("*out*")) == []


def test_timeout_kills_the_job_and_leaves_no_half_variant(tiny_llama: Path, tmp_path: Path) -> None:
    job = CompressionJob("awq", tiny_llama, tmp_path / "slow", profile="fast", device="cpu")
    with pytest.raises(CompressionFailed) as info:
        asyncio.run(run_compression(job, tmp_path / "slow.log", timeout_s=3))
    assert info.value.kind == "timeout"
    assert [p.name for p in tmp_path.iterdir() if "slow" in p.name] == ["slow.log"]


def test_calibration_mixes_prose_and_chat_and_never_touches_evaluation() -> None:
    from transformers import AutoTokenizer

    from optimizers.data import PROFILES, tokenized_split

    base = ensure_checkpoint(find_bundled_gguf(), TEST_HOME / "checkpoints", TEST_HOME / "logs")
    tokenizer = AutoTokenizer.from_pretrained(base)
    plain = tokenized_split(str(base), PROFILES["fast"], chat_calibration=False)
    mixed = tokenized_split(str(base), PROFILES["fast"])
    assert mixed.evaluation == plain.evaluation
    assert mixed.calibration[0::2] == plain.calibration[0::2]
    for window in mixed.calibration[1::2]:
        assert tokenizer.decode(window).startswith("<|im_start|>system")
        assert len(window) == PROFILES["fast"].calibration_tokens
    # Chat windows re-cast calibration prose only: no evaluation token sequence leaks in.
    eval_text = tokenizer.decode(plain.evaluation[0])
    assert all(eval_text[:200] not in tokenizer.decode(w) for w in mixed.calibration)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_prune_2of4_zeroes_two_of_every_four_weights_of_the_decoder(tiny_llama: Path, tmp_path: Path) -> None:
    manifest = _compress("prune-2of4", tiny_llama, tmp_path / "p24")
    weights, source = _weights(tmp_path / "p24"), _weights(tiny_llama)
    projections = [k for k in weights if k.endswith("_proj.weight")]
    assert len(projections) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for key in projections:
        groups = weights[key].reshape(-1, 4)  # 4 consecutive input weights of an output row
        assert bool(((groups == 0).sum(dim=1) >= 2).all()), key
    # Embeddings, norms and (tied or not) lm_head stay as they were; the checkpoint keeps its dtype.
    for key in weights:
        if key not in projections:
            assert weights[key].equal(source[key]), key
        assert weights[key].dtype == source[key].dtype, key
    details = manifest["details"]
    assert details["pattern"] == "2:4" and details["decoder_linear_sparsity"] >= 0.5
    assert details["format"].startswith("dense")
    assert "quantization_config" not in json.loads((tmp_path / "p24" / "config.json").read_text())


def test_prune_magnitude_zeroes_the_smallest_weights_of_each_decoder_linear(tiny_llama: Path, tmp_path: Path) -> None:
    manifest = _compress("prune-magnitude", tiny_llama, tmp_path / "pm", config={"sparsity": 0.3})
    weights, source = _weights(tmp_path / "pm"), _weights(tiny_llama)
    for key, tensor in weights.items():
        if not key.endswith("_proj.weight"):
            assert tensor.equal(source[key]), key
            continue
        zeroed = tensor == 0
        assert abs(float(zeroed.float().mean()) - 0.3) < 0.01, key
        # Exactly the smallest: every zeroed weight was no larger in magnitude than every kept one.
        original = source[key].abs()
        assert float(original[zeroed].max()) <= float(original[~zeroed].min()), key
    assert manifest["details"]["pattern"] == "unstructured"
    assert abs(manifest["details"]["decoder_linear_sparsity"] - 0.3) < 0.01
    assert manifest["calibration_samples"] == 0


def test_prune_structured_and_distill_write_smaller_checkpoints_with_their_record(tiny_llama: Path,
                                                                                 tmp_path: Path) -> None:
    """Both through the real job in the compression environment (optimizers/prune_structured.py,
    optimizers/distill.py): a smaller dense checkpoint with a consistent config, the manifest saying what was
    removed, and for distill its training record, loss curve and progress events."""
    pruned = _compress("prune-structured", tiny_llama, tmp_path / "ps", config={"drop_layers": 1, "mlp_keep": 0.5})
    config = json.loads((tmp_path / "ps" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (1, INTERMEDIATE // 2)
    assert _tensors(tmp_path / "ps")["model.layers.0.mlp.down_proj.weight"] == ("BF16", (HIDDEN, INTERMEDIATE // 2))
    assert "model.layers.1.mlp.down_proj.weight" not in _tensors(tmp_path / "ps")
    assert pruned["details"]["layers"] == "2 -> 1" and pruned["size_bytes"] > 0
    assert "quantization_config" not in config

    events: list[dict] = []
    manifest = _compress("distill", tiny_llama, tmp_path / "ds", events=events,
                         config={"drop_layers": 0, "mlp_keep": 0.5, "steps": 6, "eval_every": 3, "seq_len": 64})
    steps = [e for e in events if e["event"] == "progress" and e["phase"] == "distilling"]
    assert steps and steps[-1]["fraction"] == 1.0 and steps[-1]["steps"] == 6, steps
    out = tmp_path / "ds"
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == INTERMEDIATE // 2
    history = json.loads((out / "distill-history.json").read_text())
    assert len(history["train"]) == 6 and [r["step"] for r in history["held_out"]] == [0, 3, 6]
    assert (out / "distill-loss.png").is_file()
    details = manifest["details"]
    assert details["steps"] == 6 and details["stopped_by"] == "steps" and " -> " in details["held_out_ppl"]
    assert not list(tmp_path.glob(".*distill-state")), "the training state outlived the job"


def test_a_chain_quantizes_the_pruned_student(tiny_llama: Path, tmp_path: Path) -> None:
    """`prune-structured+int8` (optimizers/chain.py): int8's W8A8 tensors at the student's shapes, one
    directory, each step's record in the manifest."""
    manifest = _compress("prune-structured+int8", tiny_llama, tmp_path / "chain",
                         config={"steps": {"prune-structured": {"drop_layers": 1, "mlp_keep": 0.5}}})
    tensors = _tensors(tmp_path / "chain")
    assert tensors["model.layers.0.mlp.down_proj.weight"] == ("I8", (HIDDEN, INTERMEDIATE // 2))
    assert "model.layers.1.self_attn.q_proj.weight" not in tensors
    config = json.loads((tmp_path / "chain" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["quantization_config"]["ignore"] == ["lm_head"]
    assert manifest["method"] == "prune-structured+int8" and manifest["bits"] == 8
    assert set(manifest["details"]["steps"]) == {"prune-structured", "int8"}
    assert manifest["details"]["steps"]["prune-structured"]["layers"] == "2 -> 1"
    assert not (tmp_path / "chain" / ".steps").exists()
