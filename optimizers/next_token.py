"""What a rung does to the next token, where users read it: KL divergence from the base and top-1
agreement with the base, on chat-formatted windows (each prompt of optimizers/chat_quality.py with
the base's own greedy answer as the assistant turn), scored on the answer's tokens only.

vLLM's `prompt_logprobs=k` gives, per prompt position, the k most likely next tokens (plus the token
actually there), never the whole distribution, so the KL is taken over a partition of the vocabulary:
the base's top `REFERENCE_K` tokens one by one, and everything else as one bucket. That is the exact KL
of the coarsened distributions, a lower bound of the full KL (coarsening never raises a KL), provided
the rung's probability of each of those tokens is known. The rung returns its own top `VARIANT_K`
(> REFERENCE_K); a base token missing from them gets the smallest probability the rung returned there
(an upper bound of its true one, so the term stays on the low side), and the rung's bucket is what is
left of 1. Positions: every answer token (the template's own tokens, which every rung predicts alike,
would only dilute the mean).

Needs only httpx: it runs in the gateway's environment against running engines.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass

import httpx

from optimizers.chat_quality import PROMPTS, ChatGate

REFERENCE_K = 10  # the base's tokens kept one by one in the partition
VARIANT_K = 20  # what the rung is asked for (vLLM's default --max-logprobs is 20)
_FLOOR = 1e-12  # a probability never taken as exactly zero (log of it)

# One position: token id -> logprob, and the id ranked first.
Distribution = tuple[dict[int, float], int]


@dataclass(frozen=True)
class Window:
    """One chat-formatted sequence and the first position of the answer in it."""

    tokens: tuple[int, ...]
    answer_start: int


@dataclass(frozen=True)
class Reference:
    """The base's next-token distributions on the windows (its top REFERENCE_K at each answer position)."""

    windows: tuple[Window, ...]
    positions: tuple[tuple[Distribution, ...], ...]  # per window, per answer position

    def as_dict(self) -> dict:
        return {"windows": [{"tokens": list(w.tokens), "answer_start": w.answer_start} for w in self.windows],
                "positions": [[[{str(t): lp for t, lp in top.items()}, first] for top, first in window]
                              for window in self.positions]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> Reference:
        return cls(windows=tuple(Window(tuple(w["tokens"]), int(w["answer_start"])) for w in data["windows"]),
                   positions=tuple(tuple(({int(t): float(lp) for t, lp in top.items()}, int(first))
                                         for top, first in window) for window in data["positions"]))  # fmt: skip


@dataclass(frozen=True)
class Agreement:
    kld: float  # mean over answer positions, nats
    top1: float  # share of answer positions whose most likely token is the base's
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


def position_kld(reference: dict[int, float], variant: dict[int, float]) -> float:
    """KL(base || rung) over {each of the base's tokens in `reference`} + {the rest}, from logprobs."""
    floor = min(math.exp(lp) for lp in variant.values()) if variant else _FLOOR
    p = {t: math.exp(lp) for t, lp in reference.items()}
    q = {t: math.exp(variant[t]) if t in variant else floor for t in reference}
    p_rest, q_rest = max(1.0 - sum(p.values()), 0.0), max(1.0 - sum(q.values()), _FLOOR)
    kld = sum(pt * math.log(pt / max(q[t], _FLOOR)) for t, pt in p.items() if pt > 0)
    if p_rest > 0:
        kld += p_rest * math.log(p_rest / q_rest)
    return max(kld, 0.0)


def compare(reference: Reference, variant: tuple[tuple[Distribution, ...], ...]) -> Agreement:
    """The rung's distributions (same windows, VARIANT_K each) against the base's."""
    klds, same = [], 0
    for base_window, rung_window in zip(reference.positions, variant, strict=True):
        for (base_top, base_first), (rung_top, rung_first) in zip(base_window, rung_window, strict=True):
            klds.append(position_kld(base_top, rung_top))
            same += base_first == rung_first
    if not klds:
        raise ValueError("no answer positions to compare")
    return Agreement(kld=sum(klds) / len(klds), top1=same / len(klds), positions=len(klds))


def _distribution(entry: dict, k: int) -> Distribution:
    """vLLM's prompt_logprobs entry ({token: {logprob, rank}}): its top k and the id ranked first. The
    token actually in the prompt is in the entry even when it is outside the top k: dropped then."""
    ranked = sorted(entry.items(), key=lambda item: item[1]["rank"])
    top = {int(token): float(value["logprob"]) for token, value in ranked if value["rank"] <= k}
    return top, int(ranked[0][0])


async def _tokenize(http: httpx.AsyncClient, base_url: str, model: str, messages: list[dict],
                    generation_prompt: bool) -> list[int]:  # fmt: skip
    response = await http.post(f"{base_url}/tokenize", json={
        "model": model, "messages": messages, "add_generation_prompt": generation_prompt,
        "continue_final_message": False, "add_special_tokens": False})  # fmt: skip
    response.raise_for_status()
    return response.json()["tokens"]


async def chat_windows(http: httpx.AsyncClient, base_url: str, model: str, answers: tuple[str, ...]
                       ) -> tuple[Window, ...]:  # fmt: skip
    """Each prompt of the chat set with `answers` (the base's) as the assistant turn, through the engine's
    own chat template."""

    async def one(prompt: str, answer: str) -> Window:
        user = [{"role": "user", "content": prompt}]
        prefix = await _tokenize(http, base_url, model, user, True)
        tokens = await _tokenize(http, base_url, model, [*user, {"role": "assistant", "content": answer}], False)
        # The answer starts where the two stop agreeing: an answer that begins with whitespace can merge with
        # the generation prompt's last token ("\n" + "\n" is one token), so that token is scored as the answer's.
        start = next((i for i, (a, b) in enumerate(zip(prefix, tokens)) if a != b), min(len(prefix), len(tokens)))
        if start == 0 or start >= len(tokens):
            raise ValueError("no answer tokens after the prompt in the chat template's rendering")
        return Window(tuple(tokens), start)

    pairs = [(prompt, answer) for (prompt, _), answer in zip(PROMPTS, answers, strict=True) if answer.strip()]
    return tuple(await asyncio.gather(*(one(p, a) for p, a in pairs)))


async def distributions(http: httpx.AsyncClient, base_url: str, model: str, windows: tuple[Window, ...], k: int,
                        batch: int = 8) -> tuple[tuple[Distribution, ...], ...]:  # fmt: skip
    """The engine's top-k next-token distributions at every answer position of every window."""
    out: list[tuple[Distribution, ...]] = []
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        response = await http.post(f"{base_url}/v1/completions", json={
            "model": model, "prompt": [list(w.tokens) for w in chunk], "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": k})  # fmt: skip
        response.raise_for_status()
        for choice in sorted(response.json()["choices"], key=lambda c: c["index"]):
            window = chunk[choice["index"]]
            # prompt_logprobs[i] is the distribution that predicted token i: answer tokens from answer_start on.
            entries = choice["prompt_logprobs"][window.answer_start :]
            out.append(tuple(_distribution(entry, k) for entry in entries))
    return tuple(out)


async def reference(http: httpx.AsyncClient, base_url: str, model: str, answers: tuple[str, ...]) -> Reference:
    """The base's distributions on its own answers (stored once, compared against every rung)."""
    windows = await chat_windows(http, base_url, model, answers)
    return Reference(windows, await distributions(http, base_url, model, windows, REFERENCE_K))


async def agreement(http: httpx.AsyncClient, base_url: str, model: str, ref: Reference) -> Agreement:
    """A rung against the base's reference."""
    return compare(ref, await distributions(http, base_url, model, ref.windows, VARIANT_K))


def judge_agreement(result: Agreement, gate: ChatGate) -> str | None:
    """None when the rung passes; else the reason, with the numbers (prefixed like the chat gate's)."""
    if result.kld > gate.max_kld:
        return f"chat: next-token KL from the base {result.kld:.3f} > {gate.max_kld:.3f} ({result.positions} positions)"
    if result.top1 < gate.min_top1:
        return (f"chat: next-token top-1 agreement with the base {result.top1:.2f} < {gate.min_top1:.2f} "
                f"({result.positions} positions)")
    return None
