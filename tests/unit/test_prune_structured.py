"""prune-structured's bookkeeping on tiny random Llamas built here (optimizers/prune_structured.py): layers by
block influence, MLP channels, attention heads within their KV groups, and the checkpoint it writes. The
handler in the compression environment, end to end, is tests/integration/test_handlers_tiny.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from optimizers.base import InvalidConfig, ModelInfo
from optimizers.distill import DistillConfig
from optimizers.prune_structured import (
    Importance,
    PruneStructuredConfig,
    kept_channels,
    kept_heads,
    measure_importance,
    prune,
    prune_model,
)
from tests.unit.tiny_llamas import VOCAB, checkpoint, llama, windows  # noqa: F401 - checkpoint is a fixture

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
    model, reference = llama(layers=5), llama(layers=5)
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
    model, reference = llama(layers=2), llama(layers=2)
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
    model = llama(layers=3)
    # Layer 1's MLP and attention outputs scaled to nearly nothing: it barely turns the residual stream.
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
        # One channel of layer 0 writes ten times more than any other.
        model.model.layers[0].mlp.down_proj.weight[:, 7].mul_(10.0)
    importance = measure_importance(model, windows(4, 16))
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
    model, reference = llama(layers=2, heads=heads, kv_heads=kv_heads), llama(layers=2, heads=heads,
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
    model = llama(layers=2)
    with torch.no_grad():  # head 3 of layer 0 writes almost nothing back; head 1 of layer 1 ten times more
        model.model.layers[0].self_attn.o_proj.weight[:, 48:64].mul_(1e-4)
        model.model.layers[1].self_attn.o_proj.weight[:, 16:32].mul_(10.0)
    importance = measure_importance(model, windows(4, 16))
    assert importance.heads is not None and [h.shape for h in importance.heads] == [(4,), (4,)]
    assert int(importance.heads[0].argmin()) == 3
    assert int(importance.heads[1].argmax()) == 1


def test_prune_structured_writes_a_smaller_checkpoint_that_loads(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    artifact = prune(PruneStructuredConfig(drop_layers=2, mlp_keep=0.5), checkpoint, out, windows(4, 32))
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
                     windows(4, 32))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 16)
    assert config["num_hidden_layers"] == 3 and artifact.details["attention_heads"] == "4 -> 2"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
