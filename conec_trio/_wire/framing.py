"""Message framing on a byte stream.

Every message on a stream is a QUIC variable-length integer (RFC 9000 section 16) giving the
payload length, followed by the payload. :class:`FrameDecoder` turns arbitrary chunks of a
stream back into whole messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeAlias

from .._exceptions import MessageTooLargeError, ProtocolError

BytesLike: TypeAlias = bytes | bytearray | memoryview

MAX_VARINT = 2**62 - 1

# Written where a message length would go, it says "this direction of the stream carries on
# elsewhere" (a proxied stream moving onto a direct channel): no message is this long, as a
# receiver's maximum size is far below it. Nothing may follow it but the end of the stream.
MOVED = MAX_VARINT

# Consumed bytes are dropped from the front of the buffer only once they are both numerous
# and more than half of it, so each byte is moved at most a constant number of times.
_COMPACT_THRESHOLD = 64 * 1024


def encode_varint(n: int) -> bytes:
    """Encode ``n`` (0 <= n < 2**62) in the shortest QUIC varint form (1, 2, 4 or 8 bytes)."""
    if n < 0 or n > MAX_VARINT:
        raise ValueError(f"varint value out of range 0..2**62-1: {n}")
    if n < 1 << 6:
        return bytes((n,))
    if n < 1 << 14:
        return (n | 0x4000).to_bytes(2, "big")
    if n < 1 << 30:
        return (n | 0x8000_0000).to_bytes(4, "big")
    return (n | 0xC000_0000_0000_0000).to_bytes(8, "big")


MOVED_MARKER = encode_varint(MOVED)


def varint_size(first_byte: int) -> int:
    """Length in bytes of the varint whose first byte is ``first_byte``."""
    return 1 << (first_byte >> 6)


def decode_varint(buf: BytesLike, pos: int = 0) -> tuple[int, int] | None:
    """Decode the varint at ``buf[pos:]``: ``(value, new_pos)``, or None if it is incomplete.

    Non-minimal encodings are accepted, as RFC 9000 allows.
    """
    if pos >= len(buf):
        return None
    first = buf[pos]
    end = pos + varint_size(first)
    if end > len(buf):
        return None
    value = first & 0x3F
    for i in range(pos + 1, end):
        value = (value << 8) | buf[i]
    return value, end


def frame_header(length: int) -> bytes:
    """The header that precedes a payload of ``length`` bytes."""
    return encode_varint(length)


def encode_frame(payload: BytesLike) -> bytes:
    """One framed message: header + payload."""
    return b"".join((frame_header(memoryview(payload).nbytes), payload))


class FrameDecoder:
    """Incremental decoder of framed messages; feed it chunks, take whole messages out.

    Work is linear in the bytes fed, however they are chunked. Once it raised
    MessageTooLargeError the stream is unusable: feed and next_message raise it again.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise ValueError(f"max_size must be >= 0, not {max_size}")
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0  # read offset into _buf
        # Length of the message whose header was already consumed; _pos is at its body.
        self._length: int | None = None
        self.moved = False  # the MOVED marker arrived: this direction carries on elsewhere

    def feed(self, data: BytesLike) -> None:
        """Append received bytes; raises MessageTooLargeError as soon as a header says so,
        ProtocolError for bytes after the MOVED marker."""
        if self.moved and data:
            raise ProtocolError("data after the marker that moved this stream")
        self._buf += data
        if self._length is None:
            self._read_header()

    def next_message(self) -> bytes | None:
        """Return the next whole message (possibly ``b""``), or None if none is complete."""
        if self._length is None and not self._read_header():
            return None
        assert self._length is not None
        end = self._pos + self._length
        if end > len(self._buf):
            return None
        # A memoryview slice copies the body once, not twice as bytes(buf[a:b]) would.
        with memoryview(self._buf) as view:
            message = bytes(view[self._pos : end])
        self._pos = end
        self._length = None
        self._compact()
        return message

    def __iter__(self) -> Iterator[bytes]:
        """Yield the messages that are complete now."""
        while (message := self.next_message()) is not None:
            yield message

    @property
    def buffered(self) -> int:
        """Bytes held that were not yet returned as messages."""
        return len(self._buf) - self._pos

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (the stream may end cleanly here)."""
        return self._partial() is None

    def finish(self) -> None:
        """Check the stream ended cleanly; raises ProtocolError if it was cut mid-message."""
        partial = self._partial()
        if partial is not None:
            what, have, need = partial
            raise ProtocolError(
                f"stream ended in the middle of a message{what} ({have} of {need} bytes)"
            )

    def take_buffered(self) -> bytes:
        """Hand over every byte not yet returned as a message, framing included, and reset.

        Used when a stream switches from parsed messages to raw relaying after its header.
        """
        rest = bytes(self._buf[self._pos :])
        if self._length is not None:
            rest = encode_varint(self._length) + rest
        self._buf = bytearray()
        self._pos = 0
        self._length = None
        return rest

    def _read_header(self) -> bool:
        """Consume the next header if it is complete; True if a body length is now known."""
        if self.moved:
            return False
        parsed = decode_varint(self._buf, self._pos)
        if parsed is None:
            return False
        length, body = parsed
        if length == MOVED:
            self.moved = True
            self._pos = body
            if body != len(self._buf):
                raise ProtocolError("data after the marker that moved this stream")
            self._compact()
            return False
        if length > self.max_size:
            raise MessageTooLargeError(
                f"peer announced a message of {length} bytes; the maximum is {self.max_size}"
            )
        self._pos, self._length = body, length
        return True

    def _partial(self) -> tuple[str, int, int] | None:
        """Describe a half-received frame after the complete ones: (what, have, need)."""
        buf, pos, length = self._buf, self._pos, self._length
        while True:
            if length is None:
                if pos == len(buf):
                    return None
                parsed = decode_varint(buf, pos)
                if parsed is None:
                    return " header", len(buf) - pos, varint_size(buf[pos])
                length, pos = parsed
            if pos + length > len(buf):
                return "", len(buf) - pos, length
            pos += length
            length = None

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            del self._buf[:]
            self._pos = 0
        elif self._pos >= _COMPACT_THRESHOLD and 2 * self._pos >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0


def encode_tagged(sender: str, data: BytesLike) -> bytes:
    """A broadcast payload carrying its sender: varint(len(sender)) + sender + data."""
    name = sender.encode()
    return b"".join((encode_varint(len(name)), name, data))


# Sender ids are never empty, so an empty tag can mark the end of a broadcast channel. The
# stream itself stays open after it: the receiver's later close (STOP_SENDING) is how the
# coordinator learns that the member no longer receives.
END_OF_CHANNEL = encode_tagged("", b"")


def decode_tagged(payload: BytesLike) -> tuple[str, bytes]:
    """Split a payload made by :func:`encode_tagged` into ``(sender, data)``."""
    parsed = decode_varint(payload, 0)
    if parsed is None:
        raise ProtocolError("broadcast message is truncated: no sender length")
    length, start = parsed
    end = start + length
    if end > len(payload):
        raise ProtocolError(
            f"broadcast message is truncated: sender needs {length} bytes, "
            f"{len(payload) - start} present"
        )
    with memoryview(payload) as view:
        try:
            sender = str(view[start:end], "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"broadcast sender is not valid UTF-8: {exc}") from None
        return sender, bytes(view[end:])
