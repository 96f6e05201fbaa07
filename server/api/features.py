"""What the router needs to know about a request: its latency budget (headers or body), its
service tier, and estimates of its prompt and output lengths."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from server.errors import InvalidRequest
from server.routing.types import Budget

# header -> which bound it sets. The llm-d names and their older x-slo-* spellings both work.
BUDGET_HEADERS = {
    "x-latency-budget-ms": "e2e",
    "x-llm-d-slo-ttft-ms": "ttft",
    "x-slo-ttft-ms": "ttft",
    "x-llm-d-slo-tpot-ms": "tpot",
    "x-slo-tpot-ms": "tpot",
}
MAX_MS = {"e2e": 3_600_000.0, "ttft": 3_600_000.0, "tpot": 60_000.0}
CHARS_PER_TOKEN = 4  # a tokenizer on the request path would cost more than the estimate is off


def _parse_ms(header: str, raw: str, kind: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"header {header} must be a number of milliseconds, got {raw[:40]!r}",
                             param=header) from None  # fmt: skip
    if not math.isfinite(value) or value <= 0 or value > MAX_MS[kind]:
        raise InvalidRequest(f"header {header} must be in (0, {MAX_MS[kind]:.0f}] ms, got {raw[:40]}", param=header)
    return value


def request_budget(headers: Mapping[str, str], body_budget_ms: float | None) -> Budget:
    """The request's own budget. When two sources set the same bound, the tighter one holds."""
    bounds: dict[str, float] = {}
    for header, kind in BUDGET_HEADERS.items():
        raw = headers.get(header)
        if raw is not None:
            value = _parse_ms(header, raw, kind)
            bounds[kind] = min(bounds.get(kind, value), value)
    if body_budget_ms is not None:
        bounds["e2e"] = min(bounds.get("e2e", body_budget_ms), body_budget_ms)
    if not bounds:
        return Budget()
    return Budget(bounds.get("e2e"), bounds.get("ttft"), bounds.get("tpot"), source="request")


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts
        return sum(len(p.get("text", "")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Prompt length in tokens, estimated from characters (chat) or counted (token-id prompts)."""
    if "messages" in body:
        chars = sum(_text_chars(m.get("content")) for m in body["messages"] if isinstance(m, dict))
        return chars // CHARS_PER_TOKEN + 4 * len(body["messages"]) + 1  # role tokens of the template
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return len(prompt)
    return len(prompt) // CHARS_PER_TOKEN + 1 if isinstance(prompt, str) else 1
