"""Strict, bounded decoding of CBOR that a peer sent: the only CBOR decoder of the project.

:func:`loads` first walks the item heads of the encoded value, without building anything,
and refuses it unless it keeps to :class:`CborLimits`: its size, how deep containers nest,
how long one array or map is, how many items there are in all, which tags appear (none,
unless allow-listed: no shared references, no regexes, no rationals of huge numbers), and what
may be a map key. Only then does cbor2 build the Python value, so a hostile value costs one
linear pass over its bytes and never more memory than the limits allow.

Map keys (and set elements) may only be numbers, strings or simple values: an array or a
tagged value (a bignum) as a key lets a sender choose keys whose hashes collide, which makes
building the dict quadratic. Python's hash of a 64-bit int or of a float has few preimages in
those ranges, and str/bytes hashes are randomised, so such keys cannot be made to collide in
bulk.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, NoReturn

import cbor2

from .._exceptions import BadCborError

BytesLike = bytes | bytearray | memoryview

# Tags whose values cbor2 builds cheaply and boundedly from input of any size.
TAG_DATETIME_STRING = 0
TAG_DATETIME_EPOCH = 1
TAG_BIGNUM = 2
TAG_NEGATIVE_BIGNUM = 3
TAG_UUID = 37
TAG_IP_ADDRESS = 52
TAG_IP_NETWORK = 54
TAG_DATE_EPOCH = 100
TAG_SET = 258
TAG_DATE_STRING = 1004
TAG_SELF_DESCRIBED = 55799


@dataclass(frozen=True)
class CborLimits:
    """What a decoder accepts. Every bound is inclusive."""

    max_size: int | None  # bytes of the encoded value; None: the caller's channel bounds it
    max_depth: int  # arrays, maps and tags nested in one another
    max_length: int  # items of one array, entries of one map
    max_items: int  # data items in all (each key, value and element counts)
    tags: frozenset[int] = frozenset()  # tags allowed; every other one is refused
    text_keys_only: bool = False  # map keys must be text or byte strings


# Kinds of open container during the scan.
_ARRAY, _MAP, _TAG, _SET_TAG, _SET = range(5)


def _scalar_sizes() -> bytes:
    """By head byte: the size of a number or simple value it starts, 0 for anything else."""
    sizes = bytearray(256)
    for head in range(256):
        major, info = head >> 5, head & 0x1F
        if major in (0, 1, 7) and info < 28:
            sizes[head] = 1 if info < 24 else 1 + (1 << (info - 24))
    return bytes(sizes)


_SCALAR_SIZE = _scalar_sizes()
_MAJOR_NAMES = ("an unsigned int", "a negative int", "a byte string", "a text string")


def _refuse(why: str) -> NoReturn:
    raise BadCborError(why)


def check(data: BytesLike, limits: CborLimits) -> None:
    """Raise :class:`~conec_trio.BadCborError` unless ``data`` is exactly one well-formed CBOR
    value that keeps to ``limits``. Linear in ``len(data)``; builds no Python value."""
    n = len(data)
    if limits.max_size is not None and n > limits.max_size:
        _refuse(f"CBOR value of {n} bytes is over the limit of {limits.max_size} bytes")
    if n == 0:
        _refuse("no CBOR value at all (empty message)")
    max_depth, max_length, max_items = limits.max_depth, limits.max_length, limits.max_items
    allowed_tags, text_keys_only = limits.tags, limits.text_keys_only
    # Each open container: how many items it still holds, and its kind. The bottom entry
    # stands for the one top-level value.
    remaining = [1]
    kinds = [_ARRAY]
    pos = 0
    items = 0
    while remaining:
        left = remaining[-1]
        if left == 0:
            remaining.pop()
            kinds.pop()
            continue
        kind = kinds[-1]
        if kind == _ARRAY and pos < n and _SCALAR_SIZE[data[pos]]:
            # A run of numbers and simple values, the bulk of dense data, in a tighter loop.
            start = left
            while left and pos < n and (size := _SCALAR_SIZE[data[pos]]):
                pos += size
                left -= 1
            remaining[-1] = left
            items += start - left
            if pos > n:
                _refuse(f"truncated: the value needs more than its {n} bytes")
            if items > max_items:
                _refuse(f"more than {max_items} data items in all")
            continue
        remaining[-1] = left - 1
        if pos >= n:
            _refuse(f"truncated: the value needs more than its {n} bytes")
        head = data[pos]
        major, info = head >> 5, head & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            end = pos + (1 << (info - 24))
            if end > n:
                _refuse(f"truncated: the value needs more than its {n} bytes")
            arg = int.from_bytes(data[pos:end], "big")
            pos = end
        elif info == 31:
            _refuse("indefinite-length items and break codes are not allowed")
        else:
            _refuse(f"reserved head byte 0x{head:02x} at offset {pos - 1}")
        items += 1
        if items > max_items:
            _refuse(f"more than {max_items} data items in all")
        if kind == _SET_TAG and major != 4:
            _refuse(f"tag {TAG_SET} (set) must wrap an array")
        if (kind == _MAP and left % 2 == 0) or kind == _SET:  # a map key or a set element
            if text_keys_only and major not in (2, 3):
                _refuse(f"a map key must be a text or byte string, not {_kind(major)}")
            if major in (4, 5, 6):
                _refuse(
                    f"a map key or set element must be a number, a string or a simple value, "
                    f"not {_kind(major)}"
                )
        if major in (0, 1, 7):
            continue
        if major in (2, 3):
            pos += arg
            if pos > n:
                _refuse(f"truncated: a string of {arg} bytes does not fit in {n} bytes")
            continue
        if len(remaining) > max_depth:  # this container would be one level too many
            _refuse(f"containers and tags nest more than {max_depth} levels deep")
        if major == 6:
            if arg not in allowed_tags:
                _refuse(f"CBOR tag {arg} is not allowed here")
            remaining.append(1)
            kinds.append(_SET_TAG if arg == TAG_SET else _TAG)
            continue
        count = arg * 2 if major == 5 else arg
        if arg > max_length:
            what = "a map of" if major == 5 else "an array of"
            unit = "entries" if major == 5 else "items"
            _refuse(f"{what} {arg} {unit}; the maximum is {max_length}")
        if count > n - pos:  # every item takes at least one byte
            _refuse(f"truncated: {_kind(major)} of {arg} does not fit in {n} bytes")
        if count:
            remaining.append(count)
            kinds.append(_SET if kind == _SET_TAG else _MAP if major == 5 else _ARRAY)
    if pos != n:
        _refuse(f"{n - pos} bytes after its CBOR value")


def _kind(major: int) -> str:
    if major < 4:
        return _MAJOR_NAMES[major]
    return ("an array", "a map", "a tagged value", "a simple value or float")[major - 4]


class _TagGate(dict[int, Any]):
    """cbor2's semantic decoders: an allowed tag is not in here (cbor2 then uses its own
    decoder for it); every other tag gets one that refuses it. The scan has refused such tags
    already; this keeps cbor2 from ever building one should the two disagree."""

    def __init__(self, allowed: frozenset[int]) -> None:
        super().__init__()
        self._allowed = allowed

    def __missing__(self, tag: int) -> Any:
        if tag in self._allowed:
            raise KeyError(tag)
        return _refuse_tag


def _refuse_tag(value: object, immutable: bool = False) -> NoReturn:
    raise ValueError("this CBOR tag is not allowed here")


_GATES: dict[frozenset[int], _TagGate] = {}


def loads(data: BytesLike, limits: CborLimits) -> Any:
    """Decode exactly one CBOR value from a peer, keeping to ``limits``.

    Raises :class:`~conec_trio.BadCborError` (and nothing else) if ``data`` is not one
    well-formed value within the limits, or if cbor2 cannot build it (bad UTF-8, a datetime
    out of range, ...).
    """
    check(data, limits)
    gate = _GATES.get(limits.tags)
    if gate is None:
        gate = _GATES[limits.tags] = _TagGate(limits.tags)
    try:
        decoder = cbor2.CBORDecoder(
            io.BytesIO(data),
            semantic_decoders=gate,
            tag_hook=_refuse_tag,
            max_depth=limits.max_depth + 1,  # the scan is the real bound
            allow_indefinite=False,
            strict_hashable_types=limits.text_keys_only,
        )
        return decoder.decode()
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean "malformed"
        # cbor2 often wraps the telling detail as the cause.
        detail = str(exc) or type(exc).__name__
        if exc.__cause__ is not None:
            detail = f"{detail} ({exc.__cause__})"
        raise BadCborError(detail) from exc
