"""The chat gate (optimizers/chat_quality.py): facts, loops and agreement judged against the base."""

from __future__ import annotations

import pytest

import math

from optimizers.chat_quality import (
    PROMPTS,
    ChatGate,
    Expect,
    agreement,
    is_correct,
    is_looping,
    is_refusal,
    judge,
    score,
    sentences,
)

# Answers a real int8 rung gave (FACTS, 2026-12-04) and a few shapes around them.
FRENCH_LOOP = "L'Étoile de France, la femme de France, la femme de France, "


@pytest.mark.parametrize(("answer", "keywords", "expected"), [
    ("The capital of France is Paris.", ("Paris",), True),
    ("L'Étoile de la Cité, la Cité de la France, is the capital of France.", ("Paris",), False),
    ("paris, of course", ("Paris",), True),
    ("Parisian cafés are nice", ("Paris",), False),  # a word, not a substring
    ("2 + 2 = 4.", ("4", "four"), True),
    ("It is 14.", ("4", "four"), False),
    ("Water freezes at 0°C.", ("0", "zero"), True),
    ("Water freezes at -18 degrees.", ("0", "zero"), False),
    ("Plants take in carbon dioxide.", ("carbon dioxide", "CO2"), True),
])  # fmt: skip
def test_a_fact_is_right_when_its_keyword_is_a_word_of_the_answer(answer: str, keywords: tuple, expected: bool) -> None:
    assert is_correct(answer, keywords) is expected


@pytest.mark.parametrize(("answer", "expected"), [
    (FRENCH_LOOP, True),
    ("Il Corfuo, il Corfuo, il Corfuo, il Corfuo", True),
    ("The capital of France is Paris.", False),
    ("The capital of Spain is Madrid. Madrid is also the largest city of Spain.", False),
    ("yes yes yes yes yes", True),
    ("", False),
])  # fmt: skip
def test_looping_answers_are_caught(answer: str, expected: bool) -> None:
    assert is_looping(answer) is expected


def _right(expect: Expect, phrase: str = "The answer is {}.") -> str:
    """An answer that meets `expect`: its first keyword, phrased one way (over three lines where asked)."""
    line = phrase.format(expect.keywords[0])
    return "\n".join([line] * (expect.min_lines or 1))


def _answers(right: int, loops: int = 0, text: str = "I am not sure about that one.") -> list[str]:
    """`right` correct answers, then `loops` looping ones, then `text`."""
    out = [_right(expect) for _, expect in PROMPTS[:right]]
    out += [FRENCH_LOOP] * loops
    return out + [text] * (len(PROMPTS) - len(out))


def test_the_set_has_forty_prompts_or_more_and_each_has_a_check() -> None:
    assert len(PROMPTS) >= 40 and len({p for p, _ in PROMPTS}) == len(PROMPTS)
    assert PROMPTS[0][0] == "What is the capital of France?"  # the sanity answer shown everywhere
    for prompt, expect in PROMPTS:
        assert expect.keywords, prompt
        assert expect.met_by(_right(expect)), prompt
        assert not expect.met_by(""), prompt


@pytest.mark.parametrize(("answer", "refusal"), [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot provide instructions for that.", True),
    ("As an AI, I do not have opinions on this.", True),
    ("I am unable to answer that question.", True),
    ("To kill a Python process on Linux, use `kill PID`.", False),
    ("I can help: the capital of France is Paris.", False),
])  # fmt: skip
def test_refusals_are_caught_and_never_right(answer: str, refusal: bool) -> None:
    assert is_refusal(answer) is refusal
    kill = next(expect for prompt, expect in PROMPTS if "kill a Python process" in prompt)
    assert kill.met_by(answer + " kill") is not refusal


@pytest.mark.parametrize(("answer", "count"), [
    ("A noun is a word that refers to a person, place, thing, or idea.", 1),
    ("The closest star is about 4.22 light-years away. It is Proxima Centauri.", 2),
    ("The ocean is a vast body of water that surrounds the Earth and is home to", 1),  # cut at 32 tokens
    ("Yes! It is. Really?", 3),
    ("", 0),
])  # fmt: skip
def test_sentences_are_counted(answer: str, count: int) -> None:
    assert sentences(answer) == count


def test_format_prompts_check_the_format_as_well_as_the_content() -> None:
    noun = Expect(("person", "thing"), max_sentences=1)
    assert noun.met_by("A noun is a word that names a person, place or thing.")
    assert not noun.met_by("A noun names a person. It can also name a thing.")  # two sentences
    haiku = Expect(("sea",), min_lines=3)
    assert haiku.met_by("The waves of the sea,\na silent beauty,\nthe ocean's edge")
    assert not haiku.met_by("The sea is calm and blue today.")  # one line


def test_score_counts_facts_and_loops() -> None:
    result = score(_answers(right=10, loops=3))
    assert (result.correct, result.loops, result.prompts) == (10, 3, len(PROMPTS))
    with pytest.raises(ValueError, match="answers for"):
        score(["one answer"])


def test_agreement_is_the_shared_start_of_the_base_answers() -> None:
    base = score(_answers(right=12))
    assert agreement(base, base) == 1.0
    other = score(["Je ne sais pas."] * len(PROMPTS))
    assert agreement(other, base) == 0.0
    half = score([a if i % 2 else "Something else entirely." for i, a in enumerate(base.answers)])
    assert agreement(half, base) == pytest.approx((len(PROMPTS) // 2) / len(PROMPTS))  # every other answer


GATE = ChatGate()  # 12.5% of the set fewer right, 2 extra loops, agreement 0.2
N = len(PROMPTS)
MARGIN = math.floor(GATE.max_correct_drop * N)  # 6 of 49


@pytest.mark.parametrize(("variant", "fragment"), [
    (_answers(right=30), None),  # as right as the base
    (_answers(right=32), None),  # better than the base: fine
    (_answers(right=30 - MARGIN), None),  # the margin
    (_answers(right=29 - MARGIN), f"{29 - MARGIN}/{N} facts right vs the base's 30 (at most {MARGIN} fewer allowed)"),
    (_answers(right=30, loops=3), f"3/{N} answers loop vs the base's 0"),
    (_answers(right=30, loops=2), None),
])  # fmt: skip
def test_the_gate_judges_a_rung_against_its_own_base(variant: list[str], fragment: str | None) -> None:
    base = score(_answers(right=30))
    verdict = judge(score(variant), base, GATE)
    assert verdict is None if fragment is None else fragment in verdict, verdict


def test_a_rung_that_keeps_the_facts_but_not_the_voice_is_rejected() -> None:
    base = score(_answers(right=14))
    # The same facts, said another way every time: no answer starts like the base's.
    other = score([_right(expect, "Réponse : {}.") for _, expect in PROMPTS[:14]] + ["Je ne sais pas."] * (N - 14))
    assert other.correct == 14
    assert "agreement with the base's answers 0.00 < 0.20" in judge(other, base, GATE)


def test_the_gate_rejects_bad_thresholds() -> None:
    with pytest.raises(ValueError):
        ChatGate(max_correct_drop=1.5)
    with pytest.raises(ValueError):
        ChatGate(min_agreement=-0.1)
