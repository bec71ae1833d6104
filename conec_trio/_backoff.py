"""Pauses between attempts to reach the coordinator again."""

from __future__ import annotations

import random

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0


class Backoff:
    """Pauses between attempts: ``initial`` doubling up to ``maximum``, each with jitter (a
    random half to all of it), so that many clients of a restarted coordinator spread out."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        maximum: float = BACKOFF_MAX,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        base = self._next
        self._next = min(self.maximum, base * 2)
        return base * (0.5 + 0.5 * self._rng.random())
