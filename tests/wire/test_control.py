"""Control messages: round trips, strict validation and hostile input."""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conec_trio._exceptions import ProtocolError
from conec_trio._wire import control
from conec_trio._wire.codes import Reason
from conec_trio._wire.control import (
    ALPN,
    MAX_IDS,
    MAX_MESSAGE_LEN,
    MAX_NAME_LEN,
    PROTOCOL_VERSION,
    PROXIED_MOVABLE,
    PROXIED_PLAIN,
    BroadcastCountReply,
    BroadcastCountRequest,
    BroadcastJoined,
    BroadcastListReply,
    BroadcastListRequest,
    BroadcastMembersReply,
    BroadcastMembersRequest,
    ChannelGrant,
    ChannelOffer,
    ChannelOfferReply,
    ChannelRefused,
    ChannelRequest,
    DirectClose,
    ErrorReply,
    Hello,
    IncomingProxied,
    JoinBroadcast,
    Message,
    MoveProxied,
    OpenDirect,
    OpenProxied,
    PeerAddress,
    PeerCertificateChanged,
    PeerListReply,
    PeerListRequest,
    Ping,
    PresenceDropped,
    PresenceEvent,
    PresenceSnapshot,
    PresenceSubscribe,
    PresenceUnsubscribe,
    ReachMe,
    StreamAccepted,
    StreamRefused,
    Welcome,
    decode,
    decode_hello_version,
    encode,
)

CERT = b"0\x82\x01\x00fake-der"
TOKEN = bytes(range(control.PUNCH_TOKEN_SIZE))
IP = "192.0.2.1"

SAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION, "alice", True, [("192.0.2.1", 4433), ("::1", 1)]),
    Hello(PROTOCOL_VERSION, "bob", False, []),
    Welcome(PROTOCOL_VERSION, ("198.51.100.7", 65535)),
    OpenProxied(7, "bob"),
    OpenProxied(0, None),
    OpenProxied(3, "bob", PROXIED_MOVABLE, 2**62 - 1),
    StreamAccepted(),
    StreamRefused(Reason.NO_PEER, "no client 'carol' is connected"),
    IncomingProxied(2**62 - 1, "alice"),
    OpenDirect(3),
    DirectClose(),
    MoveProxied(3, 12345),
    Ping(),
    JoinBroadcast("news"),
    BroadcastJoined(2, 5),
    BroadcastCountRequest(1, "news"),
    BroadcastCountReply(1, 0, 0),
    ErrorReply(9, "not-found", "no broadcast named 'news'"),
    ChannelRequest(4, "bob"),
    ChannelGrant(4, "bob", CERT, [("203.0.113.5", 1719)], TOKEN),
    ChannelOffer(11, "alice", CERT, [("203.0.113.9", 40000), ("10.0.0.2", 40000)], TOKEN),
    ChannelOfferReply(11, True, ""),
    ChannelOfferReply(12, False, "not listening"),
    ChannelRefused("bob", TOKEN, "refused", "peer 'bob' refused the channel: no"),
    BroadcastMembersRequest(5, "news"),
    BroadcastMembersReply(5, ["alice", "bob"], []),
    PeerListRequest(6),
    PeerListReply(6, ["alice", "bob", "carol"]),
    PresenceSubscribe(7),
    PresenceSnapshot(7, []),
    PresenceUnsubscribe(),
    PresenceEvent("carol", True),
    PresenceEvent("carol", False),
    PresenceDropped("too far behind: subscribe again"),
    PeerCertificateChanged("bob", bytes(32)),
    ReachMe("bob"),
    PeerAddress("alice", ("203.0.113.9", 40000)),
    BroadcastListRequest(7),
    BroadcastListReply(7, ["news", "weather"]),
]

TYPE_CODES: dict[type[Message], int] = {
    Hello: 1,
    Welcome: 2,
    OpenProxied: 10,
    StreamAccepted: 11,
    StreamRefused: 12,
    IncomingProxied: 13,
    OpenDirect: 14,
    DirectClose: 15,
    MoveProxied: 16,
    Ping: 17,
    JoinBroadcast: 20,
    BroadcastJoined: 21,
    BroadcastCountRequest: 30,
    BroadcastCountReply: 31,
    ErrorReply: 32,
    ChannelRequest: 40,
    ChannelGrant: 41,
    ChannelOffer: 42,
    ChannelOfferReply: 43,
    ChannelRefused: 47,
    BroadcastMembersRequest: 33,
    BroadcastMembersReply: 34,
    PeerListRequest: 60,
    PeerListReply: 61,
    PresenceSubscribe: 62,
    PresenceSnapshot: 63,
    PresenceUnsubscribe: 64,
    PresenceEvent: 65,
    PresenceDropped: 66,
    PeerCertificateChanged: 44,
    ReachMe: 45,
    PeerAddress: 46,
    BroadcastListRequest: 35,
    BroadcastListReply: 36,
}


def raw(*items: Any) -> bytes:
    """A hand-made control message: the CBOR array of ``items``."""
    return cbor2.dumps(list(items))


def test_constants() -> None:
    assert PROTOCOL_VERSION == 2
    assert ALPN == "conec-trio"


def test_reasons_are_the_wire_strings() -> None:
    # The wire format: changing a value breaks every peer of another release.
    assert {r.name: r.value for r in Reason} == {
        "NO_PEER": "no-peer",
        "LIMIT": "limit",
        "NO_BROADCAST": "no-broadcast",
        "SELF": "self",
        "NOT_LISTENING": "not-listening",
        "PEER_OPENING": "peer-opening",
        "NO_ANSWER": "no-answer",
        "REFUSED": "refused",
    }
    sent = encode(StreamRefused(Reason.LIMIT, "full"))
    assert sent == raw(12, "limit", "full")
    received = decode(sent)
    assert isinstance(received, StreamRefused)
    assert received.reason == Reason.LIMIT


def test_retired_type_code_3_is_unknown() -> None:
    # Once a hello refusal that was never sent; refusals are connection close codes.
    with pytest.raises(ProtocolError, match=r"unknown control message type code 3"):
        decode(raw(3, "limit", "full"))


def test_type_codes() -> None:
    assert set(Message.__subclasses__()) == set(TYPE_CODES)
    assert {cls: cls.TYPE_CODE for cls in TYPE_CODES} == TYPE_CODES
    assert {type(m) for m in SAMPLES} == set(TYPE_CODES)


def test_hello_version_is_first_field() -> None:
    assert dataclasses.fields(Hello)[0].name == "version"


def test_messages_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        OpenDirect(1).sid = 2  # type: ignore[misc]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    items = cbor2.loads(data)
    assert items[0] == type(msg).TYPE_CODE
    assert len(items) == 1 + len(dataclasses.fields(msg))
    assert decode(data) == msg
    assert decode(bytearray(data)) == msg
    assert decode(memoryview(data)) == msg


def test_encoding_layout() -> None:
    assert cbor2.loads(encode(Welcome(1, ("192.0.2.1", 80)))) == [2, 1, ["192.0.2.1", 80]]
    assert cbor2.loads(encode(OpenProxied(5, None))) == [10, 5, None, 0, 0]


def test_fields_added_later_take_their_defaults() -> None:
    # An OpenProxied from before kind and token existed is a plain stream.
    assert decode(cbor2.dumps([10, 5, "bob"])) == OpenProxied(5, "bob", PROXIED_PLAIN, 0)
    assert decode(cbor2.dumps([13, 5, "bob"])) == IncomingProxied(5, "bob")
    with pytest.raises(ProtocolError, match="needs 2 fields"):
        decode(cbor2.dumps([10, 5]))
    assert encode(StreamAccepted()) == b"\x81\x0b"


names = st.text(max_size=30)
counts = st.integers(0, 2**62 - 1)
# Addresses in the form decoding gives them: canonical IP literals, no repeats.
addr = st.tuples(st.ip_addresses().map(str), st.integers(1, 65535))
addrs = st.lists(addr, max_size=4, unique=True)
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "version": counts,
    "client_id": names,
    "listen": st.booleans(),
    "local_addrs": addrs,
    "observed_addr": addr,
    "addr": addr,
    "reason": names,
    "message": st.text(max_size=200),
    "sid": counts,
    "peer": names,
    "name": names,
    "senders": counts,
    "receivers": counts,
    "rid": counts,
    "oid": counts,
    "cert_der": st.binary(max_size=100),
    "cert_sha256": st.binary(min_size=32, max_size=32),
    "addrs": addrs,
    "accept": st.booleans(),
    "peers": st.lists(names, max_size=5),
    "names": st.lists(names, max_size=5),
    "joined": st.booleans(),
    "token": st.binary(min_size=control.PUNCH_TOKEN_SIZE, max_size=control.PUNCH_TOKEN_SIZE),
    "kind": counts,
}


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    fields = {f.name: FIELD_STRATEGIES[f.name] for f in dataclasses.fields(cls)}
    if cls is OpenProxied:
        fields["peer"] = st.none() | names
    if cls in (OpenProxied, IncomingProxied, MoveProxied):  # a stream's token, not a punch's
        fields["token"] = counts
    if cls is BroadcastMembersReply:  # id lists here, counts in BroadcastCountReply
        fields["senders"] = fields["receivers"] = st.lists(names, max_size=5)
    return st.builds(cls, **fields)


@settings(max_examples=200)
@given(st.sampled_from(sorted(TYPE_CODES, key=TYPE_CODES.__getitem__)).flatmap(message_strategy))
def test_round_trip_any_values(msg: Message) -> None:
    assert decode(encode(msg)) == msg


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ((1, 1, 5, True, []), r"Hello.client_id must be str, not int"),
        ((1, 1, None, True, []), r"Hello.client_id must be str, not None"),
        ((1, True, "a", True, []), r"Hello.version must be int, not bool"),
        ((1, 1.0, "a", True, []), r"Hello.version must be int, not float"),
        ((1, -1, "a", True, []), r"Hello.version must be in 0\.\.\d+, not -1"),
        ((1, 2**62, "a", True, []), r"Hello.version must be in 0\.\.\d+"),
        ((1, 2**64 - 1, "a", True, []), r"Hello.version must be in 0\.\.\d+"),
        ((1, 1, "a", 1, []), r"Hello.listen must be bool, not int"),
        ((1, 1, "a", True, {}), r"Hello.local_addrs must be an array, not dict"),
        ((1, 1, "a", True, [[IP, 1, 2]]), r"Hello.local_addrs\[0\] must be a \[host, port\]"),
        ((1, 1, "a", True, [[IP, 1], IP]), r"Hello.local_addrs\[1\] must be a \[host, port\]"),
        ((1, 1, "a", True, [[1, 1]]), r"Hello.local_addrs\[0\].host must be str, not int"),
        ((1, 1, "a", True, [["h", 1]]), r"Hello.local_addrs\[0\].host must be an IP address"),
        ((1, 1, "a", True, [["1.2.3", 1]]), r"Hello.local_addrs\[0\].host must be an IP address"),
        ((1, 1, "a", True, [["::1%" + "x" * 61, 1]]), r"local_addrs\[0\].host has 65 characters"),
        ((1, 1, "a", True, [[IP, 65536]]), r"Hello.local_addrs\[0\].port must be in 0\.\.65535"),
        ((1, 1, "a", True, [[IP, 0]]), r"Hello.local_addrs\[0\].port must be in 1\.\.65535"),
        ((1, 1, "a", True, [[IP, False]]), r"Hello.local_addrs\[0\].port must be int, not bool"),
        ((1, 1, "a", True, [[IP, p] for p in range(1, 18)]), r"local_addrs has 17 items; the max"),
        ((42, 1, "p", b"c", [[IP, p] for p in range(1, 19)], TOKEN), r"ChannelOffer.addrs has 18"),
        ((42, 1, "p", b"c" * (16 * 1024 + 1), [], TOKEN), r"ChannelOffer.cert_der has 16385 b"),
        ((42, 1, "p", b"c", [], TOKEN[:-1]), r"ChannelOffer.token has 15 bytes; it must have 16"),
        ((42, 1, "p", b"c", [], TOKEN + b"x"), r"ChannelOffer.token has 17 bytes; it must have 16"),
        ((42, 1, "p", b"c", [], "t" * 16), r"ChannelOffer.token must be bytes, not str"),
        ((42, 1, "p", b"c", []), r"ChannelOffer needs 5 fields, got 4"),
        ((41, 1, "p", b"c", [], None), r"ChannelGrant.token must be bytes, not None"),
        ((2, 1, "h:1"), r"Welcome.observed_addr must be a \[host, port\] array, not str"),
        ((10, 1, 2), r"OpenProxied.peer must be str, not int"),
        ((41, 1, "p", "cert", [], TOKEN), r"ChannelGrant.cert_der must be bytes, not str"),
        ((43, 1, "yes", ""), r"ChannelOfferReply.accept must be bool, not str"),
        ((47, "p", TOKEN[:-1], "refused", ""), r"ChannelRefused.token has 15 bytes; it must"),
        ((47, "p", TOKEN, "refused", "x" * 4097), r"ChannelRefused.message has 4097 char"),
        ((47, "p", TOKEN, "refused"), r"ChannelRefused needs 4 fields, got 3"),
        ((20, b"news"), r"JoinBroadcast.name must be str, not bytes"),
        ((34, 1, "alice", []), r"BroadcastMembersReply.senders must be an array, not str"),
        ((34, 1, [], [1]), r"BroadcastMembersReply.receivers\[0\] must be str, not int"),
        ((61, 1, None), r"PeerListReply.peers must be an array, not None"),
        ((61, 1, ["a", ["b"]]), r"PeerListReply.peers\[1\] must be str, not list"),
        ((63, True, []), r"PresenceSnapshot.rid must be int, not bool"),
        ((63, 1, {"a": 1}), r"PresenceSnapshot.peers must be an array, not dict"),
        ((65, "a", 1), r"PresenceEvent.joined must be bool, not int"),
        ((65, None, True), r"PresenceEvent.peer must be str, not None"),
        ((66, 5), r"PresenceDropped.message must be str, not int"),
        ((62, -1), r"PresenceSubscribe.rid must be in 0\.\.\d+, not -1"),
    ],
)
def test_wrong_field(items: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(raw(*items))


def test_string_lengths() -> None:
    assert decode(raw(20, "n" * MAX_NAME_LEN)) == JoinBroadcast("n" * MAX_NAME_LEN)
    with pytest.raises(ProtocolError, match=r"JoinBroadcast.name has 1025 characters"):
        decode(raw(20, "n" * (MAX_NAME_LEN + 1)))
    text = "m" * MAX_MESSAGE_LEN
    assert decode(raw(12, "limit", text)) == StreamRefused("limit", text)
    with pytest.raises(ProtocolError, match=r"StreamRefused.message has 4097 characters"):
        decode(raw(12, "limit", text + "m"))
    with pytest.raises(ProtocolError, match=r"StreamRefused.reason has 1025 characters"):
        decode(raw(12, "r" * (MAX_NAME_LEN + 1), ""))


def test_row01_local_addrs_are_bounded_and_repeats_dropped_in_order() -> None:
    addrs = [("::1", 5), ("0::0001", 5), (IP, 7), ("::1", 6), ("::1", 5)]
    assert decode(raw(1, 1, "a", True, addrs)).local_addrs == [("::1", 5), (IP, 7), ("::1", 6)]
    most = [(IP, port) for port in range(1, control.MAX_LOCAL_ADDRS + 1)]
    assert decode(raw(1, 1, "a", True, most)).local_addrs == most
    with pytest.raises(ProtocolError, match=r"Hello.local_addrs has 17 items; the maximum is 16"):
        decode(raw(1, 1, "a", True, [*most, ("::1", 1)]))


def test_row01_hello_over_the_size_limit_is_refused_before_decoding() -> None:
    # Half a MiB of addresses: refused on its size, before a single address is built.
    addrs = [[f"10.0.{i >> 8 & 255}.{i & 255}", 1 + i] for i in range(40_000)]
    data = raw(1, PROTOCOL_VERSION, "mallory", True, addrs)
    assert len(data) > 512 * 1024
    assert decode_hello_version(data) == PROTOCOL_VERSION
    with pytest.raises(ProtocolError, match=r"control message of \d+ bytes is over the maximum"):
        decode(data)


def test_largest_channel_offer_fits_well_under_the_control_limit() -> None:
    longest_host = "fe80::1%" + "x" * (control.MAX_HOST_LEN - 8)
    offer = ChannelOffer(
        2**62 - 1,
        "\U0010ffff" * MAX_NAME_LEN,  # four bytes a character in UTF-8
        b"\xff" * control.MAX_CERT_SIZE,
        [(longest_host, port) for port in range(65535 - control.MAX_CANDIDATES, 65535)],
        TOKEN,
    )
    assert len(encode(offer)) < control.MAX_CONTROL_MESSAGE_SIZE // 2
    assert decode(encode(offer)) == offer


def test_id_lists_are_bounded() -> None:
    # The count is checked as well as each id's length: a list's size is bounded by more
    # than the frame that carries it.
    many = ["a"] * MAX_IDS
    assert decode(raw(61, 1, many)) == PeerListReply(1, many)
    with pytest.raises(ProtocolError, match=r"1000001 items"):
        decode(raw(61, 1, [*many, "b"]))
    with pytest.raises(ProtocolError, match=r"PresenceSnapshot.peers\[0\] has 1025 characters"):
        decode(raw(63, 1, ["n" * (MAX_NAME_LEN + 1)]))
    with pytest.raises(ProtocolError, match=r"1000001 items"):
        decode(raw(34, 1, [], [*many, "b"]))
    with pytest.raises(ValueError, match="cannot encode PeerListReply"):
        encode(PeerListReply(1, [*many, "b"]))


def test_missing_fields() -> None:
    with pytest.raises(ProtocolError, match=r"Hello needs 4 fields, got 3"):
        decode(raw(1, 1, "a", True))
    with pytest.raises(ProtocolError, match=r"OpenDirect needs 1 fields, got 0"):
        decode(raw(14))
    with pytest.raises(ProtocolError, match=r"PresenceEvent needs 2 fields, got 1"):
        decode(raw(65, "alice"))


def test_extra_trailing_fields_are_ignored() -> None:
    data = raw(1, 1, "a", True, [], "new field", {"x": [1.5, None]}, b"")
    assert decode(data) == Hello(1, "a", True, [])
    assert decode(raw(11, 1, 2, 3)) == StreamAccepted()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (raw(99), r"unknown control message type code 99"),
        (raw(-1, "x"), r"unknown control message type code -1"),
        (raw(2**64 - 1), r"unknown control message type code"),
        (raw("hello"), r"type code must be int, not str"),
        (raw(True, 1, "a", True, []), r"type code must be int, not bool"),
        (raw(), r"empty array"),
        (cbor2.dumps({"type": 1}), r"must be a CBOR array, not dict"),
        (cbor2.dumps(1), r"must be a CBOR array, not int"),
        (cbor2.dumps("text"), r"must be a CBOR array, not str"),
        (cbor2.dumps(None), r"must be a CBOR array, not None"),
    ],
)
def test_not_a_message(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(raw(14, 1)[:-1], id="truncated"),
        pytest.param(raw(14, 1) + b"\x00", id="trailing-bytes"),
        pytest.param(b"\x82\x14\x5b" + b"\xff" * 8, id="huge-byte-string"),
        pytest.param(b"\x9b" + b"\xff" * 8, id="huge-array"),
        pytest.param(b"\x82\x14\x62\xff\xfe", id="bad-utf8"),
        pytest.param(b"\x82\x14\x1c", id="reserved-info"),
        pytest.param(b"\xff", id="lone-break"),
        pytest.param(b"\x9f\x0e\x01\xff", id="indefinite-array"),
        pytest.param(b"\x82\x14\x7f\x61a\xff", id="indefinite-string"),
        pytest.param(b"\x82\x0e\xc1\x00", id="datetime-tag"),
        pytest.param(b"\x82\x0e\xc2\x41\x01", id="bignum-tag"),
        pytest.param(b"\x82\x0e\xd8\x23\x61a", id="regex-tag"),
        pytest.param(b"\xd8\x1c\x81\xd8\x1d\x00", id="shared-reference"),
        pytest.param(b"\xdb" + b"\xff" * 8 + b"\x00", id="huge-tag"),
        pytest.param(b"\xd9\xd9\xf7" + raw(14, 1), id="self-describe-tag"),
        pytest.param(raw(1, 1, "a", True, [], cbor2.CBORTag(1, 0)), id="tag-in-extra-field"),
        pytest.param(b"\x81" * 100_000 + b"\x00", id="deep-nesting"),
        pytest.param(raw(1, 1, "a", True, [])[:-1] + b"\x81" * 5000 + b"\x80", id="deep-field"),
        pytest.param(b"\xa2\x01\x00\x01\x00", id="map-int-keys"),
        pytest.param(b"\x82\x0e\xf9\x7e\x00", id="half-float"),
        pytest.param(b"\x82\x0e\xf7", id="undefined"),
        pytest.param(b"\x82\x0e\xf0", id="simple-value"),
    ],
)
def test_malformed_cbor(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_malformed_cbor_message_mentions_cbor() -> None:
    with pytest.raises(ProtocolError, match="malformed CBOR"):
        decode(b"\x82\x14")
    with pytest.raises(ProtocolError, match="1 bytes after its CBOR value"):
        decode(raw(14, 1) + b"\x00")


def decode_or_protocol_error(data: bytes) -> None:
    """The only allowed outcomes: a message, or ProtocolError."""
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, Message)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    decode_or_protocol_error(data)


@settings(max_examples=300)
@given(st.sampled_from(SAMPLES), st.data())
def test_decode_mutated_messages(msg: Message, data: st.DataObject) -> None:
    encoded = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(encoded)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        byte = data.draw(st.integers(0, 255))
        if action == "flip" and pos < len(encoded):
            encoded[pos] = byte
        elif action == "insert":
            encoded.insert(pos, byte)
        elif action == "delete" and pos < len(encoded):
            del encoded[pos]
        elif action == "truncate":
            del encoded[pos:]
    decode_or_protocol_error(bytes(encoded))


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.sampled_from(sorted(TYPE_CODES.values())), st.lists(cbor_values, max_size=6))
def test_decode_arbitrary_fields(code: int, fields: list[Any]) -> None:
    decode_or_protocol_error(raw(code, *fields))


# --- encoding errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        JoinBroadcast("n" * (MAX_NAME_LEN + 1)),
        PresenceEvent("n" * (MAX_NAME_LEN + 1), True),
        PeerListReply(1, ["ok", "n" * (MAX_NAME_LEN + 1)]),
        StreamRefused(Reason.LIMIT, "m" * (MAX_MESSAGE_LEN + 1)),
        OpenDirect(-1),
        OpenDirect(2**62),
        Welcome(1, ("h", 70000)),
        Hello(1, "\ud800", True, []),  # a lone surrogate has no UTF-8 form
    ],
    ids=repr,
)
def test_encode_rejects_invalid_fields(msg: Message) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode(msg)


def test_encode_unregistered_message() -> None:
    with pytest.raises(TypeError, match="not a registered control message"):
        encode(Message())


# --- Hello version ------------------------------------------------------------------------


def test_decode_hello_version_current() -> None:
    data = encode(Hello(PROTOCOL_VERSION, "alice", True, []))
    assert decode_hello_version(data) == PROTOCOL_VERSION
    assert decode_hello_version(memoryview(data)) == PROTOCOL_VERSION


def test_decode_hello_version_of_a_future_hello() -> None:
    # A later version may change every other field and add new ones, even with CBOR tags.
    data = raw(1, 7, {"id": "alice"}, cbor2.CBORTag(1, 0), 1.5, ["new", {"stuff": None}])
    assert decode_hello_version(data) == 7
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize("version", [0, 23, 24, 255, 256, 2**16, 2**32, 2**64 - 1])
def test_decode_hello_version_sizes(version: int) -> None:
    assert decode_hello_version(raw(1, version)) == version


def test_decode_hello_version_indefinite_array() -> None:
    assert decode_hello_version(b"\x9f\x01\x03\xff") == 3


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(raw(), id="empty-array"),
        pytest.param(raw(1), id="no-version"),
        pytest.param(raw(2, 1, ["h", 1]), id="welcome"),
        pytest.param(raw(1, "1"), id="string-version"),
        pytest.param(raw(1, -1), id="negative-version"),
        pytest.param(raw(1, None), id="null-version"),
        pytest.param(b"\x82\x01\x1f", id="indefinite-version"),
        pytest.param(b"\x82\x01\x1c", id="reserved-head"),
        pytest.param(b"\x82\x01\x1b\x00\x00", id="truncated-version"),
        pytest.param(b"\x82", id="truncated-array"),
        pytest.param(cbor2.dumps({1: 1}), id="map"),
        pytest.param(cbor2.dumps(1), id="int"),
    ],
)
def test_decode_hello_version_not_a_hello(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_hello_version(data)
