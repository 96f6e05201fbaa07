"""The next-token comparison's arithmetic (optimizers/next_token.py), against values worked by hand."""

from __future__ import annotations

import math

import pytest

from optimizers.next_token import Reference, Window, _distribution, compare, position_kld


def _lp(probs: dict[int, float]) -> dict[int, float]:
    return {t: math.log(p) for t, p in probs.items()}


def test_kld_over_the_base_tokens_and_the_rest() -> None:
    # p = (.5, .3, rest .2), q = (.4, .4, rest .2): .5 ln(.5/.4) + .3 ln(.3/.4) + .2 ln(.2/.2)
    kld = position_kld(_lp({1: 0.5, 2: 0.3}), _lp({1: 0.4, 2: 0.4, 3: 0.1}))
    assert kld == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4), abs=1e-9)
    assert kld == pytest.approx(0.025267, abs=1e-6)


def test_a_base_token_outside_the_rungs_top_k_gets_its_smallest_probability() -> None:
    # Token 5 is not among the rung's (.7, .1, .05): taken as .05; the rung's rest is 1 - .7 - .05 = .25.
    kld = position_kld(_lp({1: 0.6, 5: 0.2}), _lp({1: 0.7, 2: 0.1, 3: 0.05}))
    expected = 0.6 * math.log(0.6 / 0.7) + 0.2 * math.log(0.2 / 0.05) + 0.2 * math.log(0.2 / 0.25)
    assert kld == pytest.approx(expected, abs=1e-9) and kld == pytest.approx(0.140140, abs=1e-6)


def test_the_same_distribution_is_zero_and_never_negative() -> None:
    same = _lp({1: 0.6, 2: 0.3})
    assert position_kld(same, {**same, 3: math.log(0.05)}) == pytest.approx(0.0, abs=1e-12)
    assert position_kld(_lp({1: 0.999999}), _lp({1: 0.999999})) >= 0.0


def test_compare_means_over_answer_positions_and_counts_top1() -> None:
    window = Window((1, 2, 3, 4), answer_start=2)
    base = ((_lp({7: 0.5, 8: 0.3}), 7), (_lp({9: 0.9}), 9))
    reference = Reference((window,), (base,))
    rung = (((_lp({7: 0.4, 8: 0.4, 3: 0.1}), 7), (_lp({4: 0.6, 9: 0.3}), 4)),)
    result = compare(reference, rung)
    first = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    second = 0.9 * math.log(0.9 / 0.3) + 0.1 * math.log(0.1 / 0.7)  # the rung's token 4 is in its rest
    assert result.positions == 2 and result.top1 == 0.5
    assert result.kld == pytest.approx((first + second) / 2, abs=1e-9)


def test_vllm_entries_keep_the_top_k_and_drop_the_prompt_token_outside_it() -> None:
    entry = {"11": {"logprob": -3.0, "rank": 7}, "5": {"logprob": -0.2, "rank": 1},
             "6": {"logprob": -1.9, "rank": 2}}  # fmt: skip
    assert _distribution(entry, 2) == ({5: -0.2, 6: -1.9}, 5)


def test_the_reference_survives_json() -> None:
    import json

    ref = Reference((Window((1, 2, 3), 1),), (((_lp({4: 0.5}), 4), (_lp({5: 0.25, 6: 0.5}), 6)),))
    assert Reference.from_dict(json.loads(json.dumps(ref.as_dict()))) == ref


def test_the_gate_names_the_measure_and_its_value() -> None:
    from optimizers.chat_quality import ChatGate
    from optimizers.next_token import Agreement, judge_agreement

    gate = ChatGate(max_kld=0.5, min_top1=0.6)
    assert judge_agreement(Agreement(kld=0.2, top1=0.8, positions=500), gate) is None
    too_far = judge_agreement(Agreement(kld=0.75, top1=0.8, positions=500), gate)
    assert too_far == "chat: next-token KL from the base 0.750 > 0.500 (500 positions)"
    disagrees = judge_agreement(Agreement(kld=0.2, top1=0.55, positions=500), gate)
    assert disagrees == "chat: next-token top-1 agreement with the base 0.55 < 0.60 (500 positions)"


def test_the_answer_starts_where_the_rendering_leaves_the_prompt() -> None:
    # The engine's /tokenize, faked at the HTTP boundary: the prompt renders as [1, 2, 3] ("...assistant\n");
    # an answer that begins with "\n" merges with the prompt's last token (3 -> 9), so it starts at index 2.
    import asyncio

    import httpx

    from optimizers.chat_quality import PROMPTS
    from optimizers.next_token import chat_windows

    def fake_engine(request: httpx.Request) -> httpx.Response:
        import json

        body = json.loads(request.content)
        if body["add_generation_prompt"]:
            return httpx.Response(200, json={"tokens": [1, 2, 3]})
        answer = body["messages"][-1]["content"]
        return httpx.Response(200, json={"tokens": [1, 2, 9, 7] if answer.startswith("\n") else [1, 2, 3, 7, 8]})

    async def windows() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake_engine)) as http:
            answers = ["\nParis"] + ["Tokyo."] * (len(PROMPTS) - 2) + [""]  # an empty answer has no window
            return await chat_windows(http, "http://engine", "m", tuple(answers))

    found = asyncio.run(windows())
    assert len(found) == len(PROMPTS) - 1
    assert (found[0].tokens, found[0].answer_start) == ((1, 2, 9, 7), 2)
    assert (found[1].tokens, found[1].answer_start) == ((1, 2, 3, 7, 8), 3)
