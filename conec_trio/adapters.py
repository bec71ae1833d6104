"""Adapters that work on any Trio channel: they know nothing about the network.

- :func:`untagged` drops the sender ids from a broadcast receiver.
- :func:`open_nonblocking` drains a receiver in the background into a bounded buffer that
  drops the oldest messages, so a slow reader never holds a sender back; the reader learns
  how many it missed from :class:`~conec_trio.Lagged`.
- :class:`CborSendChannel` / :class:`CborReceiveChannel` carry CBOR-encodable Python values
  instead of bytes.

They stack: ``CborReceiveChannel(untagged(nb))`` where ``nb`` came from ``open_nonblocking``
decodes the newest values of a broadcast channel without ever slowing its senders down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

import trio

from ._cbor_channels import CborReceiveChannel, CborSendChannel
from ._exceptions import ConecError, Lagged
from ._types import BroadcastMessage

__all__ = ["CborReceiveChannel", "CborSendChannel", "open_nonblocking", "untagged"]

T = TypeVar("T")


# --- untagged ------------------------------------------------------------------------------


class _UntaggedReceiveChannel(trio.abc.ReceiveChannel[T]):
    """A broadcast receiver that returns each message's ``data`` without its sender."""

    def __init__(self, recv: trio.abc.ReceiveChannel[BroadcastMessage[T]]) -> None:
        self._recv = recv

    async def receive(self) -> T:
        """Return the data of the next broadcast message.

        Raises whatever the wrapped receiver raises: :exc:`trio.EndOfChannel` when every
        sender has closed, :exc:`trio.BrokenResourceError` if the channel broke,
        :exc:`trio.ClosedResourceError` after :meth:`aclose`, and
        :exc:`~conec_trio.Lagged` from a receiver made by :func:`open_nonblocking`.
        :exc:`TypeError` if an item is not a :class:`~conec_trio.BroadcastMessage`.
        """
        message: object = await self._recv.receive()  # checked: channels are not type-safe
        if not isinstance(message, BroadcastMessage):
            raise TypeError(
                f"untagged() needs a receiver of BroadcastMessage items, got "
                f"{type(message).__name__}"
            )
        data: T = message.data
        return data

    async def aclose(self) -> None:
        """Close the wrapped receiver (idempotent)."""
        await self._recv.aclose()


def untagged(recv: trio.abc.ReceiveChannel[BroadcastMessage[T]]) -> trio.abc.ReceiveChannel[T]:
    """Wrap a broadcast receiver so that it yields each message's data without the sender id.

    ``recv`` may be any receive channel of :class:`~conec_trio.BroadcastMessage` items,
    including the one :func:`open_nonblocking` yields (its :exc:`~conec_trio.Lagged` passes
    through unchanged). Closing the result closes ``recv``.
    """
    return _UntaggedReceiveChannel(recv)


# --- open_nonblocking -------------------------------------------------------------------------


class _Failure:
    """A per-message error of the source (a ConecError), kept in order among the messages."""

    __slots__ = ("error",)

    def __init__(self, error: ConecError) -> None:
        self.error = error


class _NonblockingReceiveChannel(trio.abc.ReceiveChannel[T]):
    """The reader's end of :func:`open_nonblocking`; a background task fills its buffer."""

    def __init__(self, source: trio.abc.ReceiveChannel[T], capacity: int) -> None:
        self._source = source
        self._capacity = capacity
        self._buffer: deque[T | _Failure] = deque()
        self._dropped = 0  # dropped since the reader last saw Lagged
        self._source_done = False
        self._source_error: BaseException | None = None  # None with _source_done: clean end
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()  # readers waiting for something to happen
        # The drain task's lifetime belongs to open_nonblocking alone: shielded from outside
        # cancellation, it ends when this scope is cancelled on the way out of the block.
        self._drain_scope = trio.CancelScope(shield=True)

    # The background side.

    def _push(self, entry: T | _Failure) -> None:
        if len(self._buffer) >= self._capacity:
            self._buffer.popleft()
            self._dropped += 1
        self._buffer.append(entry)
        self._lot.unpark_all()

    def _finish(self, error: BaseException | None) -> None:
        self._source_done = True
        self._source_error = error
        self._lot.unpark_all()

    async def _drain(self) -> None:
        with self._drain_scope:
            while True:
                try:
                    item = await self._source.receive()
                except Lagged as exc:  # the source is itself non-blocking: its drops are ours
                    self._dropped += exc.count
                    self._lot.unpark_all()
                except trio.EndOfChannel:
                    self._finish(None)
                    return
                except trio.ClosedResourceError as exc:
                    if not self._closed:  # closed by someone other than our reader
                        self._finish(exc)
                    return
                except ConecError as exc:  # one bad message (say, bad CBOR); later ones are fine
                    self._push(_Failure(exc))
                except Exception as exc:  # BrokenResourceError, or a source that failed for good
                    self._finish(exc)
                    return
                else:
                    self._push(item)
                    continue
                # Only error paths get here: make sure even a source that raises without
                # checkpointing cannot starve every other task.
                await trio.lowlevel.checkpoint()

    # The reader's side.

    async def receive(self) -> T:
        """Return the oldest buffered message, waiting for one if the buffer is empty.

        Raises :exc:`~conec_trio.Lagged` (once) if messages were dropped since the last
        report, with ``.count`` saying how many; later calls go on with the buffered
        messages. Raises :exc:`trio.EndOfChannel` once the source has ended and every
        buffered message was read, :exc:`trio.BrokenResourceError` (chained from the
        source's error) once the source failed and every buffered message was read, and
        :exc:`trio.ClosedResourceError` after :meth:`aclose` or after leaving the
        ``open_nonblocking`` block. A per-message :class:`~conec_trio.ConecError` of the
        source (for example bad CBOR) is raised in its place among the messages.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this non-blocking receiver was closed")
            if self._dropped:
                count, self._dropped = self._dropped, 0
                await trio.lowlevel.cancel_shielded_checkpoint()
                raise Lagged(count)
            if self._buffer:
                entry = self._buffer.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()
                if isinstance(entry, _Failure):
                    raise entry.error
                return entry
            if self._source_done:
                await trio.lowlevel.cancel_shielded_checkpoint()
                if self._source_error is None:
                    raise trio.EndOfChannel
                raise trio.BrokenResourceError(
                    f"the channel this non-blocking receiver drains failed: {self._source_error!r}"
                ) from self._source_error
            await self._lot.park()  # a checkpoint; the drain task or aclose() wakes us

    async def aclose(self) -> None:
        """Close this receiver and the channel it drains (idempotent).

        Buffered messages are discarded; tasks waiting in :meth:`receive` and every later
        call raise :exc:`trio.ClosedResourceError`.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._close_reader()
        await self._source.aclose()

    def _close_reader(self) -> None:
        self._closed = True
        self._buffer.clear()
        self._dropped = 0
        self._drain_scope.cancel()
        self._lot.unpark_all()


@asynccontextmanager
async def _open_nonblocking(
    recv: trio.abc.ReceiveChannel[T], capacity: int
) -> AsyncIterator[trio.abc.ReceiveChannel[T]]:
    nb = _NonblockingReceiveChannel(recv, capacity)
    # The nursery is entered and exited by hand so that what the body raises never passes
    # through it: users catch their own exception, not an ExceptionGroup wrapped around it.
    # The drain task raises nothing, so leaving the nursery raises nothing either.
    nursery_manager = trio.open_nursery()
    nursery = await nursery_manager.__aenter__()
    try:
        # start_soon, not start: the drain task is shielded from outside cancellation, and a
        # task start()ed in a cancelled scope would stay in start()'s own nursery. Nothing is
        # lost before it runs: messages wait in ``recv`` until it does.
        nursery.start_soon(nb._drain, name="conec_trio.open_nonblocking drain")
        await trio.lowlevel.checkpoint()  # opening is a checkpoint, like trio's own open_*
        yield nb
    finally:
        try:
            nb._close_reader()  # also cancels the drain task
            # Waits for the drain task, which is on its way out; a cancellation of ours does
            # not interrupt that wait (trio's nurseries never raise Cancelled from it).
            await nursery_manager.__aexit__(None, None, None)
        finally:
            await recv.aclose()


def open_nonblocking(
    recv: trio.abc.ReceiveChannel[T], capacity: int
) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[T]]:
    """Drain ``recv`` in the background so that its sender is never held back by this reader.

    Use as ``async with open_nonblocking(recv, capacity) as nb:``. A background task (in a
    nursery this context manager owns) receives from ``recv`` as fast as messages arrive and
    keeps the newest ``capacity`` of them; when the buffer is full the OLDEST message is
    dropped. ``nb.receive()`` then raises :exc:`~conec_trio.Lagged` whose ``.count`` is how
    many were dropped since the last report, before going on with the buffered messages, and
    :exc:`trio.EndOfChannel` after the last of them once ``recv`` has ended. If ``recv``
    breaks, the buffered messages are still delivered, then :exc:`trio.BrokenResourceError`.
    A :exc:`~conec_trio.Lagged` raised by ``recv`` itself (stacked adapters) is added to
    this receiver's count.

    Works on plain and broadcast receivers alike. Leaving the block stops the background
    task and closes ``recv``; ``nb`` raises :exc:`trio.ClosedResourceError` from then on, as
    it does after ``nb.aclose()`` (which closes ``recv`` as well).

    Raises :exc:`ValueError` if ``capacity`` is less than 1 and :exc:`TypeError` if it is
    not an int.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, not {capacity}")
    return _open_nonblocking(recv, capacity)
