"""The messages that open a forwarding stream: strict decoding, bounded logging (no sockets).

The end-to-end behaviour under attack is in ``test_forward_hostile.py``.
"""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conec_trio import ProtocolError
from conec_trio.forward import Target
from conec_trio.forward.protocol import (
    LOG_LIMIT,
    MAX_MESSAGE_SIZE,
    clip,
    decode_message,
    encode_answer,
    encode_request,
    parse_reply,
    parse_request,
)


def test_requests_and_answers_round_trip() -> None:
    for target in [Target("127.0.0.1", 80), Target("::1", 65535), Target("h" * 255, 1)]:
        assert parse_request(encode_request(target)) == target
    assert parse_reply(encode_answer(None)) is None
    assert parse_reply(encode_answer("target h:1 is not allowed")) == "target h:1 is not allowed"
    # What earlier versions of forward sent decodes the same.
    assert parse_request(cbor2.dumps({"host": "localhost", "port": 22})) == Target("localhost", 22)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(b"\xd8\x1c\xa0", "holds a CBOR tag", id="shareable"),
        pytest.param(b"\xa1\x64host\xd8\x1d\x00", "holds a CBOR tag", id="shared-reference"),
        pytest.param(cbor2.dumps({"host": 2**70}), "holds a CBOR tag", id="bignum"),
        pytest.param(b"\xbf\x64host\x61x\xff", "indefinite-length", id="indefinite-map"),
        pytest.param(b"\xa1\x64host\x7f\x61x\xff", "indefinite-length", id="chunked-text"),
        pytest.param(b"\xa1\x64host\x1c", "malformed", id="reserved-argument"),
        pytest.param(b"\xa1\x61a" + b"\x81" * 4 + b"\x00", "more than 4 deep", id="deep"),
        pytest.param(cbor2.dumps({"a": list(range(100))}), "more than 64", id="many-items"),
        pytest.param(b"\xbb" + b"\xff" * 8, "more than 64", id="huge-count"),
        pytest.param(cbor2.dumps({"port": 1.0}), "float or simple value", id="float"),
        pytest.param(b"\xa1\x61a\xf7", "float or simple value", id="undefined"),
        pytest.param(cbor2.dumps({}) + b"\x00", "1 bytes after its CBOR value", id="trailing"),
        pytest.param(b"\xa1\x64host\x78\xff", "ends in the middle", id="truncated-text"),
        pytest.param(b"\xa1\x64host\x19\x01", "ends in the middle", id="truncated-argument"),
        pytest.param(b"", "ends in the middle", id="empty"),
        pytest.param(b"\xa1\x64host\x62\xff\xfe", "not valid CBOR", id="not-utf8"),
        pytest.param(cbor2.dumps(["host", 1]), "a CBOR list, not a map", id="array"),
        pytest.param(cbor2.dumps({"h": "x" * MAX_MESSAGE_SIZE}), "over the limit", id="big"),
        pytest.param(cbor2.dumps({"port": 1}), "'host' is not a text", id="no-host"),
        pytest.param(cbor2.dumps({"host": "", "port": 1}), "'host' is not a text", id="no-name"),
        pytest.param(cbor2.dumps({"host": "h" * 256, "port": 1}), "1 to 255", id="long-host"),
        pytest.param(cbor2.dumps({"host": "h", "port": True}), "'port' is not", id="bool-port"),
        pytest.param(cbor2.dumps({"host": "h", "port": 0}), "'port' is not", id="port-0"),
        pytest.param(cbor2.dumps({"host": "h", "port": "80"}), "'port' is not", id="text-port"),
    ],
)
def test_a_request_that_is_not_a_plain_small_map_is_refused_saying_why(
    data: bytes, problem: str
) -> None:
    with pytest.raises(ProtocolError, match=r"^the request") as caught:
        parse_request(data)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    "answer",
    [
        {"ok": False},
        {"ok": False, "reason": 7},
        {"ok": 1},
        {"reason": "no"},
    ],
)
def test_an_answer_that_is_neither_yes_nor_a_reason_is_a_protocol_error(
    answer: dict[str, object],
) -> None:
    with pytest.raises(ProtocolError, match="the answer is neither"):
        parse_reply(cbor2.dumps(answer))


def test_a_refusal_reason_is_clipped_and_escaped() -> None:
    reason = parse_reply(encode_answer("\x1b[2J" + "r" * 3000))
    assert reason is not None
    assert reason.startswith("\\x1b[2J")
    assert reason.endswith("... (3004 characters)")
    assert len(reason) < LOG_LIMIT + 30


def test_clip_keeps_short_printable_text_and_bounds_everything_else() -> None:
    assert clip("target h:1 is not allowed") == "target h:1 is not allowed"
    assert clip("x" * LOG_LIMIT) == "x" * LOG_LIMIT
    assert clip("x" * (LOG_LIMIT + 1)) == "x" * LOG_LIMIT + f"... ({LOG_LIMIT + 1} characters)"
    assert clip("a\nb\x00c\u202e") == "a\\nb\\x00c\\u202e"
    assert clip("déjà vu") == "déjà vu"


@given(st.text())
def test_clip_is_bounded_and_printable(text: str) -> None:
    clipped = clip(text)
    assert len(clipped) <= LOG_LIMIT + len(f"... ({len(text)} characters)")
    assert clipped.isprintable()


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_map_or_a_protocol_error(data: bytes) -> None:
    try:
        value = decode_message(data, "the request")
    except ProtocolError:
        return
    assert isinstance(value, dict)
