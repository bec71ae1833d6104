"""Busy loops under trio's MockClock: an error naming the busiest task instead of a hang."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio


class SpinError(AssertionError):
    """Tasks kept running while the mock clock stood still: a busy loop (see SpinGuard)."""


class SpinGuard(trio.abc.Instrument):
    """Notices a busy loop under ``MockClock(autojump_threshold=0)``.

    The autojump clock only moves when every task is blocked, so a task that loops through
    checkpoints without ever waiting freezes simulated time: ``trio.fail_after`` never fires
    and the test would hang. This instrument counts task steps while ``trio.current_time()``
    stays the same; past ``step_limit`` steps and ``wall_limit`` seconds of real time it
    calls ``on_spin`` once, with a description naming the busiest tasks. (On trio's real
    clock time always moves, so it never fires.)
    """

    def __init__(
        self, on_spin: Callable[[str], None], *, wall_limit: float, step_limit: int = 10_000
    ) -> None:
        self._on_spin = on_spin
        self._wall_limit = wall_limit
        self._step_limit = step_limit
        self._frozen_at = -math.inf
        self._since = time.monotonic()
        self._tasks: Counter[str] = Counter()
        self._steps = 0
        self.most_steps = 0  # the longest run of steps at one instant so far
        self.fired = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        now = trio.current_time()
        if now != self._frozen_at:
            self._frozen_at = now
            self._since = time.monotonic()
            self._steps = 0
            self._tasks.clear()
            return
        self._steps += 1
        self.most_steps = max(self.most_steps, self._steps)
        self._tasks[task.name] += 1
        if (
            not self.fired
            and self._steps >= self._step_limit
            and self._steps % 1000 == 0
            and time.monotonic() - self._since > self._wall_limit
        ):
            self.fired = True
            busiest = ", ".join(f"{name} ({n} steps)" for name, n in self._tasks.most_common(3))
            self._on_spin(
                f"busy loop: {self._steps} task steps in {time.monotonic() - self._since:.1f} s "
                f"of wall time while trio's clock stood still at {now:.6f}; busiest: {busiest}"
            )


@asynccontextmanager
async def spin_guard(wall_limit: float = 0.5) -> AsyncIterator[SpinGuard]:
    """Cancel the block and raise ``SpinError`` if tasks busy-loop while trio's clock stands
    still for ``wall_limit`` seconds of wall time (see ``SpinGuard``), instead of hanging."""
    spins: list[str] = []
    token = trio.lowlevel.current_trio_token()
    try:
        with trio.CancelScope() as scope:

            def on_spin(description: str) -> None:
                spins.append(description)
                token.run_sync_soon(scope.cancel)

            guard = SpinGuard(on_spin, wall_limit=wall_limit)
            trio.lowlevel.add_instrument(guard)
            try:
                yield guard
            finally:
                trio.lowlevel.remove_instrument(guard)
    except BaseException as exc:
        # Whatever the cancellation turned into on its way out, the spin is the cause.
        if spins:
            raise SpinError(spins[0]) from exc
        raise
    if spins:
        raise SpinError(spins[0])
