"""The chat gate side by side: each recipe, served in each engine dtype, judged against its base.

    python -m loadtests.chat_gate_bench [--profile fast] [--dtypes float32 bfloat16]
        [--recipes int8 'int8:{"smoothing_strength": 0.5}' int4-gptq awq] [--broken 3:3 10:0]

Compresses each recipe (the registry's content-addressed store under --home: made once, reused),
serves the base and every variant in each engine dtype with its own vLLM engine, and measures
perplexity (prompt_logprobs on the profile's evaluation windows) and the chat set of
optimizers/chat_quality.py: facts right, looping answers, agreement with the base in the same dtype,
next-token KL and top-1 agreement with that base on the chat windows (optimizers/next_token.py), and
the gate's verdict. `--broken LAYER:SCALE` adds the base with one layer's MLP output scaled
(loadtests/broken.py): rungs the gate must refuse. Prints a table and writes chat-gate-<profile>.json/.md after every row.
A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtests.avx2_emulation import emulated, emulation_env
from loadtests.broken import break_checkpoint
from loadtests.case_study import long_prompt, mean_ci, tree_rss_gib
from loadtests.local import local_engine
from optimizers import next_token
from optimizers.chat_quality import PROMPTS, ChatGate, ChatScore, agreement, chat_answers, judge
from optimizers.data import PROFILES, tokenized_split
from optimizers.evaluate import perplexity
from optimizers.host import cpu_flags, cpu_model
from optimizers.job import calibration_budget_s, calibration_dtype_name
from optimizers.registry import make_config
from server.jobs.compress import CompressionJob, run_compression
from server.models.embedded import ensure_checkpoint, find_bundled_gguf, sha256_file
from server.registry.artifacts import artifact_dir, artifact_key
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SPEED_RUNS, SPEED_TOKENS = 5, 64


def parse_recipe(text: str) -> tuple[str, dict]:
    method, _, config = text.partition(":")
    return method, json.loads(config) if config else {}


async def serve_and_measure(settings: Settings, variant_id: str, model_dir: Path, engine_args: tuple[str, ...],
                            windows: list[list[int]], reference: next_token.Reference | None) -> tuple:  # fmt: skip
    """The rung's perplexity, chat answers, served dtype, chat seconds, decode speeds, and its next-token
    agreement with `reference` (None: this is the base, and its own reference is returned instead)."""
    async with (local_engine(settings, variant_id, model_dir, engine_args) as (engine, config),
                httpx.AsyncClient(timeout=3600, trust_env=False, headers=engine.auth_headers) as http):
        ppl = await perplexity(http, engine.base_url, variant_id, windows)
        started = time.monotonic()
        chat = await chat_answers(http, engine.base_url, variant_id)
        chat_s = time.monotonic() - started
        if reference is None:
            reference = await next_token.reference(http, engine.base_url, variant_id, chat.answers)
        measured = await next_token.agreement(http, engine.base_url, variant_id, reference)
        speeds = await decode_speed(http, engine.base_url, variant_id)
        ttfts = await first_token_ms(http, engine.base_url, variant_id)
        pid = engine.status().pid
        rss = await asyncio.to_thread(tree_rss_gib, pid) if pid else None
    return ppl.ppl, chat, config.dtype, chat_s, speeds, reference, measured, ttfts, rss


async def first_token_ms(http: httpx.AsyncClient, url: str, variant_id: str, runs: int = SPEED_RUNS,
                         prompt_tokens: int = 256) -> list[float]:
    """Time to the first token of a ~`prompt_tokens`-token prompt (streamed, one at a time), in ms."""
    prompt = long_prompt(prompt_tokens)
    out = []
    for _ in range(runs):
        started = time.monotonic()
        async with http.stream("POST", f"{url}/v1/completions", json={
                "model": variant_id, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    out.append((time.monotonic() - started) * 1000)
                    break
    return out


async def decode_speed(http: httpx.AsyncClient, url: str, variant_id: str, runs: int = SPEED_RUNS,
                       tokens: int = SPEED_TOKENS) -> list[float]:
    """Batch-1 decode speed: `runs` greedy completions of `tokens` tokens (EOS ignored), one at a
    time after a warm-up, in tokens per second of wall time (the short prompt's prefill included)."""
    body = {"model": variant_id, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True}
    (await http.post(f"{url}/v1/completions", json={**body, "max_tokens": 8})).raise_for_status()
    speeds = []
    for _ in range(runs):
        started = time.monotonic()
        reply = await http.post(f"{url}/v1/completions", json=body)
        reply.raise_for_status()
        speeds.append(reply.json()["usage"]["completion_tokens"] / (time.monotonic() - started))
    return speeds


def render(result: dict) -> str:
    lines = [
        f"# Chat gate: recipes x engine dtypes, SmolLM2-135M-Instruct, `{result['profile']}` profile "
        f"({result['date']}, {result['machine']})", "",
        f"{result['prompts']} greedy chat prompts of optimizers/chat_quality.py ({result['max_tokens']} tokens each); "
        f"gate {result['gate']}; agreement and verdict against the base served in the same dtype. Command: "
        f"`{result['command']}`", "",
        f"tok/s: batch-1 decode, mean and 95% CI of {SPEED_RUNS} greedy {SPEED_TOKENS}-token completions.", "",
        "| recipe | calibration dtype | windows | s to make | engine dtype | ppl | delta | facts right | loops "
        "| agreement | next-token KL | top-1 agreement | tok/s @1 | France answer | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["rows"]:
        delta = "-" if r["ppl_delta"] is None else f"{100 * r['ppl_delta']:+.1f}%"
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.2f}"
        made = "-" if r.get("seconds_to_make") is None else f"{r['seconds_to_make']:.0f}"
        speed = "-" if not r.get("decode_tok_s") else "{:.1f} ± {:.1f}".format(*mean_ci(r["decode_tok_s"]))
        windows = r.get("calibration_samples") or "-"
        lines.append(f"| {r['recipe']} | {r.get('calibration_dtype', 'auto')} | {windows} | {made} | {r['dtype']} | "
                     f"{r['ppl']:.3f} | "
                     f"{delta} | {r['correct']}/{r['prompts']} | "
                     f"{r['loops']} | {agree} | {r['kld']:.4f} | {r['top1']:.3f} | {speed} | "
                     f"{r['answers'][0][:48]!r} | {r['verdict']} |")
    timed = [r for r in result["rows"] if r.get("ttft_ms") and r.get("decode_tok_s")]
    if timed:
        # The article's case study ("before and after": memory, latency, accuracy drop per precision).
        lines += ["", "## Case study: memory, latency and accuracy drop per rung", "",
                  "Engine RSS: the engine's processes (API server, engine core, worker) after the measures: weights, "
                  "the KV cache (`QUANTGATE_ENGINE_CPU_KVCACHE_GIB`) and the runtime together. TTFT: a ~256-token "
                  "prompt, streamed, one at a time; decode: batch-1 ms per token (the tok/s above); mean ± 95% CI of "
                  f"{SPEED_RUNS} each. Accuracy drop: perplexity delta, facts right and next-token KL from the base.", "",
                  "| rung | engine dtype | engine RSS (GiB) | TTFT (ms) | decode (ms/token) | ppl delta | facts right | KL |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in timed:
            ms = [1000 / v for v in r["decode_tok_s"]]
            rss = "-" if r.get("engine_rss_gib") is None else f"{r['engine_rss_gib']:.2f}"
            delta = "-" if r["ppl_delta"] is None else f"{r['ppl_delta']:+.1%}"
            lines.append(f"| {r['recipe']} | {r['dtype']} | {rss} | {'{:.0f} ± {:.0f}'.format(*mean_ci(r['ttft_ms']))} | "
                         f"{'{:.1f} ± {:.1f}'.format(*mean_ci(ms))} | {delta} | {r['correct']}/{r['prompts']} | "
                         f"{r['kld']:.3f} |")
    lines += ["", "Answers per prompt are in the JSON file beside this one."]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> None:
    settings = Settings(home=args.home)
    base = await asyncio.to_thread(ensure_checkpoint, find_bundled_gguf(), settings.checkpoints_dir,
                                   settings.logs_dir)  # fmt: skip
    windows = tokenized_split(str(base), PROFILES[args.profile]).evaluation
    gate = ChatGate()
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, "
               f"{'avx512_bf16' if 'avx512_bf16' in cpu_flags() else 'no avx512_bf16'}")
    if emulated():
        machine += ", AVX2-only code paths emulated (loadtests/avx2_emulation)"
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "profile": args.profile, "machine": machine,
              "prompts": len(PROMPTS), "max_tokens": 32, "gate": gate.model_dump(), "rows": [],
              "command": "python -m loadtests.chat_gate_bench " + " ".join(args.argv)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        stem = args.report or f"chat-gate-{args.profile}"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(render(result))

    built: dict[str, tuple[Path, tuple[str, ...]]] = {"base": (base, ())}
    manifests: dict[str, dict] = {"base": {}}  # each recipe's job manifest (time to make, windows used)
    source_sha = sha256_file(find_bundled_gguf())
    for recipe in args.recipes:
        method, config = parse_recipe(recipe)
        out = artifact_dir(settings.home, artifact_key(source_sha, make_config(method, config), args.profile))
        finished = out / "quantgate-variant.json"
        if finished.is_file():
            manifest = json.loads(finished.read_text())
        else:
            manifest = await run_compression(
                CompressionJob(method, base, out, profile=args.profile, config=tuple(config.items())),
                settings.logs_dir / f"compress-{method}.log", timeout_s=args.timeout_s)  # fmt: skip
        built[recipe] = (Path(manifest["model_path"]) if manifest["on_load"] else out, tuple(manifest["engine_args"]))
        manifests[recipe] = manifest
    for spec in args.broken:
        layer, scale = spec.split(":")
        broken = break_checkpoint(base, settings.home / "broken" / f"layer{layer}-x{scale}", int(layer), float(scale))
        built[f"broken:{spec}"] = (broken, ())
        manifests[f"broken:{spec}"] = {}
    for dtype in args.dtypes:
        dsettings = Settings(home=args.home, engine_dtype=dtype)
        base_ppl = base_chat = reference = None
        for recipe, (model_dir, engine_args) in built.items():
            variant_id = f"smollm2-135m@{recipe.split(':')[0]}"
            ppl, chat, served, chat_s, speeds, reference, measured, ttfts, rss = await serve_and_measure(
                dsettings, variant_id, model_dir, engine_args, windows, reference)  # fmt: skip
            if base_chat is None:
                base_ppl, base_chat = ppl, chat
            is_base = recipe == "base"
            delta = None if is_base else ppl / base_ppl - 1
            floor = settings.max_ppl_delta  # the registry's order: the ppl floor, the answers, the next tokens
            verdict = "base" if is_base else (
                f"ppl delta {delta:+.1%} exceeds the floor of {floor:+.1%}" if delta > floor
                else judge(chat, base_chat, gate) or next_token.judge_agreement(measured, gate) or "pass")
            result["rows"].append({
                "recipe": recipe, "dtype": served, "ppl": ppl, "ppl_delta": delta,
                "correct": chat.correct, "loops": chat.loops, "prompts": chat.prompts, "chat_s": round(chat_s, 1),
                "decode_tok_s": [round(v, 2) for v in speeds], "ttft_ms": [round(v, 1) for v in ttfts],
                "engine_rss_gib": None if rss is None else round(rss, 3),
                "agreement": None if is_base else agreement(chat, base_chat), "seconds_to_make": manifests[recipe].get("seconds_to_make"),
                "calibration_samples": manifests[recipe].get("calibration_samples"),
                "calibration_budget_s": calibration_budget_s(),
                # what the job computed in: forced, or this CPU's default ("auto": the checkpoint's dtype)
                "calibration_dtype": calibration_dtype_name(),
                "kld": measured.kld, "top1": measured.top1, "positions": measured.positions, "verdict": verdict,
                "answers": list(chat.answers),
            })  # fmt: skip
            save()
            print(render(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="fast", choices=sorted(PROFILES))
    parser.add_argument("--recipes", nargs="+", default=["int8", 'int8:{"smoothing_strength": 0.5}', "int4-gptq", "awq"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--broken", nargs="*", default=[], metavar="LAYER:SCALE",
                        help="also the base with that layer's MLP output scaled (loadtests/broken.py)")
    parser.add_argument("--home", type=Path, default=REPO / ".cache" / "test-home")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--report", help="report file name without extension (default chat-gate-<profile>)")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run this bench and its engines on the code paths of an AVX2-only CPU "
                             "(loadtests/avx2_emulation/sitecustomize.py); the hardware stays what it is")
    args = parser.parse_args()
    if args.emulate_avx2 and not emulated():  # again, in the emulated environment (--dtypes still chooses)
        raise SystemExit(subprocess.call([sys.executable, "-m", "loadtests.chat_gate_bench", *sys.argv[1:]],
                                         env=emulation_env()))
    args.argv = sys.argv[1:]
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
