"""Requests to the coordinator over the control stream, matched to replies by request id.

A lost connection fails every waiting request at once with the loss's ``DisconnectedError``
(no polling, and never a bare ``trio.EndOfChannel``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import trio

from ._exceptions import ConecError, DisconnectedError


class Requests:
    """The request ids in use and the tasks waiting for their replies."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self._send = send  # writes one control message
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[Any]] = {}
        self._lost: ConecError | None = None

    async def request(self, make: Callable[[int], Any]) -> Any:
        """Send ``make(rid)`` and return the reply that carries ``rid``.

        Raises ``DisconnectedError`` if the connection is lost before the reply arrives.
        """
        self._raise_if_lost()
        rid = next(self._ids)
        send, recv = trio.open_memory_channel[Any](1)
        self._waiting[rid] = send
        try:
            self._send(make(rid))
            try:
                return await recv.receive()
            except trio.EndOfChannel:
                self._raise_if_lost()
                raise DisconnectedError("the coordinator connection closed") from None
        finally:
            self._waiting.pop(rid, None)

    def reply(self, msg: Any) -> bool:
        """Hand a reply to its waiter; False if it answers nothing we wait for."""
        rid = getattr(msg, "rid", None)
        waiter = self._waiting.pop(rid, None) if isinstance(rid, int) else None
        if waiter is None:
            return False
        waiter.send_nowait(msg)
        return True

    def connection_lost(self, cause: ConecError) -> None:
        """Fail every waiting request (and later ones) with ``cause``."""
        if self._lost is None:
            self._lost = cause
        for waiter in self._waiting.values():
            waiter.close()
        self._waiting.clear()

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise DisconnectedError(str(self._lost)) from self._lost
