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
from collections.abc import AsyncIterator, Mapping, Sequence, Set
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import cbor2
import trio

from ._exceptions import BadCborError, ConecError, Lagged, ProtocolError
from ._types import BroadcastMessage
from ._wire import cbor

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


# --- CBOR ---------------------------------------------------------------------------------------

# How deep containers may nest. Receivers refuse more, so a deeper value could never be
# received; and cbor2's C encoder has no limit at all and overflows the C stack (crashing the
# process) a few thousand levels down.
_MAX_NESTING = 400
# Data items a receiver accepts in one value by default: what bounds the memory one message
# can take once decoded (about 70 bytes per item at worst, for empty maps).
DEFAULT_MAX_ITEMS = 1_000_000
# Tags of the values cbor2 encodes for common Python types and decodes cheaply whatever their
# size: datetimes and dates, big ints, UUIDs, IP addresses and networks, sets. Decimals,
# fractions, regexes, shared references and the rest are refused.
_TAGS = frozenset(
    {
        cbor.TAG_DATETIME_STRING,
        cbor.TAG_DATETIME_EPOCH,
        cbor.TAG_BIGNUM,
        cbor.TAG_NEGATIVE_BIGNUM,
        cbor.TAG_UUID,
        cbor.TAG_IP_ADDRESS,
        cbor.TAG_IP_NETWORK,
        cbor.TAG_DATE_EPOCH,
        cbor.TAG_SET,
        cbor.TAG_DATE_STRING,
        cbor.TAG_SELF_DESCRIBED,
    }
)


def _limits(max_items: int) -> cbor.CborLimits:
    # Size: the channel's own message limit bounds it; items bound what decoding builds.
    return cbor.CborLimits(
        max_size=None,
        max_depth=_MAX_NESTING,
        max_length=max_items,
        max_items=max_items,
        tags=_TAGS,
    )


# What a sender checks: the rules every receiver applies, whatever its item limit.
_SEND_LIMITS = _limits(2**62)

# What cbor2 encodes as a CBOR array, map or tag, i.e. what can hold further values.
_CONTAINER_TYPES = (list, tuple, dict, set, frozenset, cbor2.CBORTag, Mapping, Sequence, Set)
_FLAT_SEQUENCE_TYPES = (str, bytes, bytearray, memoryview, range)
_is_container_cache: dict[type, bool] = {}


def _is_container_type(kind: type) -> bool:
    known = _is_container_cache.get(kind)
    if known is None:
        known = issubclass(kind, _CONTAINER_TYPES) and not issubclass(kind, _FLAT_SEQUENCE_TYPES)
        if len(_is_container_cache) < 1024:
            _is_container_cache[kind] = known
    return known


def _too_deep(value: object) -> bool:
    """True if ``value`` nests containers more than _MAX_NESTING deep, or refers to itself."""
    if not _is_container_type(type(value)):
        return False
    # Breadth first, one level at a time, each container once per level: a value that
    # refers to itself just keeps producing levels until the limit.
    level: list[object] = [value]
    for _ in range(_MAX_NESTING):
        below: list[object] = []
        for container in level:
            parts: Any
            if isinstance(container, cbor2.CBORTag):
                parts = (container.value,)
            elif isinstance(container, Mapping):
                parts = (*container.keys(), *container.values())
            else:
                parts = container
            kinds = [kind for kind in set(map(type, parts)) if _is_container_type(kind)]
            if kinds:
                below.extend(part for part in parts if type(part) in kinds)
        if not below:
            return False
        level = list({id(part): part for part in below}.values())
    return True


def _encode(value: object) -> bytes:
    problem: str | None = None
    cause: BaseException | None = None
    if _too_deep(value):
        problem = (
            f"it nests containers more than {_MAX_NESTING} levels deep (or contains itself); "
            f"receivers refuse that"
        )
    else:
        try:
            data = cbor2.dumps(value)
        except Exception as exc:  # CBOREncodeError mostly; also whatever a Mapping raises
            problem = str(exc) or type(exc).__name__
            cause = exc
        else:
            try:
                cbor.check(data, _SEND_LIMITS)
                return data
            except BadCborError as exc:  # e.g. a Decimal (tag 4), or a list as a dict key
                problem = f"receivers refuse it: {exc}"
                cause = exc
    raise ProtocolError(f"cannot encode {type(value).__name__} as CBOR: {problem}") from cause


def _decode(data: object, sender: str | None, limits: cbor.CborLimits) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"CborReceiveChannel needs bytes items, got {type(data).__name__}")
    try:
        return cbor.loads(data, limits)
    except BadCborError as exc:
        source = "" if sender is None else f" from {sender!r}"
        raise BadCborError(
            f"received a message{source} that is not valid CBOR ({len(data)} bytes): {exc}"
        ) from exc


class CborSendChannel(trio.abc.SendChannel[Any]):
    """Send CBOR-encodable Python values over a channel of bytes messages.

    Each value becomes one message, encoded with :func:`cbor2.dumps`. Only what a
    :class:`CborReceiveChannel` accepts is sent (see there).
    """

    def __init__(self, send: trio.abc.SendChannel[bytes]) -> None:
        self._send = send

    async def send(self, value: Any) -> None:
        """Encode ``value`` as CBOR and send it as one message.

        Raises :class:`~conec_trio.ProtocolError` (and sends nothing; the channel stays
        usable) if ``value`` cannot be encoded, for example an object of a type CBOR has no
        encoding for, a value that contains itself, containers nested more than 400 levels
        deep, or something receivers refuse (a Decimal or Fraction, a list or a big int as a
        dict key). Otherwise raises whatever the wrapped channel raises:
        :exc:`trio.BrokenResourceError` if the receiver is gone,
        :exc:`trio.ClosedResourceError` after :meth:`aclose`, and so on.
        """
        await self._send.send(_encode(value))

    async def aclose(self) -> None:
        """Close the wrapped channel (idempotent)."""
        await self._send.aclose()


class CborReceiveChannel(trio.abc.ReceiveChannel[Any]):
    """Receive Python values from a channel of CBOR-encoded bytes messages.

    On a broadcast receiver (items are :class:`~conec_trio.BroadcastMessage`) each item is
    returned as ``BroadcastMessage(sender, value)``. Any receive channel of the right items
    works, including one from :func:`untagged` or :func:`open_nonblocking`.

    Every message is checked before any of it is built, so a hostile one costs time linear
    in its size and bounded memory. A value is refused if it nests containers more than 400
    levels deep, holds more than ``max_items`` data items (each key, value and element counts),
    uses a CBOR tag other than those of datetimes, dates, big ints, UUIDs, IP addresses and
    networks, and sets, or has a dict key (or set element) that is not a number, a string, a
    bool or None.
    """

    def __init__(
        self,
        recv: trio.abc.ReceiveChannel[bytes] | trio.abc.ReceiveChannel[BroadcastMessage[bytes]],
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int):
            raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        self._recv = recv
        self._limits = _limits(max_items)

    async def receive(self) -> Any:
        """Receive the next message and return the value it encodes.

        Raises :class:`~conec_trio.BadCborError` (a
        :class:`~conec_trio.ProtocolError`) if the message is not exactly one valid CBOR
        value within the limits above (the bad message is consumed and the channel stays
        usable for the next one). Otherwise raises whatever the wrapped receiver raises:
        :exc:`trio.EndOfChannel` at the end, :exc:`trio.BrokenResourceError` if it broke,
        :exc:`trio.ClosedResourceError` after :meth:`aclose`, :exc:`~conec_trio.Lagged`
        from a receiver made by :func:`open_nonblocking`.
        """
        item = await self._recv.receive()
        if isinstance(item, BroadcastMessage):
            return BroadcastMessage(item.sender, _decode(item.data, item.sender, self._limits))
        return _decode(item, None, self._limits)

    async def aclose(self) -> None:
        """Close the wrapped receiver (idempotent)."""
        await self._recv.aclose()
