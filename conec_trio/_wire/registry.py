"""The registry of control messages and their encoding: CBOR arrays ``[type_code, field1,
field2, ...]``, decoded through the project's strict CBOR decoder (:mod:`.cbor`) with tight
limits. No trio, no sockets. The messages themselves are in :mod:`.control`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, get_type_hints

import cbor2

from .._exceptions import BadCborError, ProtocolError
from . import cbor
from .fields import Check, check_for, wrong_type

# Bytes of one encoded control message. The largest legitimate one, a ChannelOffer, carries
# a client certificate and a few addresses.
MAX_CONTROL_MESSAGE_SIZE = 64 * 1024
# Ids in one list (peer lists, broadcast members): far above any coordinator's client count,
# so that a list's size is bounded by more than the frame that carries it.
MAX_IDS = 1_000_000
# A message with an id list may be as large as a stream message may be by default.
MAX_ID_LIST_MESSAGE_SIZE = 16 * 1024 * 1024
HELLO_CODE = 1  # the Hello's type code, and its first field the version: forever

_LIMITS = cbor.CborLimits(
    max_size=MAX_CONTROL_MESSAGE_SIZE,
    max_depth=8,  # the deepest legitimate value is [code, [[host, port]]]
    max_length=1024,  # longer than any list a field allows: those get the field's own message
    max_items=4096,
    text_keys_only=True,
)
_ID_LIST_LIMITS = cbor.CborLimits(
    max_size=MAX_ID_LIST_MESSAGE_SIZE,
    max_depth=8,
    max_length=MAX_IDS,
    max_items=2 * MAX_IDS + 16,  # two lists (broadcast members) and the fields around them
    text_keys_only=True,
)


class Message:
    """Base class of all control messages."""

    TYPE_CODE: ClassVar[int]
    # Set by @dataclass on each subclass; declared so type checkers see dataclasses.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


_BY_CODE: dict[int, type[Message]] = {}
_FIELDS: dict[type[Message], tuple[tuple[str, Check], ...]] = {}
# Fields a message must carry: those without a default. Fields added later have defaults, so
# a message from an older version, which lacks them, still decodes.
_REQUIRED: dict[type[Message], int] = {}
# Messages that carry lists of client ids, with their own, larger limits.
_ID_LIST_CODES: set[int] = set()

_M = TypeVar("_M", bound=Message)


def message(code: int, *, id_list: bool = False) -> Callable[[type[_M]], type[_M]]:
    """Register a message dataclass under ``code`` (apply above ``@dataclass``); ``id_list``:
    it carries lists of ids and may be as large as they are."""

    def register(cls: type[_M]) -> type[_M]:
        if code in _BY_CODE:
            raise ValueError(f"type code {code} is already used by {_BY_CODE[code].__name__}")
        hints = get_type_hints(cls, include_extras=True)
        fields = dataclasses.fields(cls)
        _FIELDS[cls] = tuple((f.name, check_for(hints[f.name])) for f in fields)
        _REQUIRED[cls] = sum(
            1
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        cls.TYPE_CODE = code
        _BY_CODE[code] = cls
        if id_list:
            _ID_LIST_CODES.add(code)
        return cls

    return register


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
    limit = _limits_for(cls.TYPE_CODE).max_size
    if limit is not None and len(data) > limit:
        raise ValueError(
            f"cannot encode {name}: {len(data)} bytes is over the maximum of "
            f"{limit} for a control message"
        )
    return data


def _limits_for(code: object) -> cbor.CborLimits:
    """Messages that carry id lists may be as large as those lists; all others are small."""
    return _ID_LIST_LIMITS if code in _ID_LIST_CODES else _LIMITS


def _peek_code(data: bytes | bytearray | memoryview) -> int | None:
    """The type code of an encoded message, read from its first bytes (None if unclear)."""
    try:
        major, _, pos = _cbor_head(bytes(data[:16]), 0)
        if major != 4:
            return None
        major, code, _ = _cbor_head(bytes(data[:16]), pos)
    except ProtocolError:
        return None
    return code if major == 0 else None


def _loads(data: bytes | bytearray | memoryview) -> object:
    """Decode exactly one CBOR item, turning every failure into ProtocolError."""
    limits = _limits_for(_peek_code(data))
    assert limits.max_size is not None
    if len(data) > limits.max_size:
        raise ProtocolError(
            f"control message of {len(data)} bytes is over the maximum of {limits.max_size} bytes"
        )
    try:
        return cbor.loads(data, limits)
    except BadCborError as exc:
        raise BadCborError(f"malformed CBOR in control message: {exc}") from exc


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode a control message; raises ProtocolError (and nothing else) if malformed."""
    items = _loads(data)
    if not isinstance(items, list):
        wrong_type("a control message", "a CBOR array", items)
    if not items:
        raise ProtocolError("control message is an empty array")
    code = items[0]
    if not isinstance(code, int) or isinstance(code, bool):
        wrong_type("a control message type code", "int", code)
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
    if major != 0 or code != HELLO_CODE:
        raise ProtocolError("first control message is not a Hello: expected type code 1")
    major, version, pos = _cbor_head(data, pos)
    if major != 0 or version is None:
        raise ProtocolError("Hello.version must be an unsigned int")
    return version
