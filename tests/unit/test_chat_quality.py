"""The chat gate (optimizers/chat_quality.py): facts, loops and agreement judged against the base."""

from __future__ import annotations

import pytest

from optimizers.chat_quality import PROMPTS, ChatGate, agreement, is_correct, is_looping, judge, score

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


def _answers(right: int, loops: int = 0, text: str = "I am not sure about that one.") -> list[str]:
    """`right` correct answers (the first keyword, phrased one way), then `loops` looping ones, then `text`."""
    out = [f"The answer is {keys[0]}." for _, keys in PROMPTS[:right]]
    out += [FRENCH_LOOP] * loops
    return out + [text] * (len(PROMPTS) - len(out))


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
    assert agreement(half, base) == pytest.approx(0.5, abs=0.01)


GATE = ChatGate()  # 3 of 24 facts, 2 extra loops, agreement 0.2


@pytest.mark.parametrize(("variant", "fragment"), [
    (_answers(right=14), None),  # as right as the base
    (_answers(right=16), None),  # better than the base: fine
    (_answers(right=11), None),  # 3 fewer: the margin
    (_answers(right=10), "10/24 facts right vs the base's 14"),
    (_answers(right=14, loops=3), "3/24 answers loop vs the base's 0"),
    (_answers(right=14, loops=2), None),
])  # fmt: skip
def test_the_gate_judges_a_rung_against_its_own_base(variant: list[str], fragment: str | None) -> None:
    base = score(_answers(right=14))
    verdict = judge(score(variant), base, GATE)
    assert verdict is None if fragment is None else fragment in verdict, verdict


def test_a_rung_that_keeps_the_facts_but_not_the_voice_is_rejected() -> None:
    base = score(_answers(right=14))
    # The same facts, said another way every time: no answer starts like the base's.
    other = score([f"Réponse : {keys[0]}." for _, keys in PROMPTS[:14]] + ["Je ne sais pas."] * (len(PROMPTS) - 14))
    assert other.correct == 14
    assert "agreement with the base's answers 0.00 < 0.20" in judge(other, base, GATE)


def test_the_gate_rejects_bad_thresholds() -> None:
    with pytest.raises(ValueError):
        ChatGate(max_correct_drop=1.5)
    with pytest.raises(ValueError):
        ChatGate(min_agreement=-0.1)
