"""The picker: highest total score first; near-equal scores go to the more accurate variant."""

from __future__ import annotations

from server.catalog import accuracy_key
from server.routing.types import Candidate

TIE = 1e-9


class MaxScorePicker:
    name = "max-score"

    def order(self, scored: list[tuple[Candidate, float]]) -> list[tuple[Candidate, float]]:
        """All candidates, best first (the first is picked, the rest are the retry order)."""
        return sorted(scored, key=lambda cs: (-round(cs[1] / TIE) * TIE, accuracy_key(cs[0].variant)))
