"""Hostile input against a live coordinator: nothing honest is lost, and no one gets in.

A raw QUIC client (``rawquic``: a valid handshake and client cert, then any bytes at all)
attacks the coordinator while two honest clients, alice and bob, keep talking over a proxied
stream and a broadcast channel. After every attack: the honest traffic went on and lost,
duplicated or reordered nothing; the coordinator still admits and serves a newcomer; and the
offender got a clear answer: its connection closed with ``CloseCode.PROTOCOL`` and a reason
that says what was wrong, or the offending stream reset with ``StreamCode.PROTOCOL``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509
from helpers import wait_for
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rawquic import RawClient, open_raw_client

import conec_trio
from conec_trio import BroadcastMessage, ChannelError, IncomingStream, StreamId, _tls, certs
from conec_trio._wire import control
from conec_trio._wire.codes import CloseCode, Reason, StreamCode
from conec_trio._wire.framing import encode_frame, encode_varint

DEADLINE = 10.0  # seconds: every wait is bounded by it


# --- honest traffic that runs through every attack ------------------------------------------


class Traffic:
    """alice sends numbered messages to bob on a proxied stream, bob echoes each one back,
    and each of them broadcasts every number on channel "room"; both hear every broadcast.

    It runs, ping-pong paced, until :meth:`finish`, which ends every stream cleanly and
    checks that each message arrived exactly once and in order.
    """

    ROOM = "room"

    def __init__(self, alice: conec_trio.Client, bob: conec_trio.Client) -> None:
        self.alice, self.bob = alice, bob
        self.rounds = 0  # echoes alice got back
        self.bob_got: list[bytes] = []
        self.heard: dict[str, list[BroadcastMessage[bytes]]] = {"alice": [], "bob": []}
        self._stop = False
        self._done: list[trio.Event] = []

    async def start(self, nursery: trio.Nursery) -> None:
        with trio.fail_after(DEADLINE):
            a_send, a_recv = await self.alice.new_proxied_stream("bob")
            incoming = await self.bob.incoming_streams.receive()
            assert incoming.peer == "alice"
            a_bsend, a_brecv = await self.alice.new_broadcast(self.ROOM)
            b_bsend, b_brecv = await self.bob.new_broadcast(self.ROOM)
        self._spawn(nursery, self._alice, a_send, a_recv, a_bsend)
        self._spawn(nursery, self._bob, incoming, b_bsend)
        self._spawn(nursery, self._listen, "alice", a_brecv)
        self._spawn(nursery, self._listen, "bob", b_brecv)

    def _spawn(self, nursery: trio.Nursery, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        done = trio.Event()
        self._done.append(done)

        async def run() -> None:
            try:
                await fn(*args)
            finally:
                done.set()

        nursery.start_soon(run)

    async def _alice(self, send: Any, recv: Any, bsend: Any) -> None:
        i = 0
        while not self._stop:
            await send.send(b"%d" % i)
            await bsend.send(b"a%d" % i)
            assert await recv.receive() == b"%d" % i, "alice got a wrong echo"
            i += 1
            self.rounds = i
        await send.aclose()
        await bsend.aclose()
        with pytest.raises(trio.EndOfChannel):
            await recv.receive()

    async def _bob(self, incoming: IncomingStream, bsend: Any) -> None:
        async for msg in incoming.recv:
            self.bob_got.append(msg)
            await bsend.send(b"b" + msg)
            await incoming.send.send(msg)
        await incoming.send.aclose()
        await bsend.aclose()

    async def _listen(self, name: str, recv: Any) -> None:
        async for msg in recv:
            self.heard[name].append(msg)

    async def advance(self, rounds: int = 3) -> None:
        """Wait until the traffic made ``rounds`` more round trips (it is still alive)."""
        target = self.rounds + rounds
        await wait_for(lambda: self.rounds >= target, DEADLINE)

    async def finish(self, others: dict[str, list[bytes]] | None = None) -> None:
        """End the traffic; check every message arrived once, in order. ``others``: what each
        other broadcast sender (an attacker that joined "room") was seen to send."""
        self._stop = True
        with trio.fail_after(DEADLINE):
            for done in self._done:
                await done.wait()
        n = self.rounds
        assert n > 0
        assert self.bob_got == [b"%d" % i for i in range(n)]
        expected = {"alice": [b"a%d" % i for i in range(n)], "bob": [b"b%d" % i for i in range(n)]}
        expected.update(others or {})
        for listener, messages in self.heard.items():
            by_sender: dict[str, list[bytes]] = {}
            for m in messages:
                by_sender.setdefault(m.sender, []).append(m.data)
            assert by_sender == {k: v for k, v in expected.items() if v}, listener


# --- the arena: coordinator, honest clients, traffic, newcomers and raw attackers ------------


@dataclasses.dataclass
class Arena:
    coord: conec_trio.Coordinator
    alice: conec_trio.Client
    bob: conec_trio.Client
    traffic: Traffic
    ca: bytes
    make_config: Callable[..., conec_trio.ClientConfig]
    newcomers: int = 0
    broadcast_others: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)

    def raw(self, client_id: str = "mallory") -> Any:
        """``async with arena.raw() as raw``: a raw attacker, handshake done, no hello yet."""
        return open_raw_client(self.coord.address, self.ca, client_id)

    async def check_unharmed(self) -> None:
        """The honest traffic goes on, and the coordinator admits and serves a newcomer."""
        await self.traffic.advance()
        assert {"alice", "bob"} <= set(self.coord.client_ids())
        self.newcomers += 1
        await newcomer_roundtrip(self.make_config(self.coord, f"newcomer{self.newcomers}"))


async def newcomer_roundtrip(config: conec_trio.ClientConfig) -> None:
    """A new client gets in and a stream through the coordinator (to itself) works."""
    with trio.fail_after(DEADLINE):
        async with conec_trio.open_client(config) as newcomer:
            send, recv = await newcomer.new_proxied_stream(newcomer.id)
            incoming = await newcomer.incoming_streams.receive()
            await send.send(b"ping")
            assert await incoming.recv.receive() == b"ping"
            await incoming.send.send(b"pong")
            assert await recv.receive() == b"pong"


@asynccontextmanager
async def open_arena(
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
    ca: bytes,
    *,
    bob_options: dict[str, Any] | None = None,
) -> AsyncIterator[Arena]:
    async with (
        conec_trio.open_coordinator(coord_config()) as coord,
        conec_trio.open_client(client_config(coord, "alice")) as alice,
        conec_trio.open_client(client_config(coord, "bob", **(bob_options or {}))) as bob,
        trio.open_nursery() as nursery,
    ):
        traffic = Traffic(alice, bob)
        await traffic.start(nursery)
        arena = Arena(coord, alice, bob, traffic, ca, client_config)
        await traffic.advance()
        yield arena
        await arena.check_unharmed()
        await traffic.finish(arena.broadcast_others)


@pytest.fixture
async def arena(coord_config, client_config, coord_identity) -> AsyncIterator[Arena]:
    async with open_arena(coord_config, client_config, coord_identity[0]) as a:
        yield a


# --- what the offender must see --------------------------------------------------------------


async def expect_closed(raw: RawClient, *words: str, code: int = CloseCode.PROTOCOL) -> str:
    """The coordinator closed the raw connection with ``code``, its reason naming ``words``."""
    got_code, reason = await raw.wait_closed()
    assert got_code == code, f"closed with {got_code:#x} ({reason!r}), expected {code:#x}"
    for word in words:
        assert word in reason, f"{word!r} not in the close reason {reason!r}"
    return reason


async def expect_stream_refused(raw: RawClient, sid: int) -> None:
    """Stream ``sid`` was reset with StreamCode.PROTOCOL, and the offender's connection
    itself is still served (a bad stream costs only that stream)."""
    code = await raw.wait_reset(sid)
    assert code == StreamCode.PROTOCOL, f"stream reset with {code:#x}, not PROTOCOL"
    reply = await raw.still_served()
    assert isinstance(reply, control.ErrorReply | control.BroadcastCountReply)


def cbor(*items: Any) -> bytes:
    return cbor2.dumps(list(items))


def hello_payload(client_id: str = "mallory") -> bytes:
    return control.encode(control.Hello(control.PROTOCOL_VERSION, client_id, True, []))


HUGE = 2**40  # bytes announced by a frame header: far over any maximum
NASTY_NAME = "\x00" * 1024  # a legal length, but its repr() is four times as long


# --- attacks before the hello -----------------------------------------------------------------


V = control.PROTOCOL_VERSION
BAD_HELLOS = [
    ("not-cbor", b"\xff\xfe\xfd not cbor at all", ["bad hello", "not a Hello"]),
    ("bad-cbor-tail", bytes([0x84, 0x01, V, 0xFF, 0xFF]), ["bad hello", "malformed CBOR"]),
    ("id-int", cbor(1, V, 42, True, []), ["Hello.client_id must be str, not int"]),
    ("listen-str", cbor(1, V, "mallory", "yes", []), ["Hello.listen must be bool, not str"]),
    ("addrs-map", cbor(1, V, "mallory", True, {}), ["Hello.local_addrs must be an array"]),
    (
        "port-range",
        cbor(1, V, "mallory", True, [["127.0.0.1", 70000]]),
        ["Hello.local_addrs[0].port must be in 0..65535"],
    ),
    ("too-short", cbor(1, V, "mallory"), ["Hello needs 4 fields, got 2"]),
    ("version-str", cbor(1, "1", "mallory", True, []), ["Hello.version"]),
    ("welcome", control.encode(control.Welcome(1, ("127.0.0.1", 1))), ["not a Hello"]),
    ("unknown-code", cbor(99, V, "mallory", True, []), ["not a Hello"]),
    ("open-before-hello", control.encode(control.OpenProxied(0, "bob")), ["not a Hello"]),
]


async def each_case(
    arena: Arena, cases: list[tuple[Any, ...]], run: Callable[..., Awaitable[None]]
) -> None:
    """Run ``run(*case[1:])`` for every case, and check the honest traffic still flows after
    each one; a failure names its case (``case[0]``)."""
    for case_id, *args in cases:
        try:
            await run(*args)
            await arena.traffic.advance(1)
        except BaseException as exc:
            exc.add_note(f"in case {case_id!r}")
            raise


async def test_bad_hello_is_refused_saying_why(arena: Arena):
    async def attack(payload: bytes, words: list[str]) -> None:
        async with arena.raw() as raw:
            raw.open_frame_stream(payload)
            await expect_closed(raw, *words)
        assert "mallory" not in arena.coord.client_ids()

    await each_case(arena, BAD_HELLOS, attack)
    # Nothing any offender sent reached anyone.
    assert no_incoming(arena.bob)
    assert no_incoming(arena.alice)


def hello_with_addrs(addrs: list[Any]) -> bytes:
    return cbor(1, control.PROTOCOL_VERSION, "mallory", True, addrs)


ROW01_HELLOS = [
    (
        "17-addresses",
        hello_with_addrs([["10.0.0.1", port] for port in range(1, 18)]),
        ["bad hello", "Hello.local_addrs has 17 items; the maximum is 16"],
    ),
    (
        "host-not-an-ip",
        hello_with_addrs([["example.com", 1]]),
        ["bad hello", "Hello.local_addrs[0].host must be an IP address"],
    ),
    (
        "port-0",
        hello_with_addrs([["10.0.0.1", 0]]),
        ["bad hello", "Hello.local_addrs[0].port must be in 1..65535"],
    ),
    (
        # Half a MiB of addresses stalled the coordinator for 30 s when a channel to its
        # sender was brokered; refused on its size now, before any address is decoded.
        "half-a-mib",
        hello_with_addrs([[f"10.0.{i >> 8 & 255}.{i & 255}", 1 + i] for i in range(40_000)]),
        ["bad hello", "over the maximum of 65536 bytes"],
    ),
]


async def test_row01_hello_with_unbounded_local_addrs_is_refused_saying_why(arena: Arena):
    async def attack(payload: bytes, words: list[str]) -> None:
        async with arena.raw() as raw:
            raw.open_frame_stream(payload)
            await expect_closed(raw, *words)
        assert "mallory" not in arena.coord.client_ids()

    await each_case(arena, ROW01_HELLOS, attack)


async def test_row01_channel_offer_carries_each_address_once(arena: Arena):
    local = [["127.0.0.1", 4000], ["0::0001", 4000], ["::1", 4000], ["127.0.0.1", 4000]]
    async with arena.raw() as mallory, arena.raw("eve") as eve:
        await eve.hello()
        mallory.control_sid = mallory.open_frame_stream(hello_with_addrs(local))
        welcome = await mallory.read_control(mallory.control_sid)
        assert isinstance(welcome, control.Welcome)
        mallory.send_control(control.ChannelRequest(7, "eve"))
        assert eve.control_sid is not None
        offer = await eve.read_control(eve.control_sid)
        assert isinstance(offer, control.ChannelOffer)
        eve.send_control(control.ChannelOfferReply(offer.oid, False, "no"))
        assert offer.addrs == [welcome.observed_addr, ("127.0.0.1", 4000), ("::1", 4000)]
        grant = await mallory.read_control(mallory.control_sid)
        assert isinstance(grant, control.ChannelGrant)
        assert grant.rid == 7
        assert grant.token == offer.token
        refusal = await mallory.read_control(mallory.control_sid)
        assert isinstance(refusal, control.ChannelRefused)
        assert refusal.token == offer.token
        assert refusal.reason == Reason.REFUSED


async def test_row11_hello_with_an_id_ending_in_a_newline_is_refused(arena: Arena):
    # A certificate can carry the name "alice\n"; the id check used "$", which matches
    # before a final newline, so it got in beside alice and reached logs and stream peers.
    sneaky = "alice\n"
    identity = certs._self_signed([x509.DNSName(sneaky)], "sneaky", days=1)
    async with open_raw_client(arena.coord.address, arena.ca, sneaky, identity=identity) as raw:
        raw.open_frame_stream(
            control.encode(control.Hello(control.PROTOCOL_VERSION, sneaky, True, []))
        )
        await expect_closed(raw, "client id 'alice\\n' is not valid", code=CloseCode.BAD_ID)
    assert sorted(arena.coord.client_ids()) == ["alice", "bob"]
    assert no_incoming(arena.alice)


def no_incoming(client: conec_trio.Client) -> bool:
    """No stream is waiting in ``client.incoming_streams``."""
    recv = client.incoming_streams._recv  # type: ignore[attr-defined]
    return bool(recv.statistics().current_buffer_used == 0)


async def test_truncated_hello_then_fin_resets_the_stream_and_admits_no_one(arena: Arena):
    async with arena.raw() as raw:
        sid = raw.open_stream(encode_frame(hello_payload())[:-3], fin=True)
        code = await raw.wait_reset(sid)
        assert code == StreamCode.PROTOCOL
        assert "mallory" not in arena.coord.client_ids()


async def test_hello_frame_announcing_a_terabyte(arena: Arena):
    async with arena.raw() as raw:
        sid = raw.open_stream(encode_varint(HUGE) + b"\x84\x01\x01")
        code = await raw.wait_reset(sid)
        assert code == StreamCode.PROTOCOL
        assert "mallory" not in arena.coord.client_ids()


async def test_stream_opened_before_the_hello_is_complete_reaches_no_one(arena: Arena):
    """Half a hello on the first stream, then an OpenProxied to bob on a second one: the
    first complete header is taken as the hello, so the open is refused as a bad hello, and
    bob gets nothing."""
    async with arena.raw() as raw:
        raw.open_stream(encode_frame(hello_payload())[:-5])
        raw.open_frame_stream(control.encode(control.OpenProxied(0, "bob")))
        await expect_closed(raw, "bad hello", "not a Hello")
    assert no_incoming(arena.bob)
    assert "mallory" not in arena.coord.client_ids()


# --- attacks on the control stream after a valid hello ----------------------------------------


BAD_CONTROL = [
    (
        "truncated-then-fin",
        encode_frame(control.encode(control.BroadcastCountRequest(1, "room")))[:-2],
        True,
        ["bad control message", "stream ended in the middle of a message"],
    ),
    ("clean-fin", b"", True, ["bad control message", "stream ended"]),
    ("bad-cbor", encode_frame(b"\xff"), False, ["bad control message", "malformed CBOR"]),
    (
        "welcome",
        encode_frame(control.encode(control.Welcome(1, ("127.0.0.1", 1)))),
        False,
        ["unexpected control message Welcome"],
    ),
    ("second-hello", encode_frame(hello_payload()), False, ["unexpected control message Hello"]),
    (
        "stream-accepted",
        encode_frame(control.encode(control.StreamAccepted())),
        False,
        ["unexpected control message StreamAccepted"],
    ),
    (
        "unknown-code",
        encode_frame(cbor(99, 1, 2)),
        False,
        ["bad control message", "unknown control message type code 99"],
    ),
    (
        "wrong-type",
        encode_frame(cbor(30, "one", "room")),
        False,
        ["BroadcastCountRequest.rid must be int, not str"],
    ),
]


async def test_bad_control_message_closes_the_offender(arena: Arena):
    async def attack(data: bytes, fin: bool, words: list[str]) -> None:
        async with arena.raw() as raw:
            await raw.hello()
            assert "mallory" in arena.coord.client_ids()
            assert raw.control_sid is not None
            raw.write(raw.control_sid, data, fin=fin)
            await expect_closed(raw, *words)
            await wait_for(lambda: "mallory" not in arena.coord.client_ids(), DEADLINE)

    await each_case(arena, BAD_CONTROL, attack)


async def test_control_frame_announcing_a_terabyte(arena: Arena):
    async with arena.raw() as raw:
        await raw.hello()
        assert raw.control_sid is not None
        raw.write(raw.control_sid, encode_varint(HUGE) + b"\x00" * 100)
        await expect_closed(raw, "bad control message", "maximum")


async def test_offer_replies_for_offers_never_made_are_ignored(arena: Arena):
    """A client cannot answer a channel offer made to someone else: replies for offer ids it
    was never given are dropped, and a real channel between alice and bob still forms."""
    async with arena.raw() as raw:
        await raw.hello()
        for oid in range(1, 21):
            raw.send_control(control.ChannelOfferReply(oid, False, "mallory says no"))
        assert isinstance(await raw.still_served(), control.ErrorReply)
        with trio.fail_after(DEADLINE):
            await arena.alice.new_channel("bob")
            send, _ = await arena.alice.new_direct_stream("bob")
            incoming = await arena.bob.incoming_streams.receive()
            await send.send(b"direct")
            assert await incoming.recv.receive() == b"direct"
            await arena.alice.close_channel("bob")


# --- attacks with stream headers ----------------------------------------------------------------


BAD_STREAM_HEADERS = [
    ("stream-accepted", encode_frame(control.encode(control.StreamAccepted()))),
    ("hello", encode_frame(hello_payload())),
    ("welcome", encode_frame(control.encode(control.Welcome(1, ("192.0.2.1", 1))))),
    ("unknown-code", encode_frame(cbor(99))),
    ("not-an-array", encode_frame(b"\x00garbage")),
    ("sid-over-2**62-1", encode_frame(cbor(10, 2**62, "bob"))),
    ("sid-bignum", encode_frame(cbor(10, 2**64, "bob"))),
    ("sid-negative", encode_frame(cbor(10, -1, "bob"))),
    ("peer-2000-chars", encode_frame(cbor(10, 0, "x" * 2000))),
    ("peer-int", encode_frame(cbor(10, 0, 7))),
    ("broadcast-name-2000-chars", encode_frame(cbor(20, "r" * 2000))),
    ("truncated-then-fin", encode_frame(control.encode(control.OpenProxied(0, "bob")))[:-1]),
]


async def test_bad_stream_header_resets_only_that_stream(arena: Arena):
    async with arena.raw() as raw:
        await raw.hello()

        async def attack(data: bytes) -> None:
            sid = raw.open_stream(data, fin=True)
            await expect_stream_refused(raw, sid)

        await each_case(arena, BAD_STREAM_HEADERS, attack)
    assert no_incoming(arena.bob)
    assert no_incoming(arena.alice)


async def test_stream_header_announcing_a_terabyte(arena: Arena):
    async with arena.raw() as raw:
        await raw.hello()
        sid = raw.open_stream(encode_varint(HUGE) + b"\x82\x0a\x00")
        await expect_stream_refused(raw, sid)


async def test_largest_stream_id_is_relayed_intact(arena: Arena):
    """OpenProxied with sid 2**62-1 (the largest the protocol allows) is a legal stream."""
    async with arena.raw() as raw:
        await raw.hello()
        sid = raw.open_frame_stream(control.encode(control.OpenProxied(2**62 - 1, "bob")))
        assert isinstance(await raw.read_control(sid), control.StreamAccepted)
        with trio.fail_after(DEADLINE):
            incoming = await arena.bob.incoming_streams.receive()
        assert incoming.peer == "mallory"
        assert incoming.stream_id == StreamId.proxied(2**62 - 1)
        raw.send_frame(sid, b"from mallory", fin=True)
        with trio.fail_after(DEADLINE):
            assert [m async for m in incoming.recv] == [b"from mallory"]
            await incoming.send.send(b"to mallory")
            await incoming.send.aclose()
        assert await raw.read_message(sid) == b"to mallory"


@pytest.mark.parametrize("where", ["open-proxied", "channel-request", "broadcast-count"])
async def test_names_whose_repr_is_long_get_a_clear_refusal(arena: Arena, where: str):
    async with arena.raw() as raw:
        await raw.hello()
        assert raw.control_sid is not None
        if where == "open-proxied":
            sid = raw.open_frame_stream(control.encode(control.OpenProxied(0, NASTY_NAME)))
            await raw.wait_until(lambda: bool(raw.streams[sid].messages) or raw.streams[sid].ended)
            if raw.streams[sid].messages:
                reply = await raw.read_control(sid)
                assert isinstance(reply, control.StreamRefused)
            else:
                assert raw.streams[sid].reset_code == StreamCode.PROTOCOL
        else:
            msg: control.Message = (
                control.ChannelRequest(7, NASTY_NAME)
                if where == "channel-request"
                else control.BroadcastCountRequest(7, NASTY_NAME)
            )
            raw.send_control(msg)
            reply = await raw.read_control(raw.control_sid)
            assert isinstance(reply, control.ErrorReply)
            assert reply.rid == 7
        assert raw.conn.is_open


async def test_longest_refusal_of_a_channel_offer_reaches_the_requester_clipped(arena: Arena):
    """mallory refuses alice's channel with the longest explanation the protocol allows; the
    coordinator passes it on to alice inside its own ErrorReply (which has the same limit)."""
    async with arena.raw() as raw:
        await raw.hello()
        assert raw.control_sid is not None

        async def alice_asks() -> None:
            with pytest.raises(ChannelError, match="refused"):
                await arena.alice.new_channel("mallory")

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice_asks)
                offer = await raw.read_control(raw.control_sid)
                assert isinstance(offer, control.ChannelOffer)
                assert offer.peer == "alice"
                message = "no! " * (control.MAX_MESSAGE_LEN // 4)
                raw.send_control(control.ChannelOfferReply(offer.oid, False, message))


async def test_three_hundred_garbage_streams(arena: Arena):
    """Every one is refused, the offender stays served, and the coordinator keeps no task or
    stream state for any of them."""
    async with arena.raw() as raw:
        await raw.hello()
        baseline = coordinator_tasks(arena.coord)
        sids = [
            raw.open_stream(encode_frame(b"\x00junk %d" % i), fin=i % 2 == 0) for i in range(300)
        ]
        for sid in sids:
            assert await raw.wait_reset(sid) == StreamCode.PROTOCOL
        assert isinstance(await raw.still_served(), control.ErrorReply)
        await wait_for(lambda: coordinator_tasks(arena.coord) <= baseline, DEADLINE)
        session = arena.coord._clients["mallory"]
        await wait_for(lambda: len(session.table.streams) <= 1, DEADLINE)  # the control stream


async def test_three_hundred_streams_that_never_finish_their_header(arena: Arena):
    """Half a varint on each of 300 streams: the coordinator waits for the rest, and lets
    go of all of it as soon as the offender leaves."""
    baseline = coordinator_tasks(arena.coord)
    async with arena.raw() as raw:
        await raw.hello()
        for _ in range(300):
            raw.open_stream(b"\x40")
        assert isinstance(await raw.still_served(), control.ErrorReply)
        await arena.traffic.advance()
    await wait_for(lambda: coordinator_tasks(arena.coord) <= baseline, DEADLINE)


def coordinator_tasks(coord: conec_trio.Coordinator) -> int:
    """Tasks running under the coordinator's nursery now."""
    count = 0
    stack = list(coord._nursery.child_tasks)
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


# --- attacks on relayed and broadcast streams ----------------------------------------------------


async def test_proxied_stream_truncated_then_fin_breaks_only_that_stream(arena: Arena):
    async with arena.raw() as raw:
        await raw.hello()
        sid = raw.open_frame_stream(control.encode(control.OpenProxied(5, "bob")))
        assert isinstance(await raw.read_control(sid), control.StreamAccepted)
        with trio.fail_after(DEADLINE):
            incoming = await arena.bob.incoming_streams.receive()
        raw.write(sid, encode_frame(b"whole") + encode_frame(b"cut short")[:-4], fin=True)
        with trio.fail_after(DEADLINE):
            assert await incoming.recv.receive() == b"whole"
            with pytest.raises(trio.BrokenResourceError, match="middle of a message"):
                await incoming.recv.receive()


async def test_proxied_frame_announcing_a_terabyte_breaks_only_that_stream(arena: Arena):
    """The relay does not parse frames: bob's own decoder meets the huge header, and bob must
    treat it as a broken stream, not die of it."""
    async with arena.raw() as raw:
        await raw.hello()
        sid = raw.open_frame_stream(control.encode(control.OpenProxied(5, "bob")))
        assert isinstance(await raw.read_control(sid), control.StreamAccepted)
        with trio.fail_after(DEADLINE):
            incoming = await arena.bob.incoming_streams.receive()
        raw.write(sid, encode_frame(b"whole"))
        with trio.fail_after(DEADLINE):
            assert await incoming.recv.receive() == b"whole"
        raw.write(sid, encode_varint(HUGE) + b"\x00" * 64)
        with trio.fail_after(DEADLINE), pytest.raises(trio.BrokenResourceError):
            await incoming.recv.receive()
        st = raw.streams[sid]
        await raw.wait_until(lambda: st.reset_code is not None or st.stop_code is not None)


async def join_room(raw: RawClient) -> int:
    sid = raw.open_frame_stream(control.encode(control.JoinBroadcast(Traffic.ROOM)))
    joined = await raw.read_control(sid)
    assert isinstance(joined, control.BroadcastJoined)
    assert joined.senders == 3
    return sid


async def test_broadcast_frames_truncated_then_fin_affect_no_other_member(arena: Arena):
    arena.broadcast_others["mallory"] = [b"hello room"]
    async with arena.raw() as raw:
        await raw.hello()
        sid = await join_room(raw)
        raw.send_frame(sid, b"hello room")
        raw.write(sid, encode_frame(b"never whole")[:-3], fin=True)
        # mallory no longer counts as a sender; alice and bob do.
        with trio.fail_after(DEADLINE):
            while (await arena.alice.broadcast_count(Traffic.ROOM))[0] != 2:
                await arena.traffic.advance(1)
        await arena.traffic.advance()
    # finish() checks alice and bob each heard "hello room" from mallory exactly once, and
    # every message of each other, in order.


async def test_broadcast_member_that_breaks_the_framing_is_told(arena: Arena):
    async with arena.raw() as raw:
        await raw.hello()
        sid = await join_room(raw)
        raw.write(sid, encode_frame(b"never whole")[:-3], fin=True)
        assert await raw.wait_reset(sid, timeout=2) == StreamCode.PROTOCOL


async def test_broadcast_frame_announcing_a_terabyte_affects_no_other_member(arena: Arena):
    async with arena.raw() as raw:
        await raw.hello()
        sid = await join_room(raw)
        raw.write(sid, encode_varint(HUGE) + b"\x00" * 64)
        assert await raw.wait_reset(sid) == StreamCode.PROTOCOL
        await arena.traffic.advance()


async def test_opener_giving_up_on_streams_bob_has_no_room_for_does_not_disconnect_bob(
    coord_config, client_config, coord_identity
):
    # bob allows 4 streams from the coordinator at a time; the traffic uses one.
    async with (
        open_arena(
            coord_config, client_config, coord_identity[0], bob_options={"max_streams": 4}
        ) as arena,
        arena.raw() as raw,
    ):
        await raw.hello()
        sids = []
        for n in range(6):
            sid = raw.open_frame_stream(control.encode(control.OpenProxied(n, "bob")))
            assert isinstance(await raw.read_control(sid), control.StreamAccepted)
            sids.append(sid)
        # mallory gives up on its last stream (which bob has no room for yet).
        raw.conn.stop_stream(sids[-1], StreamCode.STOPPED)
        raw.conn.reset_stream(sids[-1], StreamCode.ABORTED)
        assert isinstance(await raw.still_served(), control.ErrorReply)
        await arena.traffic.advance()
        conn = arena.bob._link.conn
        assert conn is not None
        assert conn.is_open, f"bob was disconnected: {conn.close_reason}"


# --- fuzzing: arbitrary frames after a valid hello ----------------------------------------------

_names = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=1100
)  # printable: names whose repr() grows are the dedicated test's business
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | _names | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=8,
)
_codes = st.sampled_from([1, 2, 3, 10, 11, 12, 13, 14, 15, 20, 21, 30, 31, 32, 40, 41, 42, 43, 99])
_legal_names = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=64
) | st.sampled_from(["alice", "mallory", "nobody"])
_ints = st.integers(0, 2**62 - 1)
_well_formed = st.one_of(  # valid messages, in and out of place, with odd but legal values
    st.builds(control.OpenProxied, _ints, st.none() | _legal_names),
    st.builds(control.JoinBroadcast, _legal_names),
    st.builds(control.BroadcastCountRequest, _ints, _legal_names),
    st.builds(control.ChannelRequest, _ints, _legal_names),
    st.builds(control.ChannelOfferReply, _ints, st.booleans(), _legal_names),
    st.builds(control.StreamAccepted),
    st.builds(control.DirectClose),
).map(control.encode)
_payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda code, rest: cbor2.dumps([code, *rest]), _codes, st.lists(_values, max_size=5)),
    _well_formed,
)
FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@asynccontextmanager
async def fuzz_setup(ca_key: tuple[bytes, bytes]) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A coordinator, an honest alice with a stream to herself, and a raw attacker."""
    ca, key = ca_key
    config = conec_trio.CoordConfig(cert_chain=ca, private_key=key, host="127.0.0.1", port=0)
    async with conec_trio.open_coordinator(config) as coord:
        alice_cfg = conec_trio.ClientConfig(
            id="alice", coord_host="127.0.0.1", coord_port=coord.address[1], ca=ca
        )
        async with (
            conec_trio.open_client(alice_cfg) as alice,
            open_raw_client(coord.address, ca) as raw,
        ):
            with trio.fail_after(DEADLINE):
                send, _ = await alice.new_proxied_stream("alice")
                incoming = await alice.incoming_streams.receive()
            await raw.hello()

            async def alice_unharmed() -> None:
                with trio.fail_after(DEADLINE):
                    await send.send(b"still here")
                    assert await incoming.recv.receive() == b"still here"

            yield coord, raw, alice_unharmed


@FUZZ
@given(payload=_payloads, cut=st.integers(0, 8), fin=st.booleans())
async def test_fuzz_first_frame_of_a_stream(coord_identity, payload: bytes, cut: int, fin: bool):
    """Any first frame (whole, or cut short and finished) is refused with a PROTOCOL reset
    or answered; never a crash, never a closed connection."""
    async with fuzz_setup(coord_identity) as (_, raw, alice_unharmed):
        frame = encode_frame(payload)
        if cut and fin:
            frame = frame[: max(0, len(frame) - cut)]
        sid = raw.open_stream(frame, fin=fin)
        stream = raw.streams[sid]
        await raw.wait_until(lambda: stream.ended or bool(stream.messages) or not raw.conn.is_open)
        assert raw.conn.is_open, raw.conn.close_reason
        if stream.messages:  # it happened to be a valid header: answered
            reply = control.decode(stream.messages[0])
            event(f"answered {type(reply).__name__}")
            assert isinstance(
                reply, control.StreamAccepted | control.StreamRefused | control.BroadcastJoined
            )
        else:
            event("refused")
            assert stream.reset_code == StreamCode.PROTOCOL
        assert isinstance(await raw.still_served(), control.ErrorReply)
        await alice_unharmed()


@FUZZ
@given(payloads=st.lists(_well_formed | _payloads, min_size=1, max_size=3))
async def test_fuzz_control_stream_frames(coord_identity, payloads: list[bytes]):
    """Frames of anything on the control stream: answered, ignored or a PROTOCOL close with a
    reason; the coordinator and alice carry on."""
    async with fuzz_setup(coord_identity) as (coord, raw, alice_unharmed):
        assert raw.control_sid is not None
        for payload in payloads:
            raw.send_frame(raw.control_sid, payload)
        # A final valid request: its answer (or the close) tells the frames were handled.
        if raw.conn.is_open:
            raw.send_control(control.BroadcastCountRequest(424242, "probe"))
        stream = raw.streams[raw.control_sid]

        def answered() -> bool:
            return any(
                isinstance(m, control.ErrorReply) and m.rid == 424242
                for m in map(safe_decode, stream.messages)
            )

        await raw.wait_until(lambda: answered() or not raw.conn.is_open)
        event("closed" if not raw.conn.is_open else "answered")
        if not raw.conn.is_open:
            assert raw.conn.close_error_code == CloseCode.PROTOCOL, raw.conn.close_reason
            assert "control message" in raw.conn.close_reason
            await wait_for(lambda: "mallory" not in coord.client_ids(), DEADLINE)
        await alice_unharmed()


def safe_decode(data: bytes) -> Any:
    try:
        return control.decode(data)
    except conec_trio.ProtocolError:
        return None


# --- certificate pinning on direct channels ---------------------------------------------------


def another_cert_der(name: str) -> bytes:
    """A valid self-signed cert for ``name`` that is not the one ``name`` really uses."""
    pem, _ = _tls.ephemeral_identity(name)
    return _tls.cert_der(_tls.load_cert(pem))


async def assert_no_channel_and_proxied_fallback(
    alice: conec_trio.Client, bob: conec_trio.Client
) -> None:
    await wait_for(lambda: not alice._direct.channels and not bob._direct.channels, DEADLINE)
    with trio.fail_after(DEADLINE):
        send, _ = await alice.new_stream("bob")
        assert send.stream_id.is_proxied
        incoming = await bob.incoming_streams.receive()
        await send.send(b"via the coordinator")
        assert await incoming.recv.receive() == b"via the coordinator"


async def test_opener_refuses_a_peer_cert_other_than_the_vouched_one(coord, open_client):
    """alice is told (by a tampered grant) to expect another cert for bob: she must refuse the
    connection bob's real cert arrives on."""
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        fake = another_cert_der("bob")
        request = alice._request

        async def tampered(make: Any) -> Any:
            reply = await request(make)
            if isinstance(reply, control.ChannelGrant):
                reply = dataclasses.replace(reply, cert_der=fake)
            return reply

        alice._direct.ctx = dataclasses.replace(alice._direct.ctx, request=tampered)
        with trio.fail_after(DEADLINE), pytest.raises(ChannelError, match="certificate"):
            await alice.new_channel("bob")
        await assert_no_channel_and_proxied_fallback(alice, bob)


async def test_acceptor_refuses_an_opener_cert_other_than_the_vouched_one(coord, open_client):
    """bob is told (by a tampered offer) to expect another cert for alice: he must refuse
    her connection, and alice must not be left believing in a channel."""
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        fake = another_cert_der("alice")
        take_offer = bob._direct.offer

        def tampered(offer: control.ChannelOffer) -> None:
            take_offer(dataclasses.replace(offer, cert_der=fake))

        bob._direct.offer = tampered  # type: ignore[method-assign]
        with trio.fail_after(DEADLINE), pytest.raises(ChannelError, match="certificate"):
            await alice.new_channel("bob")
        await assert_no_channel_and_proxied_fallback(alice, bob)


# --- addresses come from authenticated packets only (hostile input, row 14) ---------------------


async def test_row14_junk_with_a_clients_connection_id_does_not_move_its_address(
    coord: conec_trio.Coordinator, open_client: Any
) -> None:
    """Datagrams that carry alice's connection id from another address, but that nobody can
    decrypt, must not make the coordinator vouch that address for her (it was her first
    candidate before) nor cost her the connection."""
    async with open_client(coord, "alice") as alice:
        session = coord._clients["alice"]
        before = session.observed_addr
        with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as spoofer:
            await spoofer.bind(("127.0.0.1", 0))
            for cid in list(session.conn.cids):
                # A short-header packet: flags, the destination connection id, junk.
                await spoofer.sendto(b"\x40" + cid + b"\x5a" * 40, coord.address)
            spoofed = spoofer.getsockname()
            # A request answered after the junk proves the coordinator has read it.
            with pytest.raises(conec_trio.BroadcastNotFoundError):
                await alice.broadcast_count("nothing")
        assert session.observed_addr == before
        assert spoofed[1] != before[1]
        assert session.candidates[0] == before
        assert session.conn.is_open


async def test_row06_a_client_that_takes_no_replies_is_not_read_beyond_a_bound(arena: Arena):
    """Hostile input, row 6: a client grants no credit on its control stream and sends
    request after request. The coordinator used to write every reply into an unbounded
    backlog (3M requests: +156 MB, 28 s of CPU); it now stops reading the client's requests
    while 64 KiB of replies to it are unacknowledged. Once the client takes its replies,
    every request is answered, in order."""
    bound = 64 * 1024 + 2 * 4096  # the coordinator's bound, one reply past it, and others'
    requests = 3000  # about 170 KB of replies
    async with open_raw_client(arena.coord.address, arena.ca, stream_window=16 * 1024) as raw:
        await raw.hello()
        sid = raw.control_sid
        assert sid is not None
        raw.withhold_credit(sid)
        raw.write(
            sid,
            b"".join(
                encode_frame(control.encode(control.BroadcastCountRequest(rid, "nonexistent")))
                for rid in range(requests)
            ),
        )
        await wait_for(lambda: arena.coord.statistics().reply_backlog > 32 * 1024, DEADLINE)
        await arena.check_unharmed()
        assert arena.coord.statistics().reply_backlog <= bound
        raw.release_credit(sid)
        for rid in range(requests):
            reply = await raw.read_control(sid)
            assert isinstance(reply, control.ErrorReply)
            assert reply.rid == rid
    await arena.check_unharmed()


# --- row 7: connections that never say hello ---------------------------------------------------


def first_initial(target: tuple[str, int]) -> bytes:
    """The first datagram of a new QUIC connection to ``target`` (an Initial, padded)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    quic = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=[control.ALPN])
    )
    quic.connect(target, now=0.0)
    return quic.datagrams_to_send(now=0.0)[0][0]


@asynccontextmanager
async def udp_from(host: str) -> AsyncIterator[trio.socket.SocketType]:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind((host, 0))
        yield sock


async def send_initials(sock: trio.socket.SocketType, target: tuple[str, int], n: int) -> None:
    for _ in range(n):
        await sock.sendto(first_initial(target), target)
        await trio.sleep(0.002)


async def test_row07_initials_from_one_address_are_capped_and_a_newcomer_gets_in(
    coord_config, client_config
):
    """Hostile input, row 7: Initials that never go on with the handshake. Each used to make
    a session and tasks (5,000: 528 MB, and a newcomer needed 10.7 s); beyond
    ``max_pending_connections_per_address`` from one address they make nothing now, and a
    newcomer from elsewhere gets in at once while the flood goes on."""
    config = coord_config(max_pending_connections_per_address=8, retry_above_pending=30)
    async with conec_trio.open_coordinator(config) as coord:
        target = coord.address
        async with udp_from("127.0.0.2") as flood, trio.open_nursery() as nursery:
            nursery.start_soon(send_initials, flood, target, 100)
            await wait_for(lambda: coord.statistics().pending_connections >= 8, DEADLINE)
            with trio.fail_after(2.0):
                await newcomer_roundtrip(client_config(coord, "newcomer"))
        # The newcomer's Initial came after the whole flood: the flood was seen by now.
        await newcomer_roundtrip(client_config(coord, "latecomer"))
        assert coord.statistics().pending_connections == 8
        assert coord.client_ids() == []


async def test_row07_pending_connections_are_capped_in_all_and_drop_at_the_hello_timeout(
    coord_config, client_config
):
    """Pending connections from many addresses together stop at ``max_pending_connections``:
    Initials beyond it make no state; the pending ones are dropped at ``hello_timeout``, and
    then a newcomer gets in."""
    config = coord_config(
        max_pending_connections=10,
        max_pending_connections_per_address=8,
        retry_above_pending=1000,
        hello_timeout=1.0,
    )
    async with conec_trio.open_coordinator(config) as coord:
        target = coord.address
        async with udp_from("127.0.0.2") as first, udp_from("127.0.0.3") as second:
            await send_initials(first, target, 8)
            await send_initials(second, target, 8)
            await wait_for(lambda: coord.statistics().pending_connections == 10, DEADLINE)
            async with udp_from("127.0.0.4") as third:
                await send_initials(third, target, 8)
                # Once every task waits, the coordinator has read all of them.
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert coord.statistics().pending_connections == 10
        # No hello comes: all are dropped at the hello timeout, and a newcomer gets in.
        await wait_for(lambda: coord.statistics().pending_connections == 0, DEADLINE)
        await newcomer_roundtrip(client_config(coord, "newcomer"))
        assert coord.client_ids() == []


async def test_row07_under_load_new_connections_must_prove_their_address(
    coord_config, client_config
):
    """Above ``retry_above_pending`` connections without a hello, a new connection gets a
    QUIC Retry and no state (so a flood with forged source addresses makes none), while a
    real client passes the Retry and gets in."""
    config = coord_config(max_pending_connections_per_address=6, retry_above_pending=6)
    async with conec_trio.open_coordinator(config) as coord:
        target = coord.address
        async with udp_from("127.0.0.2") as flood:
            await send_initials(flood, target, 6)
            await wait_for(lambda: coord.statistics().pending_connections == 6, DEADLINE)
        async with udp_from("127.0.0.3") as other:
            await send_initials(other, target, 20)
            with trio.fail_after(DEADLINE):
                while True:
                    data, _ = await other.recvfrom(65536)
                    header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                    if header.packet_type == QuicPacketType.RETRY:
                        break
        with trio.fail_after(2.0):
            await newcomer_roundtrip(client_config(coord, "newcomer"))
        assert coord.statistics().pending_connections == 6
