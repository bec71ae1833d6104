"""Typed fields of control messages: each annotation becomes a check that takes a decoded
CBOR value and a description of where it sits ("Hello.client_id") and returns the value in its
Python form, or raises ProtocolError. No trio, no sockets.
"""

from __future__ import annotations

import ipaddress
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, NoReturn, TypeAlias, Union, get_args, get_origin

from .._exceptions import ProtocolError

MAX_INT = 2**62 - 1  # ids, counts and versions fit a QUIC varint
MAX_PORT = 65535
MAX_NAME_LEN = 1024  # characters in ids, names and reasons
# Characters of an IP literal in an address: 45 for the longest IPv6 form, and room for a
# scope (an interface name or number).
MAX_HOST_LEN = 64
MAX_MESSAGE_LEN = 4096  # characters in human-readable explanations


@dataclass(frozen=True)
class MaxLen:
    """``Annotated[str | bytes, MaxLen(n)]``: at most ``n`` characters or bytes."""

    chars: int


@dataclass(frozen=True)
class MaxItems:
    """``Annotated[list[...], MaxItems(n)]``: at most ``n`` items."""

    items: int


@dataclass(frozen=True)
class ExactLen:
    """``Annotated[bytes, ExactLen(n)]``: exactly ``n`` bytes."""

    size: int


Text: TypeAlias = Annotated[str, MaxLen(MAX_MESSAGE_LEN)]
"""A human-readable explanation; may be longer than a name."""

Addr: TypeAlias = tuple[str, int]
"""A ``(ip, port)`` pair, encoded as a 2-element array: an IP literal (in its canonical
form once decoded) and a port in 1..65535."""

Check: TypeAlias = Callable[[object, str], object]


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def wrong_type(where: str, expected: str, value: object) -> NoReturn:
    raise ProtocolError(f"{where} must be {expected}, not {_kind(value)}")


def _check_int(value: object, where: str, top: int = MAX_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool):  # bool is an int subclass
        wrong_type(where, "int", value)
    if not 0 <= value <= top:
        raise ProtocolError(f"{where} must be in 0..{top}, not {value}")
    return value


def _check_bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        wrong_type(where, "bool", value)
    return value


def _check_bytes(value: object, where: str) -> bytes:
    if not isinstance(value, bytes):
        wrong_type(where, "bytes", value)
    return value


def _bytes_check(max_len: int) -> Callable[[object, str], bytes]:
    def check(value: object, where: str) -> bytes:
        value = _check_bytes(value, where)
        if len(value) > max_len:
            raise ProtocolError(f"{where} has {len(value)} bytes; the maximum is {max_len}")
        return value

    return check


def _exact_bytes_check(size: int) -> Callable[[object, str], bytes]:
    def check(value: object, where: str) -> bytes:
        value = _check_bytes(value, where)
        if len(value) != size:
            raise ProtocolError(f"{where} has {len(value)} bytes; it must have {size}")
        return value

    return check


def _text_check(max_len: int) -> Callable[[object, str], str]:
    def check(value: object, where: str) -> str:
        if not isinstance(value, str):
            wrong_type(where, "str", value)
        if len(value) > max_len:
            raise ProtocolError(f"{where} has {len(value)} characters; the maximum is {max_len}")
        return value

    return check


_check_name = _text_check(MAX_NAME_LEN)
_check_host = _text_check(MAX_HOST_LEN)


def _check_addr(value: object, where: str) -> Addr:
    if not isinstance(value, list | tuple) or len(value) != 2:
        wrong_type(where, "a [host, port] array", value)
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


def _list_check(item: Check, max_items: int | None = None, unique: bool = False) -> Check:
    def check(value: object, where: str) -> list[object]:
        if not isinstance(value, list | tuple):
            wrong_type(where, "an array", value)
        if max_items is not None and len(value) > max_items:
            raise ProtocolError(f"{where} has {len(value)} items; the maximum is {max_items}")
        items = [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
        # dict keeps the first of equal items, in order, in linear time
        return list(dict.fromkeys(items)) if unique else items

    return check


def _optional_check(inner: Check) -> Check:
    def check(value: object, where: str) -> object:
        return None if value is None else inner(value, where)

    return check


_SIMPLE_CHECKS: dict[object, Check] = {
    int: _check_int,
    bool: _check_bool,
    bytes: _check_bytes,
    str: _check_name,
}


def check_for(hint: object) -> Check:
    """Build the check for a field annotation (resolved by get_type_hints)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint == Addr:
        return _check_addr
    if origin is Annotated and args[0] is str and isinstance(args[1], MaxLen):
        return _text_check(args[1].chars)
    if origin is Annotated and args[0] is bytes and isinstance(args[1], MaxLen):
        return _bytes_check(args[1].chars)
    if origin is Annotated and args[0] is bytes and isinstance(args[1], ExactLen):
        return _exact_bytes_check(args[1].size)
    if origin is Annotated and get_origin(args[0]) is list and isinstance(args[1], MaxItems):
        item_hint = get_args(args[0])[0]
        # A list of addresses is a set of places to try: a repeat is only wasted work.
        return _list_check(check_for(item_hint), args[1].items, unique=item_hint == Addr)
    if origin is list:
        return _list_check(check_for(args[0]))
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _optional_check(check_for(next(a for a in args if a is not type(None))))
    if origin is None and hint in _SIMPLE_CHECKS:
        return _SIMPLE_CHECKS[hint]
    raise TypeError(f"unsupported control message field type: {hint!r}")
