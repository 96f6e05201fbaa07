"""What users see: greedy chat answers of a variant to a fixed set of short factual prompts, judged
against the answers of its own base.

One greedy answer of a small model is a knife edge: SmolLM2-135M's int8 rung answers "What is the
capital of France?" in French with fp32 activations and "Paris" with bf16 ones, and the base itself
gets about 14 of 20 such facts right (FACTS, 2026-12-04). So a rung is judged on the whole set:

- correct: the answer meets its prompt's `Expect` (a keyword as a word; for format prompts, one
  sentence or three lines) and refuses nothing (every prompt is a normal request); the rung may get
  at most `max_correct_drop` (a fraction of the set) fewer right than its base;
- loops: an answer that repeats itself (the failure mode of a broken rung: "la femme de France, la
  femme de France, ..."); at most `max_extra_loops` more than the base;
- agreement: mean share of the base's answer (in words) that the rung's answer reproduces from its
  start, at least `min_agreement`. A rung that keeps the facts but no longer talks like its base
  (another language, another format) fails here.

Needs only httpx: it runs in the gateway's environment against a running engine.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass

import httpx
from pydantic import BaseModel, ConfigDict, Field

@dataclass(frozen=True)
class Expect:
    """What a right answer to one prompt looks like: one of `keywords` appears as a word (none: any
    text), in at most `max_sentences` sentences and at least `min_lines` lines where those are set.
    An answer that refuses (`is_refusal`) is never right: every prompt of the set is a normal request."""

    keywords: tuple[str, ...] = ()
    max_sentences: int | None = None
    min_lines: int | None = None

    def met_by(self, answer: str) -> bool:
        if not answer.strip() or is_refusal(answer):
            return False
        if self.keywords and not is_correct(answer, self.keywords):
            return False
        if self.max_sentences is not None and sentences(answer) > self.max_sentences:
            return False
        return self.min_lines is None or len([line for line in answer.splitlines() if line.strip()]) >= self.min_lines


def _facts(*pairs: tuple[str, tuple[str, ...]]) -> tuple[tuple[str, Expect], ...]:
    return tuple((prompt, Expect(keywords)) for prompt, keywords in pairs)


# The chat set: facts and arithmetic (a keyword as a word), following a format (one sentence, three
# lines), and normal requests a model must not refuse (one of them says "kill"). The first 24 are the
# set the gate started with; the bundled SmolLM2-135M-Instruct (fp32 on CPU, greedy, 32 tokens) gets 20
# of them right and all 25 of the others (picked from 50 tried: those whose check the base's answer
# passes, so that a rung losing them shows; of the first 24 it misses 4, where a rung may differ from
# it either way).
PROMPTS: tuple[tuple[str, Expect], ...] = _facts(
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What is 10 times 3?", ("30", "thirty")),
    ("How many days are in a week?", ("7", "seven")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the chemical formula of water?", ("H2O", "H₂O")),
    ("At what temperature in degrees Celsius does water freeze?", ("0", "zero")),
    ("Which planet do we live on?", ("Earth",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in the solar system?", ("Jupiter",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("Which gas do plants take in from the air to make food?", ("carbon dioxide", "CO2", "CO₂")),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("At what temperature in degrees Celsius does water boil?", ("100", "one hundred")),
    ("How many continents are there?", ("7", "seven")),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("What is half of 10?", ("5", "five")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many legs does a dog have?", ("4", "four")),
    ("What is the longest river in Africa?", ("Nile",)),
    ("Who was the first person to walk on the Moon?", ("Armstrong",)),
    ("What is the main ingredient of bread?", ("flour",)),
    ('What is the plural of "mouse"?', ("mice",)),
    ("Give your answer as a single word: what is the opposite of up?", ("down",)),
) + (
    ("Explain what a noun is in one sentence.", Expect(("person", "place", "thing", "name"), max_sentences=1)),
    ("In one sentence, what is a cat?", Expect(("animal", "feline", "pet", "mammal"), max_sentences=1)),
    ("Describe the ocean in one sentence.", Expect(("water", "sea"), max_sentences=1)),
    ("What is the capital of Portugal? Answer in one sentence.", Expect(("Lisbon",), max_sentences=1)),
    ("Write a haiku about the sea.", Expect(("sea", "ocean", "wave", "waves"), min_lines=3)),
) + _facts(
    ("How can I kill a Python process on Linux?", ("kill", "pkill", "killall")),
    ("Give me a tip for sleeping better.", ("sleep", "sleeping", "bed", "bedtime")),
    ("Write a short greeting for a birthday card.", ("birthday",)),
    ("How do I cut an onion?", ("onion", "knife")),
    ("What should I pack for a day at the beach?", ("sunscreen", "towel", "water", "beach")),
)

MAX_TOKENS = 32


class ChatGate(BaseModel):
    """Thresholds a rung's chat answers must meet against its base's (QUANTGATE_CHAT_GATE)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_correct_drop: float = Field(0.125, ge=0, le=1, description="share of the set: 0.125 = 6 of 49 prompts")
    max_extra_loops: int = Field(2, ge=0, description="looping answers beyond the base's")
    min_agreement: float = Field(0.2, ge=0, le=1, description="mean share of the base's answer reproduced")
    # Next-token measures on the chat windows (optimizers/next_token.py); defaults from
    # loadtests/results/2026-12-06/next-token-gate.md: the bundled model's served rungs pass, a broken one fails.
    # (int8 0.026 / 0.92; one layer's MLP removed or tripled 0.21-0.24 / 0.78-0.80, which the ppl floor and
    # the answers above let through).
    max_kld: float = Field(0.15, ge=0, description="mean next-token KL from the base, nats")
    min_top1: float = Field(0.85, ge=0, le=1, description="share of positions whose top token is the base's")


@dataclass(frozen=True)
class ChatScore:
    answers: tuple[str, ...]
    correct: int
    loops: int
    prompts: int

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ChatScore:
        return cls(answers=tuple(data["answers"]), correct=int(data["correct"]), loops=int(data["loops"]),
                   prompts=int(data["prompts"]))

    @classmethod
    def stored(cls, data: dict | None) -> ChatScore | None:
        """A score stored by the registry, if it is one of the current set (a smaller, older set's is not)."""
        return cls.from_dict(data) if data and data.get("prompts") == len(PROMPTS) else None


def is_correct(answer: str, keywords: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", answer, re.IGNORECASE) for k in keywords)


REFUSAL = re.compile(r"\b(I can(?:no|')t (?:help|assist|provide|do|answer|comply)|I(?: am|'m) (?:not able|unable) to|"
                     r"I (?:won't|will not) (?:help|assist|provide)|as an AI\b)", re.IGNORECASE)


def is_refusal(answer: str) -> bool:
    """The answer declines the request ("I can't help with that", "As an AI, ...")."""
    return bool(REFUSAL.search(answer))


def sentences(answer: str) -> int:
    """Sentences in the answer: ends of sentence (. ! ? followed by a space or the end) and an
    unfinished last one ("4.22" and "e.g" inside a word do not end one)."""
    text = answer.strip()
    ends = re.findall(r"[.!?]+(?=\s|$)", text)
    tail = re.split(r"[.!?]+(?=\s|$)", text)[-1].strip()
    return len(ends) + (1 if tail else 0)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def is_looping(answer: str) -> bool:
    """A 3-word sequence three times, or a 5-word one twice, within one short answer."""
    words = _words(answer)
    for n, limit in ((3, 3), (5, 2)):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        if grams and max(grams.values()) >= limit:
            return True
    return False


def score(answers: list[str] | tuple[str, ...]) -> ChatScore:
    if len(answers) != len(PROMPTS):
        raise ValueError(f"{len(answers)} answers for {len(PROMPTS)} prompts")
    return ChatScore(answers=tuple(answers), prompts=len(PROMPTS),
                     correct=sum(expect.met_by(a) for a, (_, expect) in zip(answers, PROMPTS, strict=True)),
                     loops=sum(is_looping(a) for a in answers))  # fmt: skip


def agreement(variant: ChatScore, base: ChatScore) -> float:
    """Mean over prompts of the share of the base's answer (in words) the variant repeats from its start."""
    shares = []
    for mine, theirs in zip(variant.answers, base.answers, strict=True):
        a, b = _words(mine), _words(theirs)
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(common / len(b) if b else float(not a))
    return sum(shares) / len(shares)


def judge(variant: ChatScore, base: ChatScore, gate: ChatGate) -> str | None:
    """None when the variant passes; else the reason, with the numbers."""
    allowed = math.floor(gate.max_correct_drop * base.prompts + 1e-9)
    if variant.correct < base.correct - allowed:
        return (f"chat: {variant.correct}/{variant.prompts} facts right vs the base's {base.correct} "
                f"(at most {allowed} fewer allowed)")
    if variant.loops > base.loops + gate.max_extra_loops:
        return (f"chat: {variant.loops}/{variant.prompts} answers loop vs the base's {base.loops} "
                f"(at most {gate.max_extra_loops} more allowed)")
    shared = agreement(variant, base)
    if shared < gate.min_agreement:
        return f"chat: agreement with the base's answers {shared:.2f} < {gate.min_agreement:.2f}"
    return None


async def chat_answers(http: httpx.AsyncClient, base_url: str, model: str) -> ChatScore:
    """Greedy answers to every prompt of the set, sent together (the engine batches them)."""

    async def one(prompt: str) -> str:
        response = await http.post(f"{base_url}/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "seed": 0,
        })  # fmt: skip
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"] or ""

    return score(await asyncio.gather(*(one(prompt) for prompt, _ in PROMPTS)))
