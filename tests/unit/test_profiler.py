"""The profiler's prefill fit and its prompts (no engine: the profiling run itself is exercised against
FakeEngines and vLLM in tests/integration)."""

from __future__ import annotations

import pytest

from server.api.features import estimate_prompt_tokens
from server.telemetry.profiler import _text, fit_prefill


@pytest.mark.parametrize("estimate", [16, 17, 264, 512])
def test_profile_prompts_are_the_length_the_gateway_estimates_and_never_share_a_first_block(estimate: int) -> None:
    prompts = [_text(estimate, salt) for salt in range(1, 4)]
    assert all(estimate_prompt_tokens({"prompt": p}) == estimate for p in prompts)
    assert len({p[:16] for p in prompts}) == 3


def test_prefill_fit_is_least_squares_over_every_length() -> None:
    fixed, per_token = fit_prefill([(16, 21.0), (16, 19.0), (264, 30.0), (512, 40.0), (512, 40.0)])
    assert per_token == pytest.approx(0.0401, abs=1e-3) and fixed == pytest.approx(19.4, abs=0.2)


def test_prefill_fit_never_goes_below_zero() -> None:
    assert fit_prefill([(16, 5.0), (512, 1.0)]) == (pytest.approx(3.0), 0.0)  # a faster long prompt is noise
    # Faster than linear growth: the line's zero is below zero tokens; the short prompts keep a fixed part.
    fixed, per_token = fit_prefill([(16, 2.0), (264, 30.0), (512, 64.0)])
    assert per_token == pytest.approx(0.125, abs=1e-3) and fixed == pytest.approx(0.0)
    fixed, per_token = fit_prefill([(16, 3.0), (264, 20.0), (512, 64.0)])
    assert fixed == pytest.approx(3.0 - 16 * per_token) and fixed > 0
