"""Where 4 bits hurt SmolLM2: int4-ao (torchao's CPU int4, HQQ) with some decoder layers kept at 8 bits,
and at other group sizes, each served by vLLM and measured like a rung (perplexity on the profile's
evaluation windows, the chat set). Issue 16's mixed-precision candidate, measured on a CPU that has no
W4A16 GEMM for int4-gptq/awq.

    python -m loadtests.int4_layers [--rank] [--config G:LAYERS ...]   # e.g. 64: 64:0,29 32:

`--rank`: each decoder layer's cost of 4 bits alone: the mean next-token KL from the float32 model when
only that layer's linears are rounded to int4 (min/max per group, a stand-in for HQQ) on 8 calibration
windows of 128 tokens. `--config G:LAYERS`: group size G, the listed layers' linears at torchao's INT8
weight-only (vLLM's torchao path reads a per-module config, `FqnToConfig`), the rest at int4-ao.
Writes int4-layers.json/.md under --out. A measurement: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path

import httpx

from loadtests.local import local_engine
from optimizers.base import ModelInfo
from optimizers.chat_quality import chat_answers
from optimizers.data import PROFILES, tokenized_split
from optimizers.evaluate import perplexity
from optimizers.host import cpu_model
from optimizers.int4_ao import Int4TorchaoConfig
from optimizers.int8_wo import TORCHAO_INT8_WEIGHT_ONLY
from server.models.embedded import ensure_checkpoint, find_bundled_gguf
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def mixed_config(group_size: int, layers: list[int], model: ModelInfo) -> dict:
    """torchao's `FqnToConfig`: int4-ao's config by default, the listed decoder layers' linears at int8-wo's."""
    int4 = Int4TorchaoConfig(group_size=group_size).torchao_config(model)
    fqn = {"_default": int4, **{rf"re:model\.layers\.{n}\..*": TORCHAO_INT8_WEIGHT_ONLY for n in layers}}
    return {"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": fqn, "module_fqn_to_config": fqn}}


def fake_int4(weight, group_size: int):
    """`weight` rounded to asymmetric int4 per group of `group_size` inputs (min/max scales), as float."""
    import torch

    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = torch.clamp((high - low) / 15, min=1e-8)
    q = torch.clamp(torch.round((groups - low) / scale), 0, 15)
    return (q * scale + low).reshape(out_features, in_features).to(weight.dtype)


def layer_sensitivity(source: Path, windows: list[list[int]], group_size: int) -> list[float]:
    """Per decoder layer: mean next-token KL (nats) from the float32 model with only that layer at int4."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    batch = torch.tensor(windows)

    def log_probs():
        with torch.no_grad():
            return torch.log_softmax(model(batch).logits.float(), dim=-1)

    base, out = log_probs(), []
    for layer in model.model.layers:
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        saved = [m.weight.data.clone() for m in linears]
        for m in linears:
            m.weight.data = fake_int4(m.weight.data, group_size)
        mine = log_probs()
        out.append(float((base.exp() * (base - mine)).sum(-1).mean()))
        for m, w in zip(linears, saved, strict=True):
            m.weight.data = w
    return out


async def serve_and_measure(settings: Settings, base: Path, group_size: int, layers: list[int],
                            windows: list[list[int]]) -> dict:  # fmt: skip
    mixed = mixed_config(group_size, layers, ModelInfo.from_checkpoint(base))
    overrides = {"quantization_config_dict_json": json.dumps(mixed)}
    args = ("--quantization", "torchao", "--hf-overrides", json.dumps(overrides), "--dtype", "bfloat16")
    variant_id = "smollm2-135m@int4-ao-mixed"
    async with (local_engine(settings, variant_id, base, args) as (engine, _),
                httpx.AsyncClient(timeout=3600, trust_env=False, headers=engine.auth_headers) as http):
        ppl = await perplexity(http, engine.base_url, variant_id, windows)
        chat = await chat_answers(http, engine.base_url, variant_id)
    return {"group_size": group_size, "int8_layers": layers, "ppl": ppl.ppl, "correct": chat.correct,
            "prompts": chat.prompts, "loops": chat.loops}


def render(result: dict) -> str:
    lines = [f"# int4-ao with layers kept at 8 bits, SmolLM2-135M-Instruct ({result['date']}, {result['machine']})", "",
             f"`{result['command']}`. Perplexity on the `fast` profile's evaluation windows; base {result['base_ppl']:.3f}.", ""]
    if result.get("rank"):
        ranked = sorted(range(len(result["rank"])), key=lambda i: -result["rank"][i])
        lines += ["Layers by the KL that 4 bits on that layer alone cost (nats): " +
                  ", ".join(f"{i} ({result['rank'][i]:.4f})" for i in ranked[:10]) + ", ...", ""]
    lines += ["| group size | layers at INT8 | ppl | delta | chat right | loops |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['group_size']} | {','.join(map(str, r['int8_layers'])) or 'none'} | {r['ppl']:.3f} | "
                     f"{r['ppl'] / result['base_ppl'] - 1:+.1%} | {r['correct']}/{r['prompts']} | {r['loops']} |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> None:
    settings = Settings(home=args.home)
    base = await asyncio.to_thread(ensure_checkpoint, find_bundled_gguf(), settings.checkpoints_dir, settings.logs_dir)
    split = tokenized_split(str(base), PROFILES["fast"])
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": cpu_model(),
              "command": "python -m loadtests.int4_layers " + " ".join(args.argv), "base_ppl": args.base_ppl,
              "rows": []}  # fmt: skip
    if args.rank:
        result["rank"] = await asyncio.to_thread(layer_sensitivity, base, [w[:128] for w in split.calibration[:8]], 64)
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.config:
        group, _, layers = spec.partition(":")
        row = await serve_and_measure(settings, base, int(group), [int(n) for n in layers.split(",") if n], split.evaluation)
        result["rows"].append(row)
        (args.out / "int4-layers.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "int4-layers.md").write_text(render(result))
        print(render(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", action="store_true")
    parser.add_argument("--config", nargs="*", default=[], metavar="G:LAYERS")
    parser.add_argument("--base-ppl", type=float, default=14.530, help="the base's ppl on the same windows")
    parser.add_argument("--home", type=Path, default=REPO / ".cache" / "test-home")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
