"""Small helpers shared by the coordinator and the client."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import trio


@contextmanager
def unwrap_single_exception() -> Iterator[None]:
    """Let users catch ``ConecError`` (or their own exception), not an ExceptionGroup.

    Our nurseries wrap whatever crosses them in a group; when exactly one exception is
    inside (cancellations aside), raise that one instead, as it was (its own cause kept).
    Only the nursery's group is unwrapped: a group the user raised stays a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inner = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        if len(inner) == 1:
            exc = inner[0]
            raise exc from exc.__cause__
        if not inner:
            exc = group.exceptions[0]
            raise exc from None
        raise


async def wait_any(*events: trio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def stop_when(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(stop_when, event)


def system_ca_location() -> tuple[str | None, str | None]:
    """(cafile, capath) of the system trust store, as OpenSSL was built to find it."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile, paths.capath


# aioquic logs every failure it sees ("Error: 298, reason: ...") on its own logger, at
# WARNING, beside the error our own code raises or logs about the same failure.
AIOQUIC_LOGGERS = ("quic", "http3")


def quiet_aioquic_logs() -> None:
    """Silence aioquic's own WARNING lines (its loggers pass ERROR only), unless the user set
    those loggers' level already: then theirs stands."""
    for name in AIOQUIC_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


class TokenBucket:
    """A rate limit: ``burst`` events at once, then ``rate`` a second on average (trio's
    clock, so tests on a MockClock see it exactly)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._refilled_at: float | None = None

    def take(self) -> bool:
        """Count one event: True if it is within the limit, False if it is over."""
        now = trio.current_time()
        if self._refilled_at is not None:
            elapsed = now - self._refilled_at
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._refilled_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
