"""The two messages at the start of a forwarding stream, and how long each side waits.

1. forward -> expose, the request: ``{"host": str, "port": int}``;
2. expose -> forward, the answer: ``{"ok": True}``, or ``{"ok": False, "reason": str}``
   followed by the end of the stream.

Both come from another party, so both are decoded strictly before anything looks at them:
one CBOR map, at most :data:`MAX_MESSAGE_SIZE` bytes, nesting at most :data:`MAX_DEPTH`
deep, holding only integers, strings, arrays, maps, true, false and null, all of definite
length; and no tags, so no shared references. A value decoded this way is small and a tree
(never a graph whose repr is exponential in its size), and anything a peer sent that reaches
a log or an answer goes through :func:`clip` first.
"""

from __future__ import annotations

from typing import Any

import cbor2

from .. import ProtocolError
from .addresses import Target

__all__ = [
    "LOG_LIMIT",
    "MAX_DEPTH",
    "MAX_MESSAGE_SIZE",
    "OPEN_TIMEOUT",
    "REPLY_TIMEOUT",
    "REQUEST_TIMEOUT",
    "TARGET_CONNECT_TIMEOUT",
    "clip",
    "decode_message",
    "encode_answer",
    "encode_request",
    "parse_reply",
    "parse_request",
]

# expose: how long a new stream may take to send its request, and a target to accept.
REQUEST_TIMEOUT = 10.0
TARGET_CONNECT_TIMEOUT = 10.0
# forward: how long opening a stream may take (a direct channel needs up to 10 s to fail),
# and how long the answer may take (it waits for expose's connection to the target).
OPEN_TIMEOUT = 15.0
REPLY_TIMEOUT = TARGET_CONNECT_TIMEOUT + 10.0

# A request with a 255-character host is under 300 bytes, an answer with a long reason about
# a thousand; the limits leave room for fields added later.
MAX_MESSAGE_SIZE = 4096
MAX_DEPTH = 4
MAX_ITEMS = 64
# The most characters of peer input a log line or an answer quotes; a valid target (255
# characters of host) always fits.
LOG_LIMIT = 300

# CBOR major types (RFC 8949, section 3.1).
_UINT, _NEGINT, _BYTES, _TEXT, _ARRAY, _MAP, _TAG, _SIMPLE = range(8)
_FALSE, _TRUE, _NULL = 20, 21, 22


def clip(text: str, limit: int = LOG_LIMIT) -> str:
    """``text`` (something a peer sent) made safe to log: control characters escaped, and
    cut to ``limit`` characters, saying how long it was."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)[:limit]
    if len(text) > limit:
        return f"{cut}... ({len(text)} characters)"
    return cut


def _check_plain(data: bytes, what: str) -> None:
    """Walk the item heads of ``data``: exactly one CBOR item, made only of what the module
    docstring allows, within the depth and item limits. Raises ProtocolError otherwise."""
    pos = 0
    items = 0
    # How many items each open container (and the top level) still holds.
    pending = [1]
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= len(data):
            raise ProtocolError(f"{what} ends in the middle of a CBOR value")
        head = data[pos]
        pos += 1
        major, info = head >> 5, head & 0x1F
        items += 1
        if items > MAX_ITEMS:
            raise ProtocolError(f"{what} holds more than {MAX_ITEMS} CBOR values")
        if major == _TAG:
            raise ProtocolError(
                f"{what} holds a CBOR tag (0x{head:02x}); none is allowed, shared references "
                "among them"
            )
        if major == _SIMPLE:
            if info in (_FALSE, _TRUE, _NULL):
                continue
            raise ProtocolError(
                f"{what} holds a CBOR float or simple value (0x{head:02x}); only integers, "
                "strings, arrays, maps, true, false and null are allowed"
            )
        if info < 24:
            argument = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > len(data):
                raise ProtocolError(f"{what} ends in the middle of a CBOR value")
            argument = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        else:
            raise ProtocolError(
                f"{what} holds an indefinite-length or malformed CBOR value (0x{head:02x})"
            )
        if major in (_BYTES, _TEXT):
            if argument > len(data) - pos:
                raise ProtocolError(f"{what} ends in the middle of a CBOR value")
            pos += argument
        elif major in (_ARRAY, _MAP):
            if len(pending) > MAX_DEPTH:
                raise ProtocolError(f"{what} nests CBOR containers more than {MAX_DEPTH} deep")
            count = argument * 2 if major == _MAP else argument
            if count > MAX_ITEMS:
                raise ProtocolError(f"{what} holds more than {MAX_ITEMS} CBOR values")
            pending.append(count)
    if pos != len(data):
        raise ProtocolError(f"{what} has {len(data) - pos} bytes after its CBOR value")


def decode_message(data: bytes, what: str) -> dict[Any, Any]:
    """One message of the protocol, strictly (see the module docstring): a map.

    ``what`` names the message in the error (``"the request"``). Raises
    :class:`~conec_trio.ProtocolError` saying what is wrong.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"{what} is {len(data)} bytes, over the limit of {MAX_MESSAGE_SIZE}")
    _check_plain(data, what)
    try:
        value = cbor2.loads(data)
    except Exception as exc:  # say, text that is not UTF-8
        problem = clip(str(exc) or type(exc).__name__)
        raise ProtocolError(f"{what} is not valid CBOR: {problem}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is a CBOR {type(value).__name__}, not a map")
    return value


def encode_request(target: Target) -> bytes:
    """The request for ``target``."""
    return cbor2.dumps({"host": target.host, "port": target.port})


def parse_request(data: bytes) -> Target:
    """The target a request asks for; :class:`~conec_trio.ProtocolError` if it is not a
    valid request."""
    request = decode_message(data, "the request")
    host, port = request.get("host"), request.get("port")
    if not isinstance(host, str) or not 0 < len(host) <= 255:
        raise ProtocolError("the request's 'host' is not a text of 1 to 255 characters")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
        raise ProtocolError("the request's 'port' is not a number from 1 to 65535")
    return Target(host, port)


def encode_answer(reason: str | None) -> bytes:
    """The answer: the request is accepted (``reason`` None), or refused for ``reason``."""
    return cbor2.dumps({"ok": True} if reason is None else {"ok": False, "reason": reason})


def parse_reply(data: bytes) -> str | None:
    """None if the answer accepts the request, else the reason it gives (clipped);
    :class:`~conec_trio.ProtocolError` if it is neither."""
    reply = decode_message(data, "the answer")
    ok, reason = reply.get("ok"), reply.get("reason")
    if ok is True:
        return None
    if ok is False and isinstance(reason, str):
        return clip(reason)
    raise ProtocolError("the answer is neither {'ok': true} nor {'ok': false, 'reason': text}")
