"""Small helpers shared by the coordinator and the client."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import trio


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]


@contextmanager
def unwrap_single_exception() -> Iterator[None]:
    """Let users catch ``ConecError`` (or their own exception), not an ExceptionGroup.

    Our nurseries wrap whatever crosses them in a group; when exactly one real exception is
    inside (cancellations aside), raise that one instead.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from group.__cause__
        if not real and leaves:
            raise leaves[0] from None
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
