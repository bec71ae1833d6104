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


def system_ca_location() -> tuple[str | None, str | None]:
    """(cafile, capath) of the system trust store, as OpenSSL was built to find it."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile, paths.capath
