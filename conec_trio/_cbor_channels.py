"""CBOR-typed channels: :class:`CborSendChannel` / :class:`CborReceiveChannel` carry
CBOR-encodable Python values instead of bytes, decoded strictly and bounded (see
``conec_trio.adapters``, which exports them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any, TypeVar

import cbor2
import trio

from ._exceptions import BadCborError, ProtocolError
from ._types import BroadcastMessage
from ._wire import cbor

T = TypeVar("T")


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
