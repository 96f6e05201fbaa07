"""Calibration and evaluation text: a fixed split of English prose that ships with Python.

The corpus is `pydoc_data.topics` (Python's own reference prose), topics joined in sorted key
order with blank lines, tokenized with the model's tokenizer. Calibration windows are taken from
the start of the token stream and evaluation windows from its end; `split` refuses a profile
whose windows would overlap. Every variant of a model is calibrated and evaluated on the same
windows, so their numbers compare.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bump when the corpus, the split or the chat re-casting changes: variants calibrated on other
# data must not be reused as if they were the same (it is part of every job's key).
CALIBRATION_VERSION = 2


@dataclass(frozen=True)
class Profile:
    name: str
    calibration_samples: int
    calibration_tokens: int
    eval_windows: int
    eval_tokens: int


PROFILES: dict[str, Profile] = {
    # The product default. 128 x 512 calibration tokens and 64 x 512 evaluation tokens
    # (32,704 scored) use 98,304 of the corpus' ~113,000 SmolLM2 tokens.
    "full": Profile("full", calibration_samples=128, calibration_tokens=512, eval_windows=64, eval_tokens=512),
    # For CI: enough to exercise every code path and keep quality in a stated bound.
    "fast": Profile("fast", calibration_samples=16, calibration_tokens=128, eval_windows=8, eval_tokens=256),
}


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class Split:
    calibration: list[list[int]]
    evaluation: list[list[int]]


def split(token_ids: list[int], profile: Profile) -> Split:
    """Disjoint calibration (from the start) and evaluation (from the end) windows."""
    calib_end = profile.calibration_samples * profile.calibration_tokens
    eval_start = len(token_ids) - profile.eval_windows * profile.eval_tokens
    if calib_end > eval_start:
        raise ValueError(
            f"profile {profile.name!r} needs {calib_end} calibration + "
            f"{profile.eval_windows * profile.eval_tokens} evaluation tokens; the corpus has {len(token_ids)}"
        )
    calib_len, eval_len = profile.calibration_tokens, profile.eval_tokens
    calibration = [token_ids[i : i + calib_len] for i in range(0, calib_end, calib_len)]
    evaluation = [token_ids[i : i + eval_len] for i in range(eval_start, len(token_ids), eval_len)]
    return Split(calibration, evaluation)


def corpus_token_ids(checkpoint: str) -> list[int]:
    """The corpus tokenized with the checkpoint's fast tokenizer (the `tokenizers` library only:
    light enough for the gateway, identical to transformers' fast tokenizer)."""
    from pathlib import Path

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))
    return tokenizer.encode(corpus_text(), add_special_tokens=False).ids


def evaluation_windows(checkpoint: str, profile: Profile) -> list[list[int]]:
    return split(corpus_token_ids(checkpoint), profile).evaluation


def tokenized_split(tokenizer_path: str, profile: Profile, chat_calibration: bool = True) -> Split:
    """The profile's windows, tokenized with the checkpoint's tokenizer.

    With `chat_calibration` (and a tokenizer that has a chat template), every other calibration
    window is re-cast as a conversation: its prose split into a user turn and an assistant turn
    and rendered with the model's own template, truncated to the window length, so the quantizer
    also sees the template's special tokens and the activations chat requests produce (as
    llm-compressor's own examples calibrate on chat data). Evaluation windows stay plain prose.

    What it does not fix: SmolLM2-135M's greedy answer to "What is the capital of France?" hangs
    on a near-tie at the first token (base: "The" -1.81 vs "L" -1.93 nats), so any quantization
    noise can flip it into a French ramble; perplexity is the measure, the answer a sanity check.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    result = split(corpus_token_ids(tokenizer_path), profile)
    if not chat_calibration or not tokenizer.chat_template:
        return result
    calibration = [
        _as_chat(tokenizer, window, profile.calibration_tokens) if i % 2 else window
        for i, window in enumerate(result.calibration)
    ]
    return Split(calibration, result.evaluation)


def _as_chat(tokenizer, window: list[int], length: int) -> list[int]:  # noqa: ANN001 - a HF tokenizer
    half = len(window) // 2
    messages = [
        {"role": "user", "content": tokenizer.decode(window[:half])},
        {"role": "assistant", "content": tokenizer.decode(window[half:])},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    if isinstance(rendered, dict):  # transformers versions differ in what tokenize=True returns
        rendered = rendered["input_ids"]
    return list(rendered)[:length]


def _evenly(items: list, n: int) -> list:
    """`n` of `items`, evenly spaced from the first (all of them when there are no more)."""
    if n >= len(items):
        return items
    return [items[int(k * len(items) / n)] for k in range(n)]


def spread(windows: list[list[int]], n: int | None, chat: bool = True) -> list[list[int]]:
    """`n` of `windows`, evenly spread. The calibration set alternates prose and chat-formatted
    windows: with `chat` the subset takes them in consecutive pairs (both kinds), else prose only."""
    if not chat:
        prose = windows[::2]
        return prose if n is None else _evenly(prose, n)
    if n is None:
        return windows
    pairs = [windows[i : i + 2] for i in range(0, len(windows), 2)]
    return [w for pair in _evenly(pairs, (n + 1) // 2) for w in pair][:n]
