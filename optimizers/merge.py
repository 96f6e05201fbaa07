"""Model merging: SLERP of two checkpoints, or a weighted linear average of two or more, per tensor.

mergekit is the field's tool, but it pins versions (safetensors 0.5, accelerate 1.6, pydantic 2.10) that
clash with both of quantgate's environments, so the methods are written here and checked against mergekit's
own `slerp` on the same inputs (loadtests/merge_check.py; report in loadtests/results/).

SLERP, per tensor (never one vector across the model):
- directions: the two tensors, flattened and normalized, are interpolated along the great circle between
  them: sin((1-t) theta)/sin(theta) a^ + sin(t theta)/sin(theta) b^, theta = arccos(a^ . b^);
- magnitudes, explicitly: the result's norm is (1-t)|a| + t|b|. mergekit applies the two coefficients to the
  unnormalized tensors instead, which gives the same result when |a| = |b| and a norm that is not the
  interpolation of the two when they differ;
- nearly parallel or nearly opposite tensors (|cos theta| > 0.9995, where sin(theta) ~ 0 makes the
  coefficients blow up) and zero tensors (no direction) are interpolated linearly, as mergekit does.
t = 0 returns the first tensor, t = 1 the second, exactly.

t may be one number, a gradient over the decoder layers (a list: layer i of N takes the list's value at
i / (N - 1), linearly interpolated between its points), or a list of {"filter": substring, "value": ...}
whose first filter found in the tensor's name wins ("*" or no filter matches all). Tensors outside the
decoder layers (embeddings, final norm, lm_head) take the value at position 0. All of this is mergekit's
parameter language (its `evaluate_setting`), so its SLERP configs carry over.

Run as its own process (`python -m optimizers.merge --out DIR A B ...`): it reads one tensor of each parent
at a time and writes shards of at most 2 GiB, so memory stays near one tensor's size times three.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from optimizers.progress import emit_progress, reporting, write_event

logger = logging.getLogger(__name__)

Method = Literal["slerp", "linear"]
METHODS: tuple[str, ...] = ("slerp", "linear")
DOT_THRESHOLD = 0.9995  # mergekit's: past it the two directions are taken as colinear
EPS = 1e-8
SHARD_BYTES = 2 << 30
# Files that travel from the first parent: the model's config, tokenizer and chat template.
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip
# Config fields that must agree for two checkpoints to be merged tensor by tensor.
SHAPE_FIELDS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")  # fmt: skip
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Schedule = float | list[float] | list[dict[str, Any]]


class MergeError(ValueError):
    """The checkpoints cannot be merged as asked; the message says why."""


def check_schedule(t: Any, what: str = "t") -> Schedule:
    """`t` in mergekit's parameter language, every value in [0, 1]; MergeError naming the problem otherwise."""
    if isinstance(t, bool):
        raise MergeError(f"{what} must be a number in [0, 1], a list of them, or a list of filters")
    if isinstance(t, (int, float)):
        if not 0.0 <= float(t) <= 1.0:
            raise MergeError(f"{what} must be within [0, 1], got {t}")
        return float(t)
    if isinstance(t, list) and t and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t):
        for v in t:
            check_schedule(v, what)
        return [float(v) for v in t]
    if isinstance(t, list) and t and all(isinstance(v, dict) for v in t):
        for cond in t:
            if set(cond) - {"filter", "value"} or "value" not in cond:
                raise MergeError(f"each filter of {what} is {{\"filter\": substring, \"value\": ...}}")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise MergeError(f"a filter of {what} must be a string")
            check_schedule(cond["value"], what)
        return t
    raise MergeError(f"{what} must be a number in [0, 1], a non-empty list of them, or a list of filters")


def evaluate(schedule: Schedule, tensor: str, position: float) -> float | None:
    """The schedule's value for `tensor` at `position` in [0, 1] (mergekit's evaluate_setting); None when no
    filter matches."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    if all(isinstance(v, (int, float)) for v in schedule):
        scaled = position * (len(schedule) - 1)
        i0 = int(scaled)
        i1 = min(len(schedule) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * schedule[i0] + frac * schedule[i1]
    for cond in schedule:
        name = cond.get("filter")
        if name is None or name == "*" or name in tensor:
            return evaluate(cond["value"], tensor, position)
    return None


def layer_position(tensor: str, num_layers: int) -> float:
    """Where a tensor sits for a gradient: layer i of N at i / (N - 1); tensors outside the layers at 0."""
    match = LAYER.search(tensor)
    if match is None or num_layers <= 1:
        return 0.0 if match is None else 1.0
    return int(match.group(1)) / (num_layers - 1)


def slerp(t: float, a: Any, b: Any, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> Any:
    """Spherical interpolation of two tensors of one shape (see the module's docstring), in float32;
    returned in a's dtype."""
    return _slerp(t, a, b, dot_threshold, eps)[0]


def _slerp(t: float, a: Any, b: Any, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> tuple[Any, bool]:
    """slerp's result, and whether it fell back to linear interpolation (parallel, opposite or zero tensors)."""
    import torch

    if a.shape != b.shape:
        raise MergeError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    if t == 0.0:
        return a.clone(), False
    if t == 1.0:
        return b.to(a.dtype).clone(), False
    x, y = a.detach().float().reshape(-1), b.detach().float().reshape(-1)
    na, nb = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if na <= eps or nb <= eps:
        return lerp(t, a, b), True
    ua, ub = x / na, y / nb
    dot = torch.clamp(torch.dot(ua, ub), -1.0, 1.0)
    if abs(float(dot)) > dot_threshold:
        return lerp(t, a, b), True
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    s0 = torch.sin((1 - t) * theta) / sin_theta
    s1 = torch.sin(t * theta) / sin_theta
    direction = s0 * ua + s1 * ub  # a unit vector: on the great circle through ua and ub
    merged = direction * ((1 - t) * na + t * nb)
    return merged.reshape(a.shape).to(a.dtype), False


def lerp(t: float, a: Any, b: Any) -> Any:
    return ((1 - t) * a.detach().float() + t * b.detach().float()).to(a.dtype)


def linear(tensors: Sequence[Any], weights: Sequence[float]) -> Any:
    """The weighted mean (weights normalized to sum to 1), in float32; in the first tensor's dtype."""
    total = float(sum(weights))
    out = None
    for tensor, weight in zip(tensors, weights, strict=True):
        part = tensor.detach().float() * (weight / total)
        out = part if out is None else out + part
    assert out is not None
    return out.to(tensors[0].dtype)


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise MergeError(f"{path} has no readable config.json") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path}/config.json is not a JSON object")
    return config


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{path} has no *.safetensors weights")
    return files


def _header_entries(path: Path) -> Iterator[tuple[Path, str, dict[str, Any]]]:
    """(file, tensor name, its header entry) of every tensor of a checkpoint, from the safetensors headers alone
    (no weights read)."""
    for file in _weight_files(path):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100 << 20:
                raise MergeError(f"{file.name} is not a safetensors file")
            try:
                header = json.loads(f.read(size))
            except ValueError:
                raise MergeError(f"{file.name} has an unreadable safetensors header") from None
        for name, spec in header.items():
            if name != "__metadata__":
                yield file, name, spec


def tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, dtype)."""
    return {name: (tuple(spec["shape"]), spec["dtype"]) for _, name, spec in _header_entries(path)}


def check_compatible(paths: Sequence[Path], method: str, weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Refuse, with the first difference named, parents that cannot be merged tensor by tensor: another
    architecture or shape in config.json, another set of tensors, or another shape of one tensor. Returns
    the first parent's config. Reads only configs and safetensors headers."""
    if method not in METHODS:
        raise MergeError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(paths) < 2:
        raise MergeError("a merge needs at least two checkpoints")
    if method == "slerp" and len(paths) != 2:
        raise MergeError(f"slerp merges exactly two checkpoints, got {len(paths)}; use linear for more")
    if weights is not None:
        if len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise MergeError("weights: one non-negative number per checkpoint, not all zero")
    first = _config(paths[0])
    shapes = tensor_shapes(paths[0])
    for path in paths[1:]:
        config = _config(path)
        for name in SHAPE_FIELDS:
            if config.get(name) != first.get(name):
                raise MergeError(f"{path.name} and {paths[0].name} differ in config.json {name}: "
                                 f"{config.get(name)!r} against {first.get(name)!r}")  # fmt: skip
        other = tensor_shapes(path)
        missing = sorted(set(shapes) ^ set(other))
        if missing:
            raise MergeError(f"{path.name} and {paths[0].name} have different tensors (e.g. {missing[0]})")
        for name, (shape, _) in shapes.items():
            if other[name][0] != shape:
                raise MergeError(f"tensor {name} is {list(other[name][0])} in {path.name} and {list(shape)} "
                                 f"in {paths[0].name}")  # fmt: skip
    return first


def _tensors(paths: Sequence[Path]) -> Iterator[tuple[str, list[Any]]]:
    """Each tensor name with its tensor from every parent, one name at a time."""
    from safetensors import safe_open

    index = [{name: file for file, name, _ in _header_entries(p)} for p in paths]
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(index[0]):
            tensors = []
            for where in index:
                file = where[name]
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="pt")
                tensors.append(handles[file].get_tensor(name))
            yield name, tensors
    finally:
        handles.clear()


def merge_checkpoints(paths: Sequence[Path], out: Path, method: str = "slerp", t: Any = 0.5,
                      weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Merge `paths` into the checkpoint directory `out` (written whole or not at all: built in a temp dir
    beside it, then renamed), with progress events when the job reports (optimizers/progress.py). Returns the
    merge's record (also written as `merge.json` in `out`)."""
    import torch
    from safetensors.torch import save_file

    started = time.monotonic()
    schedule = check_schedule(t) if method == "slerp" else None
    config = check_compatible(paths, method, weights)
    num_layers = int(config.get("num_hidden_layers", 0) or 0)
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # a killed job's is removed by its caller (remove_temp_dirs)
    tmp.mkdir()
    total = len(tensor_shapes(paths[0]))
    shard: dict[str, Any] = {}
    shard_bytes, shards, weight_map = 0, [], {}
    fallbacks = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    with torch.no_grad():
        for done, (name, tensors) in enumerate(_tensors(paths), start=1):
            if method == "slerp":
                value = evaluate(schedule, name, layer_position(name, num_layers))
                value = 0.5 if value is None else value
                a, b = tensors
                if not (a.is_floating_point() and b.is_floating_point()):
                    raise MergeError(f"tensor {name} is not floating point ({a.dtype}); quantized checkpoints "
                                     "are not merged: merge their bases")  # fmt: skip
                merged, fell_back = _slerp(value, a, b)
                fallbacks += fell_back
            else:
                merged = linear(tensors, weights)
            shard[name] = merged.contiguous()
            shard_bytes += merged.numel() * merged.element_size()
            if shard_bytes >= SHARD_BYTES:
                flush()
            emit_progress("merging the parents", done / total, done=done, total=total)
    flush()
    if len(shards) == 1:
        (tmp / shards[0]).rename(tmp / "model.safetensors")
    else:
        index = {"metadata": {"total_size": sum((tmp / s).stat().st_size for s in shards)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    for name in COPIED:
        if (paths[0] / name).is_file():
            shutil.copy2(paths[0] / name, tmp / name)
    record = {"method": method, "t": t if method == "slerp" else None, "weights": weights if method == "linear"
              else None, "parents": [str(p) for p in paths], "tensors": total, "linear_fallbacks": fallbacks,
              "seconds": round(time.monotonic() - started, 2)}  # fmt: skip
    (tmp / "merge.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge checkpoints (SLERP or linear); JSON events on stdout.")
    parser.add_argument("parents", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", choices=METHODS, default="slerp")
    parser.add_argument("--t", default="0.5", help="a number, or mergekit's schedule as JSON")
    parser.add_argument("--weights", default=None, help="linear: JSON list, one weight per parent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        with reporting(write_event):
            record = merge_checkpoints(args.parents, args.out, args.method, json.loads(args.t),
                                       json.loads(args.weights) if args.weights else None)  # fmt: skip
    except MergeError as exc:
        write_event("error", kind="invalid_config", message=str(exc))
        return 2
    write_event("done", **record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
