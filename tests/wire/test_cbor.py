"""The strict CBOR decoder every peer input goes through: each limit, and nothing built first."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import uuid
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conec_trio._exceptions import BadCborError, ProtocolError
from conec_trio._wire import cbor

LOOSE = cbor.CborLimits(max_size=None, max_depth=400, max_length=10**6, max_items=10**6)
TAGGED = cbor.CborLimits(
    max_size=None,
    max_depth=400,
    max_length=10**6,
    max_items=10**6,
    tags=frozenset({cbor.TAG_BIGNUM, cbor.TAG_SET, cbor.TAG_DATETIME_STRING, cbor.TAG_UUID}),
)


def refused(data: bytes, limits: cbor.CborLimits, match: str) -> None:
    with pytest.raises(BadCborError, match=match):
        cbor.loads(data, limits)
    with pytest.raises(BadCborError, match=match):
        cbor.check(data, limits)


def test_bad_cbor_is_a_protocol_error() -> None:
    assert issubclass(BadCborError, ProtocolError)


@pytest.mark.parametrize(
    "value",
    [
        0,
        -(2**64),
        2**64 - 1,
        1.5,
        "héllo",
        b"\x00\xff",
        None,
        True,
        [],
        {},
        {"a": [1, {"b": None}], 7: "int key", -1.5: "float key", b"k": b"v"},
        [[[[[]]]]],
    ],
)
def test_plain_values_decode_as_cbor2_would(value: Any) -> None:
    assert cbor.loads(cbor2.dumps(value), LOOSE) == value


def test_allowed_tags_decode() -> None:
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    values = [2**100, {1, "a"}, when, uuid.UUID(int=7)]
    for value in values:
        assert cbor.loads(cbor2.dumps(value), TAGGED) == value


@pytest.mark.parametrize(
    "value",
    [
        2**100,  # bignum
        datetime.datetime(2024, 5, 6, tzinfo=datetime.UTC),
        ipaddress.ip_address("192.0.2.1"),
        cbor2.CBORTag(28, [1]),  # shared reference
        cbor2.CBORTag(4, [-2, 5]),  # decimal
        cbor2.CBORTag(30, [1, 3]),  # rational
        cbor2.CBORTag(35, "a+"),  # regex
        cbor2.CBORTag(99999, 0),  # unknown
    ],
    ids=repr,
)
def test_tags_are_refused_unless_allowed(value: Any) -> None:
    refused(cbor2.dumps(value), LOOSE, r"CBOR tag \d+ is not allowed")


def test_a_refused_tag_deep_inside_is_found() -> None:
    refused(cbor2.dumps([1, {"a": [2, cbor2.CBORTag(29, 0)]}]), TAGGED, "tag 29 is not allowed")


def test_shared_references_are_refused_even_where_tags_are_allowed() -> None:
    shared = b"\xd8\x1c\x82\x01\xd8\x1d\x00"  # 28([1, 29(0)]): an array that contains itself
    refused(shared, TAGGED, "tag 28 is not allowed")


def test_size_limit() -> None:
    limits = cbor.CborLimits(max_size=10, max_depth=8, max_length=100, max_items=100)
    assert cbor.loads(cbor2.dumps("x" * 8), limits) == "x" * 8  # 9 bytes
    refused(cbor2.dumps("x" * 10), limits, "CBOR value of 11 bytes is over the limit of 10")


def test_depth_limit() -> None:
    limits = cbor.CborLimits(max_size=None, max_depth=3, max_length=100, max_items=100)
    assert cbor.loads(cbor2.dumps([[[0]]]), limits) == [[[0]]]
    assert cbor.loads(cbor2.dumps([[[]], [[]]]), limits) == [[[]], [[]]]
    refused(cbor2.dumps([[[[]]]]), limits, "nest more than 3 levels deep")
    refused(cbor2.dumps([{"a": [[1]]}]), limits, "nest more than 3 levels deep")
    refused(b"\x81" * 100_000 + b"\x00", limits, "nest more than 3 levels deep")


def test_tags_count_as_nesting() -> None:
    limits = cbor.CborLimits(
        max_size=None,
        max_depth=3,
        max_length=100,
        max_items=100,
        tags=frozenset({cbor.TAG_SELF_DESCRIBED}),
    )
    refused(b"\xd9\xd9\xf7" * 100_000 + b"\x00", limits, "nest more than 3 levels deep")


def test_length_limit() -> None:
    limits = cbor.CborLimits(max_size=None, max_depth=8, max_length=3, max_items=100)
    assert cbor.loads(cbor2.dumps([1, 2, 3]), limits) == [1, 2, 3]
    refused(cbor2.dumps([1, 2, 3, 4]), limits, "an array of 4 items; the maximum is 3")
    refused(cbor2.dumps(dict.fromkeys("abcd")), limits, "a map of 4 entries; the maximum is 3")


def test_item_limit_counts_keys_values_and_elements() -> None:
    limits = cbor.CborLimits(max_size=None, max_depth=8, max_length=100, max_items=5)
    assert cbor.loads(cbor2.dumps({"a": [1, 2]}), limits) == {"a": [1, 2]}  # 5 items
    refused(cbor2.dumps({"a": [1, 2, 3]}), limits, "more than 5 data items")
    assert cbor.loads(cbor2.dumps([1, 2.5, None, 2**40]), limits) == [1, 2.5, None, 2**40]
    refused(cbor2.dumps([1, 2.5, None, 2**40, True]), limits, "more than 5 data items")


def test_declared_lengths_beyond_the_data_are_refused_without_allocating() -> None:
    refused(b"\x9b" + b"\xff" * 8, LOOSE, "an array of 18446744073709551615 items")
    huge = cbor.CborLimits(max_size=None, max_depth=8, max_length=2**64, max_items=2**64)
    refused(b"\x9b" + b"\xff" * 8 + b"\x00", huge, "truncated")
    refused(b"\x5b" + b"\xff" * 8, LOOSE, "truncated")


@pytest.mark.parametrize(
    ("key", "what"),
    [
        (b"\x82\x01\x02", "an array"),  # [1, 2] becomes a tuple key
        (b"\xa0", "a map"),
        (b"\xc2\x49\x01" + bytes(8), "a tagged value"),  # a bignum
    ],
)
def test_map_keys_must_be_scalars(key: bytes, what: str) -> None:
    refused(
        b"\xa1" + key + b"\x00", TAGGED, f"must be a number, a string or a simple value, not {what}"
    )


def test_set_elements_must_be_scalars() -> None:
    refused(cbor2.dumps(cbor2.CBORTag(258, [[1]])), TAGGED, "not an array")
    refused(cbor2.dumps(cbor2.CBORTag(258, {"a": 1})), TAGGED, "set.*must wrap an array")


def test_text_keys_only() -> None:
    limits = cbor.CborLimits(
        max_size=None, max_depth=8, max_length=10, max_items=100, text_keys_only=True
    )
    assert cbor.loads(cbor2.dumps({"a": 1, b"b": 2}), limits) == {"a": 1, b"b": 2}
    refused(cbor2.dumps({1: 1}), limits, "a map key must be a text or byte string, not an unsigned")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"\x01\x02", "1 bytes after its CBOR value"),
        (b"\x82\x01", "truncated"),
        (b"\x1b\x00", "truncated"),
        (b"\x82\x01\x1b\x00", "truncated"),  # in a run of numbers
        (b"\x83\x01\x02", "truncated"),
        (b"\x81\x01\x02", "1 bytes after its CBOR value"),
        (b"\x9f\x01\xff", "indefinite"),
        (b"\x7f\x61a\xff", "indefinite"),
        (b"\xff", "indefinite-length items and break codes"),
        (b"\x1c", "reserved head byte 0x1c"),
        (b"\x62\xff\xfe", "utf-8"),  # cbor2's own check
        (b"\xc0\x63abc", "datetime"),  # allowed tag, impossible value
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(BadCborError, match=f"(?i){match}"):
        cbor.loads(data, TAGGED)


def test_memoryview_and_bytearray() -> None:
    data = cbor2.dumps({"a": [1, 2]})
    assert (
        cbor.loads(memoryview(data), LOOSE) == cbor.loads(bytearray(data), LOOSE) == {"a": [1, 2]}
    )


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), children, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=200)
@given(json_like)
def test_round_trip_of_untagged_values(value: Any) -> None:
    assert cbor.loads(cbor2.dumps(value), LOOSE) == value


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_a_value_or_bad_cbor(data: bytes) -> None:
    # The only allowed outcomes: a value, or BadCborError (anything else fails the test).
    with contextlib.suppress(BadCborError):
        cbor.loads(data, TAGGED)
