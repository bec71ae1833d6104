"""Trio-side helpers for the benchmark child processes (see ``_procs`` for the other side)."""

from __future__ import annotations

import time
from typing import Any

import trio

from ._procs import Link


async def from_parent(link: Link, limit: float) -> Any:
    """The parent's next message (waiting at most ``limit`` seconds); ``None`` if the parent
    has gone away."""
    with trio.fail_after(limit):
        await trio.lowlevel.wait_readable(link.fileno())
    try:
        return link.recv(0)
    except EOFError:
        return None


def trio_time(monotonic_t: float) -> float:
    """The trio clock reading at system monotonic time ``monotonic_t`` (which, unlike trio's
    clock, is shared by all processes: the parent plans windows in it)."""
    return trio.current_time() + (monotonic_t - time.monotonic())


def usage() -> dict[str, float]:
    """This process's CPU seconds so far and its peak RSS (KiB)."""
    import resource  # Unix only, like the benchmarks

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kib": float(ru.ru_maxrss)}
