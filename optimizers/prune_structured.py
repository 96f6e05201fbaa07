"""`prune-structured` (issue 17): a smaller dense model, by removing whole decoder layers and MLP channels.

Importance, measured on the calibration windows (forward passes only):
- a decoder layer's *block influence* (ShortGPT): 1 - the mean cosine similarity between the hidden state
  entering the layer and the one leaving it, over every calibration token. A layer that barely turns the
  residual stream is the cheapest to lose; the `drop_layers` lowest go.
- an MLP channel j's *activation importance* (Minitron): the mean |act(gate(x)) * up(x)|_j over the
  calibration tokens times the L2 norm of down_proj's column j (what the channel writes back). Every
  layer keeps its own top `mlp_keep` share (one `intermediate_size` for all layers: the config has one),
  rounded to a multiple of 32.

- an attention (query) head's importance: the mean L2 norm of its output (the head's slice of o_proj's
  input) over the calibration tokens times the norm of o_proj's columns for that head. Grouped-query
  attention is respected: every KV group keeps the same number of its query heads (its top `heads_keep`
  share, at least one; vLLM and the config take one head count per model), and the KV heads stay. Where
  each query head has its own KV head (no grouping) whole heads go, q, k and v together.
  `heads_keep` defaults to 1.0 (heads kept): SmolLM2-135M has 9 query heads in 3 groups, so its smallest
  cut is a third of the attention.

The result is a valid, smaller checkpoint (`num_hidden_layers`, `intermediate_size` and, with heads cut,
`num_attention_heads`/`num_key_value_heads` with an explicit `head_dim`) that
vLLM serves like the base; pruning alone loses quality, `distill` (optimizers/distill.py) wins it back.
Written by hand rather than with torch-pruning: the couplings here are three tensors per MLP and a list
of layers, and its dependency graph traces the model's forward, which the installed transformers (5.x)
has not been checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from optimizers.base import Artifact, InvalidConfig, MethodConfig, ModelInfo, to_source_dtype

CHANNEL_MULTIPLE = 32  # kept MLP widths are a multiple of this (GEMM-friendly)
STATS_WINDOWS = 32  # calibration windows the importance is measured on, at most
STATS_TOKENS = 512  # tokens of each


class PruneStructuredConfig(MethodConfig):
    method = "prune-structured"
    bits = 16
    drop_layers: int = Field(4, ge=0, description="decoder layers removed (the lowest block influence)")
    mlp_keep: float = Field(0.75, gt=0.0, le=1.0, description="share of each MLP's channels kept")
    heads_keep: float = Field(1.0, gt=0.0, le=1.0, description="share of each KV group's query heads kept")

    def check(self, model: ModelInfo, device: str) -> None:
        check_shape(self.drop_layers, self.mlp_keep, model, self.method, self.heads_keep)


def check_shape(drop_layers: int, mlp_keep: float, model: ModelInfo, method: str, heads_keep: float = 1.0) -> None:
    heads = (model.num_heads, model.num_kv_heads)
    if heads_keep < 1.0:
        if not model.num_heads or not model.num_kv_heads or model.num_heads % model.num_kv_heads:
            raise InvalidConfig(f"{method}: heads_keep {heads_keep} needs the model's head counts (its config has "
                                f"{model.num_heads or '?'} heads, {model.num_kv_heads or '?'} KV heads)")
        heads = kept_heads(model.num_heads, model.num_kv_heads, heads_keep)
    if drop_layers >= model.num_layers:
        raise InvalidConfig(f"{method}: drop_layers {drop_layers} of a model with {model.num_layers} layers "
                            "(at least one must stay)")  # fmt: skip
    if kept_channels(model.intermediate_size, mlp_keep) < CHANNEL_MULTIPLE:
        raise InvalidConfig(f"{method}: mlp_keep {mlp_keep} leaves fewer than {CHANNEL_MULTIPLE} MLP channels")
    if (drop_layers == 0 and kept_channels(model.intermediate_size, mlp_keep) == model.intermediate_size
            and heads == (model.num_heads, model.num_kv_heads)):
        raise InvalidConfig(f"{method}: drop_layers 0, mlp_keep {mlp_keep} and heads_keep {heads_keep} "
                            "remove nothing")  # fmt: skip


def kept_heads(num_heads: int, num_kv_heads: int, keep: float) -> tuple[int, int]:
    """(query heads, KV heads) kept of `num_heads` in `num_kv_heads` groups: each group keeps round(keep x
    its size) of its query heads, at least one, and every KV head stays; without grouping (one query head
    a KV head) round(keep x heads) whole heads stay, at least one."""
    group = num_heads // num_kv_heads
    if group == 1:
        kept = min(num_heads, max(1, round(num_heads * keep)))
        return kept, kept
    return num_kv_heads * min(group, max(1, round(group * keep))), num_kv_heads


def kept_channels(intermediate: int, keep: float) -> int:
    """MLP channels kept of `intermediate`: `keep` of them, rounded to CHANNEL_MULTIPLE (all if that is more)."""
    if keep >= 1.0:
        return intermediate
    return min(intermediate, max(CHANNEL_MULTIPLE, round(intermediate * keep / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE))


@dataclass(frozen=True)
class Importance:
    block_influence: list[float]  # per decoder layer
    channels: list[Any]  # per decoder layer: a float tensor of its MLP channels' importance
    heads: list[Any] | None = None  # per decoder layer: a float tensor of its query heads' importance


def measure_importance(model: Any, windows: list[list[int]]) -> Importance:
    """Block influence and MLP channel importance of `model` (a *ForCausalLM with model.model.layers)
    over the windows, from forward hooks."""
    import torch

    layers = list(model.model.layers)
    cos_sum = [0.0] * len(layers)
    act_sum = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    head_dim = [layer.self_attn.head_dim for layer in layers]
    head_sum = [torch.zeros(layer.self_attn.o_proj.in_features // d, dtype=torch.float64)
                for layer, d in zip(layers, head_dim, strict=True)]  # fmt: skip
    tokens = 0

    def on_layer(i: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            similarity = torch.nn.functional.cosine_similarity(entering.float(), leaving.float(), dim=-1)
            cos_sum[i] += float(similarity.sum())

        return hook

    def on_down(i: int):
        def hook(module: Any, args: tuple) -> None:
            act_sum[i] += args[0].detach().abs().reshape(-1, args[0].shape[-1]).sum(dim=0).double()

        return hook

    def on_o(i: int):
        def hook(module: Any, args: tuple) -> None:
            per_head = args[0].detach().float().reshape(-1, head_sum[i].numel(), head_dim[i])
            head_sum[i] += per_head.norm(dim=-1).sum(dim=0).double()

        return hook

    handles = [layer.register_forward_hook(on_layer(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.mlp.down_proj.register_forward_pre_hook(on_down(i)) for i, layer in enumerate(layers)]
    handles += [layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for window in windows[:STATS_WINDOWS]:
                ids = torch.tensor([window[:STATS_TOKENS]])
                model(input_ids=ids, use_cache=False)
                tokens += ids.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    tokens = max(tokens, 1)
    channels = [(act / tokens).float() * layer.mlp.down_proj.weight.detach().float().norm(dim=0)
                for act, layer in zip(act_sum, layers, strict=True)]  # fmt: skip
    heads = []
    for total, layer, d in zip(head_sum, layers, head_dim, strict=True):
        columns = layer.self_attn.o_proj.weight.detach().float()  # [hidden, heads x head_dim]
        heads.append((total / tokens).float() * columns.reshape(columns.shape[0], -1, d).norm(dim=(0, 2)))
    return Importance([1.0 - c / tokens for c in cos_sum], channels, heads)


def prune_model(model: Any, importance: Importance, drop_layers: int, mlp_keep: float,
                heads_keep: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Remove layers, MLP channels and attention heads from `model` in place (its config too); returns what
    was removed."""
    import torch

    layers = list(model.model.layers)
    ranked = sorted(range(len(layers)), key=lambda i: importance.block_influence[i])
    dropped = sorted(ranked[:drop_layers])
    kept = [i for i in range(len(layers)) if i not in dropped]
    width = kept_channels(model.config.intermediate_size, mlp_keep)
    for i in kept:
        mlp = layers[i].mlp
        if width < mlp.down_proj.in_features:
            keep = torch.topk(importance.channels[i], width).indices.sort().values
            mlp.gate_proj = _rows(mlp.gate_proj, keep)
            mlp.up_proj = _rows(mlp.up_proj, keep)
            mlp.down_proj = _columns(mlp.down_proj, keep)
            mlp.intermediate_size = width
    config = model.config
    heads_before = config.num_attention_heads, config.num_key_value_heads
    heads = kept_heads(*heads_before, heads_keep)
    kept_head_lists = {}
    if heads != heads_before:
        if importance.heads is None:
            raise ValueError("heads_keep < 1 needs the heads' importance")
        for i in kept:
            kept_head_lists[i] = _prune_heads(layers[i].self_attn, importance.heads[i], heads_before, heads)
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index  # the KV cache's index
    before = model.config.num_hidden_layers, model.config.intermediate_size
    model.config.num_hidden_layers, model.config.intermediate_size = len(kept), width
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    details = {"dropped_layers": dropped, "kept_layers": kept,
               "block_influence": [round(b, 5) for b in importance.block_influence],
               "layers": f"{before[0]} -> {len(kept)}", "intermediate_size": f"{before[1]} -> {width}"}  # fmt: skip
    if heads != heads_before:
        # head_dim explicit: hidden_size / heads no longer gives it (transformers and vLLM read it from here).
        config.head_dim = layers[kept[0]].self_attn.head_dim
        config.num_attention_heads, config.num_key_value_heads = heads
        details["attention_heads"] = f"{heads_before[0]} -> {heads[0]}"
        details["kv_heads"] = f"{heads_before[1]} -> {heads[1]}"
        details["kept_heads"] = {str(new): kept_head_lists[old] for new, old in enumerate(kept)}
    return details


def _prune_heads(attention: Any, importance: Any, before: tuple[int, int], after: tuple[int, int]) -> list[int]:
    """Keep `after` (query heads, KV heads) of `attention`'s `before`, the most important query heads of each
    KV group (or, without grouping, the most important heads with their K and V); returns the kept query heads."""
    import torch

    d = attention.head_dim
    group = before[0] // before[1]
    if group == 1:
        heads = torch.topk(importance, after[0]).indices.sort().values.tolist()
        kv = heads
    else:
        per_group = after[0] // after[1]
        heads = [g * group + int(h) for g in range(before[1])
                 for h in torch.topk(importance[g * group:(g + 1) * group], per_group).indices.sort().values]
        kv = list(range(before[1]))  # fmt: skip

    def dims(kept: list[int]) -> Any:  # each kept head's rows (or columns): h x d .. h x d + d - 1
        return (torch.tensor(kept)[:, None] * d + torch.arange(d)).flatten()

    attention.q_proj = _rows(attention.q_proj, dims(heads))
    attention.o_proj = _columns(attention.o_proj, dims(heads))
    if kv != list(range(before[1])):
        attention.k_proj = _rows(attention.k_proj, dims(kv))
        attention.v_proj = _rows(attention.v_proj, dims(kv))
    attention.num_key_value_groups = after[0] // after[1]  # the rest is read from the projections' shapes
    return heads


def _rows(linear: Any, keep: Any) -> Any:
    import torch

    out = torch.nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[keep])
    return out


def _columns(linear: Any, keep: Any) -> Any:
    import torch

    out = torch.nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, keep])
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def pruned(source: Path, windows: list[list[int]], drop_layers: int, mlp_keep: float,
           heads_keep: float = 1.0) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """`source` loaded in float32, measured on `windows` and pruned: (model, what was removed)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    before = sum(p.numel() for p in model.parameters())
    details = prune_model(model, measure_importance(model, windows), drop_layers, mlp_keep, heads_keep)
    details["parameters"] = f"{before} -> {sum(p.numel() for p in model.parameters())}"
    return model, details


def save_like_source(model: Any, source: Path, out: Path) -> None:
    """Save `model` to `out` in the source checkpoint's dtype, with the source's tokenizer."""
    from transformers import AutoTokenizer

    to_source_dtype(model, source)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def prune(config: PruneStructuredConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    model, details = pruned(source, calibration, config.drop_layers, config.mlp_keep, config.heads_keep)
    save_like_source(model, source, out)
    return Artifact(method=config.method, model_path=out, calibration_samples=min(len(calibration), STATS_WINDOWS),
                    details={"importance": "layers: block influence; MLP channels: mean |activation| x down_proj "
                                           "column norm; heads: mean |head output| x o_proj columns' norm",
                             **details})  # fmt: skip
