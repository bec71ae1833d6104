"""Varints, frames, the incremental frame decoder and tagged broadcast payloads."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conec_trio._exceptions import MessageTooLargeError, ProtocolError
from conec_trio._wire.framing import (
    MAX_VARINT,
    FrameDecoder,
    decode_tagged,
    decode_varint,
    encode_frame,
    encode_tagged,
    encode_varint,
    frame_header,
)

# --- varints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (63, 1),
        (64, 2),
        (16383, 2),
        (16384, 4),
        (2**30 - 1, 4),
        (2**30, 8),
        (2**62 - 1, 8),
    ],
)
def test_varint_boundaries(value: int, size: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) == size
    assert decode_varint(encoded, 0) == (value, size)
    # Every proper prefix is incomplete, not wrong.
    for cut in range(size):
        assert decode_varint(encoded[:cut], 0) is None
    # Decoding at an offset, with bytes after the varint.
    assert decode_varint(b"xy" + encoded + b"z", 2) == (value, 2 + size)


@pytest.mark.parametrize(
    ("encoded", "value"),
    [
        # The examples of RFC 9000, appendix A.1.
        (bytes.fromhex("c2197c5eff14e88c"), 151_288_809_941_952_652),
        (bytes.fromhex("9d7f3e7d"), 494_878_333),
        (bytes.fromhex("7bbd"), 15_293),
        (bytes.fromhex("25"), 37),
        (bytes.fromhex("4025"), 37),  # not minimal, still valid
    ],
)
def test_varint_rfc_examples(encoded: bytes, value: int) -> None:
    assert decode_varint(encoded, 0) == (value, len(encoded))


@pytest.mark.parametrize("value", [-1, 2**62, 2**64])
def test_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_varint(value)


def test_varint_max_constant() -> None:
    assert MAX_VARINT == 2**62 - 1


def test_decode_varint_empty() -> None:
    assert decode_varint(b"", 0) is None
    assert decode_varint(b"\x01", 1) is None


@given(st.integers(0, MAX_VARINT))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(bytearray(encoded), 0) == (value, len(encoded))
    assert decode_varint(memoryview(encoded), 0) == (value, len(encoded))


# --- frames -------------------------------------------------------------------------------


def test_encode_frame() -> None:
    assert frame_header(3) == b"\x03"
    assert encode_frame(b"abc") == b"\x03abc"
    assert encode_frame(b"") == b"\x00"
    assert encode_frame(bytearray(100)) == b"\x40\x64" + bytes(100)
    assert encode_frame(memoryview(b"hello")[1:]) == b"\x04ello"


def test_decoder_byte_by_byte() -> None:
    messages = [b"one", b"", b"x" * 70, b"", b"last"]
    stream = b"".join(encode_frame(m) for m in messages)
    decoder = FrameDecoder(max_size=1000)
    out: list[bytes] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        out.extend(decoder)
    assert out == messages
    assert decoder.at_boundary
    assert decoder.buffered == 0
    decoder.finish()


def test_decoder_next_message() -> None:
    decoder = FrameDecoder(max_size=10)
    assert decoder.next_message() is None
    decoder.feed(encode_frame(b"a") + encode_frame(b"") + b"\x05ab")
    assert decoder.next_message() == b"a"
    assert decoder.next_message() == b""
    assert decoder.next_message() is None
    assert decoder.next_message() is None
    decoder.feed(memoryview(b"cde"))
    assert decoder.next_message() == b"abcde"
    assert decoder.next_message() is None


def test_decoder_only_empty_messages() -> None:
    decoder = FrameDecoder(max_size=0)
    decoder.feed(b"\x00\x00\x00")
    assert list(decoder) == [b"", b"", b""]
    assert decoder.at_boundary


@settings(max_examples=200)
@given(
    messages=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_decoder_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder(max_size=300)
    out: list[bytes] = []
    for start, end in itertools.pairwise(points):
        decoder.feed(bytearray(stream[start:end]))
        out.extend(decoder)
    assert out == messages
    assert decoder.at_boundary
    decoder.finish()


def test_decoder_exactly_max_size() -> None:
    decoder = FrameDecoder(max_size=100)
    decoder.feed(encode_frame(b"m" * 100))
    assert decoder.next_message() == b"m" * 100


@pytest.mark.parametrize("max_size", [10, 63, 100, 20_000])
def test_decoder_too_large_after_header_only(max_size: int) -> None:
    header = frame_header(max_size + 1)
    decoder = FrameDecoder(max_size=max_size)
    # An incomplete header says nothing yet.
    for byte in header[:-1]:
        decoder.feed(bytes([byte]))
    with pytest.raises(MessageTooLargeError, match=rf"{max_size + 1}.*{max_size}"):
        decoder.feed(header[-1:])
    # The stream is broken for good.
    with pytest.raises(MessageTooLargeError):
        decoder.next_message()


def test_decoder_delivers_messages_before_too_large_one() -> None:
    decoder = FrameDecoder(max_size=5)
    decoder.feed(encode_frame(b"ok") + frame_header(6))
    assert decoder.next_message() == b"ok"
    with pytest.raises(MessageTooLargeError):
        decoder.next_message()


def test_decoder_truncated_body() -> None:
    decoder = FrameDecoder(max_size=100)
    decoder.feed(encode_frame(b"whole") + frame_header(10) + b"abc")
    assert list(decoder) == [b"whole"]
    assert not decoder.at_boundary
    assert decoder.buffered == 3
    with pytest.raises(ProtocolError, match=r"middle of a message \(3 of 10 bytes\)"):
        decoder.finish()


def test_decoder_truncated_header() -> None:
    decoder = FrameDecoder(max_size=100_000)
    decoder.feed(frame_header(20_000)[:1])
    assert decoder.next_message() is None
    assert not decoder.at_boundary
    with pytest.raises(ProtocolError, match=r"message header \(1 of 4 bytes\)"):
        decoder.finish()


def test_decoder_boundary_with_unread_messages() -> None:
    decoder = FrameDecoder(max_size=100)
    boundaries = [decoder.at_boundary]
    # Complete but unread messages are not a truncation.
    for chunk in [encode_frame(b"a") + encode_frame(b"bc"), b"\x02", b"d", b"e"]:
        decoder.feed(chunk)
        boundaries.append(decoder.at_boundary)
    assert boundaries == [True, True, False, False, True]
    decoder.finish()
    assert list(decoder) == [b"a", b"bc", b"de"]


def test_decoder_large_message_in_small_chunks() -> None:
    # Quadratic buffering would make this take minutes rather than well under a second.
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB
    stream = encode_frame(payload)
    decoder = FrameDecoder(max_size=len(payload))
    got: list[bytes] = []
    for i in range(0, len(stream), 1000):
        decoder.feed(stream[i : i + 1000])
        got.extend(decoder)
    assert got == [payload]


def test_decoder_many_small_messages_in_one_chunk() -> None:
    messages = [str(i).encode() for i in range(50_000)]
    decoder = FrameDecoder(max_size=10)
    decoder.feed(b"".join(encode_frame(m) for m in messages))
    assert list(decoder) == messages
    assert decoder.buffered == 0


def test_decoder_buffer_stays_small_on_a_long_stream() -> None:
    chunk = b"".join(encode_frame(b"z" * 50) for _ in range(100))
    decoder = FrameDecoder(max_size=50)
    for _ in range(200):
        decoder.feed(chunk[:-7])
        assert len(list(decoder)) == 99
        decoder.feed(chunk[-7:])
        assert list(decoder) == [b"z" * 50]
        assert decoder.buffered == 0


# --- tagged broadcast payloads ------------------------------------------------------------


@given(sender=st.text(max_size=100), data=st.binary(max_size=100))
def test_tagged_round_trip(sender: str, data: bytes) -> None:
    payload = encode_tagged(sender, data)
    assert decode_tagged(payload) == (sender, data)
    assert decode_tagged(memoryview(payload)) == (sender, data)


def test_tagged_layout() -> None:
    assert encode_tagged("bé", b"\x00data") == b"\x03b\xc3\xa9\x00data"
    assert decode_tagged(b"\x00") == ("", b"")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "no sender length"),
        (b"\x40", "no sender length"),
        (b"\x05abc", "sender needs 5 bytes, 3 present"),
        (b"\x02\xff\xfe", "not valid UTF-8"),
    ],
)
def test_tagged_malformed(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_tagged(payload)


def test_moved_marker_ends_the_messages_of_a_direction() -> None:
    from conec_trio._wire.framing import MOVED_MARKER

    decoder = FrameDecoder(100)
    decoder.feed(encode_frame(b"one") + MOVED_MARKER)
    assert list(decoder) == [b"one"]
    assert decoder.moved
    assert decoder.at_boundary  # the end of the stream may follow


def test_data_after_the_moved_marker_is_refused() -> None:
    from conec_trio._wire.framing import MOVED_MARKER

    together = FrameDecoder(100)
    with pytest.raises(ProtocolError, match="after the marker"):
        together.feed(MOVED_MARKER + b"\x00")
    apart = FrameDecoder(100)
    apart.feed(MOVED_MARKER)
    assert list(apart) == []
    with pytest.raises(ProtocolError, match="after the marker"):
        apart.feed(b"\x00")
