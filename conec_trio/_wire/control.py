"""Control messages: CBOR arrays ``[type_code, field1, field2, ...]``.

Each message is a frozen dataclass registered under a type code; its fields are encoded in
declaration order. :func:`decode` checks every field against its annotation and raises
ProtocolError for anything malformed. A later protocol version may only add fields at the
end, which older decoders ignore. Decoding goes through the project's strict CBOR decoder
(:mod:`._wire.cbor`) with tight limits: a control message is at most
:data:`MAX_CONTROL_MESSAGE_SIZE` bytes, uses no CBOR tags or indefinite lengths (refused
anywhere, even in ignored trailing fields) and no map keys other than strings.

The first field of :class:`Hello` (type code 1) is ``version``, and must stay so forever:
:func:`decode_hello_version` reads just ``[1, version, ...`` so that a Hello of any version
can be answered with a clear "version mismatch".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import (
    Annotated,
    Any,
    ClassVar,
    NoReturn,
    TypeAlias,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import cbor2

from .._exceptions import BadCborError, ProtocolError
from . import cbor

PROTOCOL_VERSION = 1
ALPN = "conec-trio"

MAX_INT = 2**62 - 1  # ids, counts and versions fit a QUIC varint
MAX_PORT = 65535
MAX_NAME_LEN = 1024  # characters in ids, names and reasons
# Characters of an IP literal in an address: 45 for the longest IPv6 form, and room for a
# scope (an interface name or number).
MAX_HOST_LEN = 64
MAX_MESSAGE_LEN = 4096  # characters in human-readable explanations
# Addresses a client may give as its own view of where it can be reached. Offers and grants
# carry them plus the address the coordinator observed.
MAX_LOCAL_ADDRS = 16
MAX_CANDIDATES = MAX_LOCAL_ADDRS + 1
# Bytes of one encoded control message. The largest legitimate one, a ChannelOffer, carries
# a client certificate (at most MAX_CERT_SIZE) and MAX_CANDIDATES addresses.
MAX_CERT_SIZE = 16 * 1024
MAX_CONTROL_MESSAGE_SIZE = 64 * 1024

_LIMITS = cbor.CborLimits(
    max_size=MAX_CONTROL_MESSAGE_SIZE,
    max_depth=8,  # the deepest legitimate value is [code, [[host, port]]]
    max_length=1024,  # longer than any list a field allows: those get the field's own message
    max_items=4096,
    text_keys_only=True,
)


@dataclass(frozen=True)
class _MaxLen:
    chars: int


@dataclass(frozen=True)
class _MaxItems:
    items: int


Addr: TypeAlias = tuple[str, int]
"""A ``(ip, port)`` pair, encoded as a 2-element array: an IP literal (in its canonical
form once decoded) and a port in 1..65535."""

Text: TypeAlias = Annotated[str, _MaxLen(MAX_MESSAGE_LEN)]
"""A human-readable explanation; may be longer than a name."""

LocalAddrs: TypeAlias = Annotated[list[Addr], _MaxItems(MAX_LOCAL_ADDRS)]
"""A client's own addresses; duplicates are dropped when decoded."""

Candidates: TypeAlias = Annotated[list[Addr], _MaxItems(MAX_CANDIDATES)]
"""Where a peer may be reached; duplicates are dropped when decoded."""

CertDer: TypeAlias = Annotated[bytes, _MaxLen(MAX_CERT_SIZE)]
"""A DER certificate."""


class Message:
    """Base class of all control messages."""

    TYPE_CODE: ClassVar[int]
    # Set by @dataclass on each subclass; declared so type checkers see dataclasses.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


# --- field checks -------------------------------------------------------------------------
# A check takes a value and a description of where it sits ("Hello.client_id") and returns
# the value in its Python form, or raises ProtocolError.

_Check: TypeAlias = Callable[[object, str], object]


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _wrong_type(where: str, expected: str, value: object) -> NoReturn:
    raise ProtocolError(f"{where} must be {expected}, not {_kind(value)}")


def _check_int(value: object, where: str, top: int = MAX_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool):  # bool is an int subclass
        _wrong_type(where, "int", value)
    if not 0 <= value <= top:
        raise ProtocolError(f"{where} must be in 0..{top}, not {value}")
    return value


def _check_bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        _wrong_type(where, "bool", value)
    return value


def _check_bytes(value: object, where: str) -> bytes:
    if not isinstance(value, bytes):
        _wrong_type(where, "bytes", value)
    return value


def _bytes_check(max_len: int) -> Callable[[object, str], bytes]:
    def check(value: object, where: str) -> bytes:
        value = _check_bytes(value, where)
        if len(value) > max_len:
            raise ProtocolError(f"{where} has {len(value)} bytes; the maximum is {max_len}")
        return value

    return check


def _text_check(max_len: int) -> Callable[[object, str], str]:
    def check(value: object, where: str) -> str:
        if not isinstance(value, str):
            _wrong_type(where, "str", value)
        if len(value) > max_len:
            raise ProtocolError(f"{where} has {len(value)} characters; the maximum is {max_len}")
        return value

    return check


_check_name = _text_check(MAX_NAME_LEN)
_check_host = _text_check(MAX_HOST_LEN)


def _check_addr(value: object, where: str) -> Addr:
    if not isinstance(value, list | tuple) or len(value) != 2:
        _wrong_type(where, "a [host, port] array", value)
    host, port = value
    host = _check_host(host, f"{where}.host")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(f"{where}.host must be an IP address, not {host[:100]!r}") from None
    port = _check_int(port, f"{where}.port", MAX_PORT)
    if port == 0:  # nobody can be reached at port 0
        raise ProtocolError(f"{where}.port must be in 1..{MAX_PORT}, not 0")
    return str(ip), port


def _list_check(item: _Check, max_items: int | None = None, unique: bool = False) -> _Check:
    def check(value: object, where: str) -> list[object]:
        if not isinstance(value, list | tuple):
            _wrong_type(where, "an array", value)
        if max_items is not None and len(value) > max_items:
            raise ProtocolError(f"{where} has {len(value)} items; the maximum is {max_items}")
        items = [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
        # dict keeps the first of equal items, in order, in linear time
        return list(dict.fromkeys(items)) if unique else items

    return check


def _optional_check(inner: _Check) -> _Check:
    def check(value: object, where: str) -> object:
        return None if value is None else inner(value, where)

    return check


_SIMPLE_CHECKS: dict[object, _Check] = {
    int: _check_int,
    bool: _check_bool,
    bytes: _check_bytes,
    str: _check_name,
}


def _check_for(hint: object) -> _Check:
    """Build the check for a field annotation (resolved by get_type_hints)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint == Addr:
        return _check_addr
    if origin is Annotated and args[0] is str and isinstance(args[1], _MaxLen):
        return _text_check(args[1].chars)
    if origin is Annotated and args[0] is bytes and isinstance(args[1], _MaxLen):
        return _bytes_check(args[1].chars)
    if origin is Annotated and get_origin(args[0]) is list and isinstance(args[1], _MaxItems):
        item_hint = get_args(args[0])[0]
        # A list of addresses is a set of places to try: a repeat is only wasted work.
        return _list_check(_check_for(item_hint), args[1].items, unique=item_hint == Addr)
    if origin is list:
        return _list_check(_check_for(args[0]))
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _optional_check(_check_for(next(a for a in args if a is not type(None))))
    if origin is None and hint in _SIMPLE_CHECKS:
        return _SIMPLE_CHECKS[hint]
    raise TypeError(f"unsupported control message field type: {hint!r}")


# --- registry -----------------------------------------------------------------------------

_BY_CODE: dict[int, type[Message]] = {}
_FIELDS: dict[type[Message], tuple[tuple[str, _Check], ...]] = {}
# Fields a message must carry: those without a default. Fields added later have defaults, so
# a message from an older version, which lacks them, still decodes.
_REQUIRED: dict[type[Message], int] = {}

_M = TypeVar("_M", bound=Message)


def _message(code: int) -> Callable[[type[_M]], type[_M]]:
    """Register a message dataclass under ``code`` (apply above ``@dataclass``)."""

    def register(cls: type[_M]) -> type[_M]:
        if code in _BY_CODE:
            raise ValueError(f"type code {code} is already used by {_BY_CODE[code].__name__}")
        hints = get_type_hints(cls, include_extras=True)
        fields = dataclasses.fields(cls)
        _FIELDS[cls] = tuple((f.name, _check_for(hints[f.name])) for f in fields)
        _REQUIRED[cls] = sum(
            1
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        cls.TYPE_CODE = code
        _BY_CODE[code] = cls
        return cls

    return register


# --- messages -----------------------------------------------------------------------------


@_message(1)
@dataclass(frozen=True)
class Hello(Message):
    """Client -> coordinator, first frame on the control stream. ``version`` stays first."""

    version: int
    client_id: str
    listen: bool
    local_addrs: LocalAddrs


@_message(2)
@dataclass(frozen=True)
class Welcome(Message):
    """Coordinator -> client: accepted; tells the client its address as the coordinator sees it."""

    version: int
    observed_addr: Addr


# Type code 3 is retired: it was a refusal of the hello that was never sent. The coordinator
# refuses a client by closing the connection with a CloseCode. Do not reuse the code.


# What a relayed stream is for (``OpenProxied.kind``, passed on in ``IncomingProxied.kind``).
PROXIED_PLAIN = 0  # a stream for the application that stays proxied
PROXIED_MOVABLE = 1  # from new_stream: moves onto a direct channel once one is up (MoveProxied)
PROXIED_PING = 2  # a ping: the target's library answers one empty message and ends it
PROXIED_KINDS = (PROXIED_PLAIN, PROXIED_MOVABLE, PROXIED_PING)


@_message(10)
@dataclass(frozen=True)
class OpenProxied(Message):
    """Client -> coordinator, first frame on a new relayed stream (``peer`` None: coordinator).

    ``kind`` is one of ``PROXIED_KINDS``; ``token`` names a movable stream in its
    ``MoveProxied`` (random, so that a reused ``sid`` is never taken for an older stream)."""

    sid: int
    peer: str | None
    kind: int = PROXIED_PLAIN
    token: int = 0


@_message(11)
@dataclass(frozen=True)
class StreamAccepted(Message):
    """Reply on a newly opened stream: it is open."""


@_message(12)
@dataclass(frozen=True)
class StreamRefused(Message):
    """Reply on a newly opened stream: refused; ``reason`` is a ``codes.Reason`` value."""

    reason: str
    message: Text


@_message(13)
@dataclass(frozen=True)
class IncomingProxied(Message):
    """Coordinator -> target client, first frame of a relayed stream; ``peer`` opened it."""

    sid: int
    peer: str
    kind: int = PROXIED_PLAIN
    token: int = 0


@_message(14)
@dataclass(frozen=True)
class OpenDirect(Message):
    """Client -> client on a direct connection, first frame of a new stream."""

    sid: int


@_message(15)
@dataclass(frozen=True)
class DirectClose(Message):
    """Client -> client on a direct connection: I am closing this channel. The receiver
    forgets the channel and closes the connection, so the closer knows both sides are done."""


@_message(16)
@dataclass(frozen=True)
class MoveProxied(Message):
    """Client -> client on a direct connection, first frame of the stream that carries on the
    movable proxied stream ``sid`` (with ``token``) that the sender opened. The sender's
    direction of the proxied stream ended with the moved marker (``framing.MOVED``), and the
    receiver's direction moves here the same way."""

    sid: int
    token: int


@_message(17)
@dataclass(frozen=True)
class Ping(Message):
    """Client -> client on a direct connection: answer one empty message and end the stream."""


@_message(20)
@dataclass(frozen=True)
class JoinBroadcast(Message):
    """Client -> coordinator, first frame on a broadcast stream."""

    name: str


@_message(21)
@dataclass(frozen=True)
class BroadcastJoined(Message):
    """Reply to JoinBroadcast: how many senders and receivers the channel has now."""

    senders: int
    receivers: int


@_message(30)
@dataclass(frozen=True)
class BroadcastCountRequest(Message):
    """Client -> coordinator: how many members does broadcast ``name`` have?"""

    rid: int
    name: str


@_message(31)
@dataclass(frozen=True)
class BroadcastCountReply(Message):
    """Answer to BroadcastCountRequest ``rid``."""

    rid: int
    senders: int
    receivers: int


@_message(32)
@dataclass(frozen=True)
class ErrorReply(Message):
    """Request ``rid`` failed; ``reason`` is a ``codes.Reason`` value."""

    rid: int
    reason: str
    message: Text


@_message(40)
@dataclass(frozen=True)
class ChannelRequest(Message):
    """Client -> coordinator: please set up a direct channel to ``peer``."""

    rid: int
    peer: str


@_message(41)
@dataclass(frozen=True)
class ChannelGrant(Message):
    """Coordinator -> requester: ``peer`` agreed; its certificate and addresses to dial."""

    rid: int
    peer: str
    cert_der: CertDer
    addrs: Candidates


@_message(42)
@dataclass(frozen=True)
class ChannelOffer(Message):
    """Coordinator -> target: ``peer`` wants a direct channel; its certificate and addresses."""

    oid: int
    peer: str
    cert_der: CertDer
    addrs: Candidates


@_message(43)
@dataclass(frozen=True)
class ChannelOfferReply(Message):
    """Target -> coordinator: answer to ChannelOffer ``oid``."""

    oid: int
    accept: bool
    message: Text


# --- encoding and decoding ----------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Encode a control message; raises ValueError if a field breaks the protocol's rules."""
    cls = type(msg)
    fields = _FIELDS.get(cls)
    if fields is None:
        raise TypeError(f"{cls.__name__} is not a registered control message")
    name = cls.__name__
    try:
        values = [check(getattr(msg, field), f"{name}.{field}") for field, check in fields]
        data = cbor2.dumps([cls.TYPE_CODE, *values])
    except Exception as exc:  # a ProtocolError from a check, or a str cbor2 cannot encode
        raise ValueError(f"cannot encode {name}: {exc}") from exc
    if len(data) > MAX_CONTROL_MESSAGE_SIZE:
        raise ValueError(
            f"cannot encode {name}: {len(data)} bytes is over the maximum of "
            f"{MAX_CONTROL_MESSAGE_SIZE} for a control message"
        )
    return data


def _loads(data: bytes | bytearray | memoryview) -> object:
    """Decode exactly one CBOR item, turning every failure into ProtocolError."""
    if len(data) > MAX_CONTROL_MESSAGE_SIZE:
        raise ProtocolError(
            f"control message of {len(data)} bytes is over the maximum of "
            f"{MAX_CONTROL_MESSAGE_SIZE} bytes"
        )
    try:
        return cbor.loads(data, _LIMITS)
    except BadCborError as exc:
        raise BadCborError(f"malformed CBOR in control message: {exc}") from exc


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode a control message; raises ProtocolError (and nothing else) if malformed."""
    items = _loads(data)
    if not isinstance(items, list):
        _wrong_type("a control message", "a CBOR array", items)
    if not items:
        raise ProtocolError("control message is an empty array")
    code = items[0]
    if not isinstance(code, int) or isinstance(code, bool):
        _wrong_type("a control message type code", "int", code)
    cls = _BY_CODE.get(code)
    if cls is None:
        raise ProtocolError(f"unknown control message type code {code}")
    fields = _FIELDS[cls]
    values = items[1:]
    if len(values) < _REQUIRED[cls]:
        raise ProtocolError(f"{cls.__name__} needs {_REQUIRED[cls]} fields, got {len(values)}")
    # zip stops at the known fields: trailing ones come from a newer version and are ignored.
    args = [
        check(value, f"{cls.__name__}.{field}")
        for (field, check), value in zip(fields, values, strict=False)
    ]
    return cls(*args)


def _cbor_head(data: bytes, pos: int) -> tuple[int, int | None, int]:
    """Read the CBOR item head at ``pos``: (major type, argument or None if indefinite, end)."""
    if pos >= len(data):
        raise ProtocolError("Hello is truncated")
    first = data[pos]
    major, info = first >> 5, first & 0x1F
    if info < 24:
        return major, info, pos + 1
    if info == 31:
        return major, None, pos + 1
    if info > 27:
        raise ProtocolError(f"malformed CBOR in Hello: reserved head byte 0x{first:02x}")
    end = pos + 1 + (1 << (info - 24))
    if end > len(data):
        raise ProtocolError("Hello is truncated")
    return major, int.from_bytes(data[pos + 1 : end], "big"), end


def decode_hello_version(data: bytes | bytearray | memoryview) -> int:
    """Read only the version of a Hello of any protocol version: ``[1, version, ...]``.

    Use it before :func:`decode` so that a Hello from another version, whose other fields
    may differ, gets a clear version mismatch rather than a protocol error.
    """
    data = bytes(data)
    major, count, pos = _cbor_head(data, 0)
    if major != 4 or (count is not None and count < 2):
        raise ProtocolError("first control message is not a Hello: expected [1, version, ...]")
    major, code, pos = _cbor_head(data, pos)
    if major != 0 or code != Hello.TYPE_CODE:
        raise ProtocolError("first control message is not a Hello: expected type code 1")
    major, version, pos = _cbor_head(data, pos)
    if major != 0 or version is None:
        raise ProtocolError("Hello.version must be an unsigned int")
    return version
