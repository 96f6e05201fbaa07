"""prune-structured's bookkeeping and distill's loss and training loop, on tiny random Llamas built here
(optimizers/prune_structured.py, optimizers/distill.py). The handlers in the compression environment,
end to end, are tests/integration/test_handlers_tiny.py's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimizers.base import InvalidConfig, ModelInfo
from optimizers.distill import HISTORY, STATE, DistillConfig, distill, distill_loss, state_dir
from optimizers.prune_structured import (
    Importance,
    PruneStructuredConfig,
    kept_channels,
    kept_heads,
    measure_importance,
    prune,
    prune_model,
)

VOCAB = 256


def _llama(layers: int = 4, intermediate: int = 128, seed: int = 0, heads: int = 4,
           kv_heads: int = 2) -> LlamaForCausalLM:  # fmt: skip
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny bf16 checkpoint with the bundled model's tokenizer files absent: handlers copy the source's."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path / "tiny"
    _llama().to(torch.bfloat16).save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(path)
    return path


def _windows(n: int, length: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (n, length), generator=generator).tolist()


def test_kept_channels_round_to_a_multiple_of_32_and_never_grow() -> None:
    assert kept_channels(1536, 0.75) == 1152
    assert kept_channels(1536, 0.5) == 768
    assert kept_channels(100, 0.9) == 96
    assert kept_channels(64, 0.01) == 32  # the floor
    assert kept_channels(40, 1.0) == 40  # never more than there are


def test_configs_that_remove_nothing_or_everything_are_refused() -> None:
    model = ModelInfo("LlamaForCausalLM", hidden_size=576, intermediate_size=1536, num_layers=30,
                      tie_word_embeddings=True)  # fmt: skip
    PruneStructuredConfig(drop_layers=4, mlp_keep=0.75).check(model, "cpu")
    with pytest.raises(InvalidConfig, match="at least one must stay"):
        PruneStructuredConfig(drop_layers=30).check(model, "cpu")
    with pytest.raises(InvalidConfig, match="remove nothing"):
        PruneStructuredConfig(drop_layers=0, mlp_keep=1.0).check(model, "cpu")
    with pytest.raises(InvalidConfig, match="at least one must stay"):
        DistillConfig(drop_layers=31).check(model, "cpu")


def test_the_lowest_block_influence_layers_go_and_the_rest_keep_their_weights_and_order() -> None:
    model, reference = _llama(layers=5), _llama(layers=5)
    channels = [torch.arange(128, dtype=torch.float32) for _ in range(5)]
    details = prune_model(model, Importance([0.5, 0.1, 0.9, 0.05, 0.7], channels), drop_layers=2, mlp_keep=1.0)
    assert details["dropped_layers"] == [1, 3] and details["kept_layers"] == [0, 2, 4]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    for new, old in zip(model.model.layers, (0, 2, 4), strict=True):
        original = reference.model.layers[old]
        assert new.self_attn.q_proj.weight.equal(original.self_attn.q_proj.weight)
        # Grouped KV heads untouched: 2 KV heads of 16 (64 / 4 heads) dims.
        assert new.self_attn.k_proj.weight.shape == (2 * 16, 64)
        assert new.mlp.down_proj.weight.equal(original.mlp.down_proj.weight)
    # The pruned model is its own forward: no layer of the original is run (a generate with a cache works too).
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 4, VOCAB)
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_kept_mlp_channels_compute_what_they_computed_before() -> None:
    """The pruned MLP's output equals the original MLP's with the dropped channels' activations zeroed."""
    model, reference = _llama(layers=2), _llama(layers=2)
    scores = [torch.rand(128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    prune_model(model, Importance([0.5, 0.5], scores), drop_layers=0, mlp_keep=0.5)
    assert model.config.intermediate_size == 64
    x = torch.randn(3, 64)
    for layer, original, score in zip(model.model.layers, reference.model.layers, scores, strict=True):
        mlp, ref = layer.mlp, original.mlp
        assert mlp.gate_proj.weight.shape == (64, 64) and mlp.down_proj.weight.shape == (64, 64)
        keep = torch.topk(score, 64).indices
        mask = torch.zeros(128)
        mask[keep] = 1.0
        expected = ref.down_proj(ref.act_fn(ref.gate_proj(x)) * ref.up_proj(x) * mask)
        with torch.no_grad():
            assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_importance_is_measured_from_the_model_s_own_activations() -> None:
    model = _llama(layers=3)
    # Layer 1's MLP and attention outputs scaled to nearly nothing: it barely turns the residual stream.
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
        # One channel of layer 0 writes ten times more than any other.
        model.model.layers[0].mlp.down_proj.weight[:, 7].mul_(10.0)
    importance = measure_importance(model, _windows(4, 16))
    assert len(importance.block_influence) == 3
    assert min(range(3), key=lambda i: importance.block_influence[i]) == 1
    assert all(0.0 <= b <= 2.0 for b in importance.block_influence)
    assert int(importance.channels[0].argmax()) == 7


def test_kept_heads_respect_the_kv_groups() -> None:
    assert kept_heads(9, 3, 0.67) == (6, 3)  # SmolLM2-135M: 2 of each group's 3 query heads
    assert kept_heads(9, 3, 0.1) == (3, 3)  # at least one query head a group, every KV head stays
    assert kept_heads(32, 8, 0.5) == (16, 8)
    assert kept_heads(32, 8, 1.0) == (32, 8)
    assert kept_heads(12, 12, 0.5) == (6, 6)  # no grouping: whole heads, K and V with them
    assert kept_heads(12, 12, 0.01) == (1, 1)


def test_heads_keep_needs_the_head_counts_and_counts_as_removing_something() -> None:
    unknown = ModelInfo("LlamaForCausalLM", hidden_size=576, intermediate_size=1536, num_layers=30,
                        tie_word_embeddings=True)  # fmt: skip
    with pytest.raises(InvalidConfig, match="head counts"):
        PruneStructuredConfig(drop_layers=0, mlp_keep=1.0, heads_keep=0.5).check(unknown, "cpu")
    known = ModelInfo("LlamaForCausalLM", hidden_size=576, intermediate_size=1536, num_layers=30,
                      tie_word_embeddings=True, num_heads=9, num_kv_heads=3)  # fmt: skip
    PruneStructuredConfig(drop_layers=0, mlp_keep=1.0, heads_keep=0.67).check(known, "cpu")
    with pytest.raises(InvalidConfig, match="remove nothing"):  # 0.9 of 3 rounds to all 3
        PruneStructuredConfig(drop_layers=0, mlp_keep=1.0, heads_keep=0.9).check(known, "cpu")
    DistillConfig(drop_layers=0, mlp_keep=1.0, heads_keep=0.67).check(known, "cpu")


def _o_proj_inputs(model: LlamaForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention output before o_proj (every head's slice side by side)."""
    seen: list[torch.Tensor] = []
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
               for layer in model.model.layers]  # fmt: skip
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize(("heads", "kv_heads", "keep", "expected"), [(4, 2, 0.5, (2, 2)), (4, 4, 0.5, (2, 2))])
def test_kept_heads_compute_what_they_computed_before(heads: int, kv_heads: int, keep: float,
                                                      expected: tuple[int, int], tmp_path: Path) -> None:  # fmt: skip
    """Grouped (4 query heads on 2 KV heads) and not (4 on 4): the first layer's kept heads' outputs are the
    original's, the config says the new counts with an explicit head_dim, and the saved model loads and
    generates."""
    model, reference = _llama(layers=2, heads=heads, kv_heads=kv_heads), _llama(layers=2, heads=heads,
                                                                                kv_heads=kv_heads)  # fmt: skip
    scores = [torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([0.5, 0.4, 0.3, 0.6])]
    details = prune_model(model, Importance([0.5, 0.5], [torch.ones(128)] * 2, scores), drop_layers=0,
                          mlp_keep=1.0, heads_keep=keep)  # fmt: skip
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (*expected, 16)
    # Grouped: the best of each group ({0, 1} and {2, 3}); not grouped: the best two overall.
    first = [0, 3] if kv_heads == 2 else [0, 1]
    assert details["kept_heads"] == {"0": first, "1": [0, 3]}
    assert details["attention_heads"] == f"4 -> {expected[0]}" and details["kv_heads"] == f"{kv_heads} -> {expected[1]}"
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (expected[0] * 16, 64)
    assert attention.k_proj.weight.shape == (expected[1] * 16, 64)
    assert attention.o_proj.weight.shape == (64, expected[0] * 16)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before, after = _o_proj_inputs(reference, ids)[0], _o_proj_inputs(model, ids)[0]
    kept = torch.cat([before[..., h * 16:(h + 1) * 16] for h in first], dim=-1)
    assert torch.allclose(after, kept, atol=1e-5)
    model.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_head_importance_is_measured_from_each_head_s_output() -> None:
    model = _llama(layers=2)
    with torch.no_grad():  # head 3 of layer 0 writes almost nothing back; head 1 of layer 1 ten times more
        model.model.layers[0].self_attn.o_proj.weight[:, 48:64].mul_(1e-4)
        model.model.layers[1].self_attn.o_proj.weight[:, 16:32].mul_(10.0)
    importance = measure_importance(model, _windows(4, 16))
    assert importance.heads is not None and [h.shape for h in importance.heads] == [(4,), (4,)]
    assert int(importance.heads[0].argmin()) == 3
    assert int(importance.heads[1].argmax()) == 1


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
    artifact = distill(_quick(), checkpoint, out, _windows(8, 32))
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
    distill(_quick(time_budget_s=1e-9, steps=40), checkpoint, first, _windows(8, 32))
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
    distill(config, checkpoint, second, _windows(8, 32))
    resumed = json.loads((second / HISTORY).read_text())
    assert resumed["resumed_at"] == [30] and len(resumed["train"]) == 40
    assert [r["step"] for r in resumed["train"][30:]] == list(range(31, 41))
    assert not state.exists()
    # Another config's state is not taken.
    _save_state(state, student, optimizer, scheduler, 30, 5.0, history, "another", checkpoint)
    third = tmp_path / ".tiny@distill.tmp-3"
    third.mkdir()
    distill(config, checkpoint, third, _windows(8, 32))
    assert json.loads((third / HISTORY).read_text())["resumed_at"] == []


def test_prune_structured_writes_a_smaller_checkpoint_that_loads(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    artifact = prune(PruneStructuredConfig(drop_layers=2, mlp_keep=0.5), checkpoint, out, _windows(4, 32))
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (2, 64)
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    details = artifact.details
    assert len(details["dropped_layers"]) == 2 and details["layers"] == "4 -> 2"
    before, after = (int(n) for n in details["parameters"].split(" -> "))
    assert after < before
    assert (out / "tokenizer.json").is_file()


def test_prune_structured_with_heads_writes_a_checkpoint_with_the_new_head_counts(checkpoint: Path,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "pruned"
    out.mkdir()
    artifact = prune(PruneStructuredConfig(drop_layers=1, mlp_keep=1.0, heads_keep=0.5), checkpoint, out,
                     _windows(4, 32))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 16)
    assert config["num_hidden_layers"] == 3 and artifact.details["attention_heads"] == "4 -> 2"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)


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
