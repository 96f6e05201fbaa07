"""ONNX export for edge devices: a checkpoint as an ONNX Runtime GenAI model, checked against PyTorch.

onnxruntime-genai's model builder (the field's tool for decoder LLMs) writes the graph with its KV cache
(GroupQueryAttention, past/present key-value inputs and outputs: incremental decoding) and, for `int4`/`int8`,
MatMulNBits weights quantized block-wise (block 32) by ONNX Runtime's quantizer; `fp32` keeps the weights.
Its generator runs the result on this CPU. Runs in the compression environment (the builder imports torch and
transformers; the pins are pyproject.toml's `compress` extra), as

    python -m optimizers.onnx_export CHECKPOINT OUT --precision int4 --check-steps 32

which writes OUT (model.onnx, model.onnx.data, genai_config.json, the tokenizer), built in a temp dir and
renamed, and prints one JSON line: size, the parity check against the PyTorch model (greedy tokens for N steps
of two fixed chat prompts, a short answer and a long one; the last prompt position's logits) and the ONNX
model's decode tokens/s on this CPU (batch 1, the long prompt, `--speed-runs` times).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optimizers.progress import write_event

PRECISIONS = ("fp32", "int8", "int4")
PROMPT = "What is the capital of France?"
# A prompt whose answer runs past the check's steps: the parity of a long greedy run, and the decode rate.
LONG_PROMPT = "Explain in a few paragraphs how a bicycle works."


class ExportError(RuntimeError):
    pass


def export(source: Path, out: Path, precision: str = "int4", log: Any = None) -> Path:
    """Write the ONNX model of `source` into `out` (whole or not at all) with the model builder."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not (source / "config.json").is_file():
        raise ExportError(f"{source} is not a checkpoint directory (no config.json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # a killed job's is removed by its caller (remove_temp_dirs)
    cache = out.parent / f".{out.name}.tmp-{os.getpid()}-cache"
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(tmp),
            "-p", precision, "-e", "cpu", "-c", str(cache)]  # fmt: skip
    result = subprocess.run(argv, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    shutil.rmtree(cache, ignore_errors=True)
    if result.returncode != 0 or not (tmp / "genai_config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (result.stdout or "")[-2000:] if log is None else "see the log"
        raise ExportError(f"the model builder failed (exit {result.returncode}): {tail}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def onnx_bytes(path: Path) -> int:
    """The model's files (graph and external weights), without the tokenizer and configs."""
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx"))


def prompt_ids(source: Path, prompt: str = PROMPT) -> list[int]:
    """The chat-formatted prompt, tokenized by the checkpoint's own tokenizer and template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


@dataclass
class Run:
    tokens: list[int]
    last_logits: list[float]  # at the prompt's last position
    seconds_to_first: float
    decode_tokens_per_s: float | None


def onnx_generate(model_dir: Path, ids: Sequence[int], steps: int) -> Run:
    """Greedy decoding with ONNX Runtime GenAI, `steps` new tokens (fewer if the model ends its answer)."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.array([list(ids)], dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"))[0, -1].astype(np.float64)
    tokens: list[int] = []
    first = None
    while not generator.is_done() and len(tokens) < steps:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    rate = (len(tokens) - 1) / (end - first) if first is not None and len(tokens) > 1 else None
    return Run(tokens, logits.tolist(), (first or end) - started, rate)


def torch_generate(source: Path, ids: Sequence[int], steps: int) -> Run:
    """The same greedy decoding with transformers, in float32 (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tokens: list[int] = []
    started = time.perf_counter()
    first = None
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), use_cache=True)
        logits = out.logits[0, -1].double()
        past, last = out.past_key_values, logits
        while len(tokens) < steps:
            token = int(torch.argmax(last))
            tokens.append(token)
            first = first or time.perf_counter()
            if token in eos:
                break
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, last = out.past_key_values, out.logits[0, -1]
    end = time.perf_counter()
    rate = (len(tokens) - 1) / (end - first) if first is not None and len(tokens) > 1 else None
    return Run(tokens, logits.tolist(), (first or end) - started, rate)


def parity(reference: Run, candidate: Run) -> dict[str, Any]:
    """How far the ONNX run is from the PyTorch one: greedy tokens in common from the start, whether they are
    all identical, and the last prompt position's logits (max absolute difference, and whether the argmax
    agrees)."""
    import numpy as np

    same = 0
    for a, b in zip(reference.tokens, candidate.tokens):
        if a != b:
            break
        same += 1
    ref, cand = np.asarray(reference.last_logits), np.asarray(candidate.last_logits)
    return {"steps": len(reference.tokens), "identical_tokens": reference.tokens == candidate.tokens,
            "tokens_in_common_from_start": same, "logits_max_abs_diff": float(np.max(np.abs(ref - cand))),
            "logits_scale": float(np.max(np.abs(ref))), "argmax_agrees": bool(ref.argmax() == cand.argmax())}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a checkpoint to ONNX Runtime GenAI and check it.")
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--precision", choices=PRECISIONS, default="int4")
    parser.add_argument("--check-steps", type=int, default=32, help="greedy steps compared with PyTorch (0: none)")
    parser.add_argument("--speed-runs", type=int, default=3, help="ONNX generations timed for tokens/s")
    args = parser.parse_args(argv)
    try:
        started = time.monotonic()
        export(args.source, args.out, args.precision, log=sys.stderr)
        report: dict[str, Any] = {"precision": args.precision, "out": str(args.out),
                                  "onnx_bytes": onnx_bytes(args.out),
                                  "seconds_to_export": round(time.monotonic() - started, 1)}  # fmt: skip
        if args.check_steps > 0:
            report["parity"], report["onnx"], report["torch"] = {}, {}, {}
            for label, prompt in (("short", PROMPT), ("long", LONG_PROMPT)):
                ids = prompt_ids(args.source, prompt)
                reference = torch_generate(args.source, ids, args.check_steps)
                runs = [onnx_generate(args.out, ids, args.check_steps)
                        for _ in range(max(args.speed_runs, 1) if label == "long" else 1)]  # fmt: skip
                report["parity"][label] = parity(reference, runs[0])
                report["onnx"][label] = {"tokens": runs[0].tokens,
                                         "decode_tokens_per_s": [r.decode_tokens_per_s for r in runs],
                                         "seconds_to_first_token": [round(r.seconds_to_first, 4) for r in runs]}  # fmt: skip
                report["torch"][label] = {k: v for k, v in asdict(reference).items() if k != "last_logits"}
    except ExportError as exc:
        write_event("error", kind="failed", message=str(exc))
        return 2
    write_event("done", **report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
