"""The whole stack on a simulated UDP network with NATs, loss, delay and reordering.

Every test runs on trio's ``MockClock(autojump_threshold=0)``: QUIC timers, hole punching,
the 10 s channel timeout and idle timeouts all run on simulated time, so the timing
assertions are exact and the file takes no more wall time than the CPU work. See
``conec_trio.testing`` for the network model (cone / symmetric NATs, filtering, impairments).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnectionState
from helpers import coordinator_echo, wait_for

import conec_trio
from conec_trio import _quic, certs
from conec_trio._config import DEFAULT_IDLE_TIMEOUT
from conec_trio._direct import CHANNEL_TIMEOUT
from conec_trio.testing import (
    BLOCKED,
    FILTERED,
    LOST,
    NO_MAPPING,
    TOO_BIG,
    UNROUTED,
    Datagram,
    FakeNetwork,
    FakeSocket,
    Filtering,
    NatKind,
    SpinError,
    open_fake_network,
    spin_guard,
)

COORD_IP = "192.0.2.1"
COORD_PORT = 1719
NAT_A, ALICE_IP = "198.51.100.1", "10.0.1.2"
NAT_B, BOB_IP = "203.0.113.1", "10.0.2.2"

# Upper bound of the simulated time a test may wait for anything; generous, since simulated
# seconds cost no wall time. Waits that must be fast say so with their own bound.
PATIENCE = 60.0


@pytest.fixture(scope="module")
def identity() -> tuple[bytes, bytes]:
    """The coordinator's certificate, valid for its address on the fake network."""
    return certs.self_signed_cert([COORD_IP])


def build(net: FakeNetwork, alice_nat: NatKind | None, bob_nat: NatKind | None) -> None:
    """A public coordinator; alice and bob each behind a NAT of that kind (None: public)."""
    net.add_host(COORD_IP)
    for nat_ip, host_ip, kind in ((NAT_A, ALICE_IP, alice_nat), (NAT_B, BOB_IP, bob_nat)):
        nat = net.add_nat(nat_ip, kind=kind) if kind is not None else None
        net.add_host(host_ip, behind=nat)


@asynccontextmanager
async def open_lab(
    net: FakeNetwork,
    identity: tuple[bytes, bytes],
    *,
    alice: dict[str, Any] | None = None,
    bob: dict[str, Any] | None = None,
    coord: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[conec_trio.Coordinator, conec_trio.Client, conec_trio.Client]]:
    """A coordinator and clients "alice" and "bob" on their hosts of ``net``."""
    cert, key = identity
    async with AsyncExitStack() as stack:
        coordinator = await stack.enter_async_context(
            conec_trio.open_coordinator(
                conec_trio.CoordConfig(cert, key, host=COORD_IP, port=COORD_PORT, **(coord or {}))
            )
        )
        clients = []
        for client_id, ip, overrides in (("alice", ALICE_IP, alice), ("bob", BOB_IP, bob)):
            config = conec_trio.ClientConfig(
                id=client_id,
                coord_host=COORD_IP,
                coord_port=COORD_PORT,
                ca=cert,
                **(overrides or {}),
            )
            stack.enter_context(net.on_host(ip))
            clients.append(await stack.enter_async_context(conec_trio.open_client(config)))
        yield coordinator, clients[0], clients[1]


async def send_and_collect(
    send: trio.abc.SendChannel[bytes], receiver: conec_trio.Client, messages: list[bytes]
) -> tuple[conec_trio.IncomingStream, list[bytes]]:
    """Send ``messages`` then end the stream; return what ``receiver`` got on it, in order."""
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def sender() -> None:
            for msg in messages:
                await send.send(msg)
            await send.aclose()

        nursery.start_soon(sender)
        incoming = await receiver.incoming_streams.receive()
        async for msg in incoming.recv:
            got.append(msg)
    return incoming, got


def initials(by: str, to: str) -> Callable[[Datagram], bool]:
    """Datagrams from host ``by`` to ``to`` that start with a QUIC v1 Initial packet."""

    def match(d: Datagram) -> bool:
        return (
            d.sender[0] == by
            and d.dst[0] == to
            and len(d.data) > 0
            and d.data[0] & 0x80 != 0  # long header
            and d.data[0] & 0x30 == 0  # packet type Initial (QUIC v1)
        )

    return match


# --- the fake network itself ------------------------------------------------------------------
# The tests below trust this model, so its NAT behaviour is pinned down first.


async def test_cone_nat_maps_endpoint_independently_and_filters_unsolicited() -> None:
    async with open_fake_network(0) as net:
        net.add_host("192.0.2.10")
        net.add_host("192.0.2.20")
        nat = net.add_nat(NAT_A, kind="cone")
        net.add_host(ALICE_IP, behind=nat)
        s1 = net.socket_factory(socket.AF_INET, "192.0.2.10", 7000)
        s2 = net.socket_factory(socket.AF_INET, "192.0.2.20", 7000)
        s2_other = net.socket_factory(socket.AF_INET, "192.0.2.20", 7001)
        with net.on_host(ALICE_IP):
            a = net.socket_factory(socket.AF_INET, "0.0.0.0", 0)
        assert a.getsockname()[0] == ALICE_IP

        a.sendto_nowait(b"to s1", ("192.0.2.10", 7000))
        a.sendto_nowait(b"to s2", ("192.0.2.20", 7000))
        with trio.fail_after(1):
            await s1.wait_readable()
            await s2.wait_readable()
        data1, from1 = s1.recvfrom_nowait()  # type: ignore[misc]
        data2, from2 = s2.recvfrom_nowait()  # type: ignore[misc]
        assert (data1, data2) == (b"to s1", b"to s2")
        # One public mapping for every destination, keeping the private port.
        assert from1 == from2 == (NAT_A, a.getsockname()[1])

        # A reply from a contacted (ip, port) gets in, with the right source.
        s2.sendto_nowait(b"reply", from2)
        with trio.fail_after(1):
            await a.wait_readable()
        assert a.recvfrom_nowait() == (b"reply", ("192.0.2.20", 7000))

        # Port-restricted: the same IP from another port is filtered; an unknown port has no
        # mapping; a private address is not routed from outside.
        s2_other.sendto_nowait(b"unsolicited", from2)
        s2.sendto_nowait(b"no mapping", (NAT_A, 1))
        s2.sendto_nowait(b"private", (ALICE_IP, a.getsockname()[1]))
        await wait_for(lambda: sum(net.dropped.values()) == 3, timeout=1)
        assert net.dropped == {FILTERED: 1, NO_MAPPING: 1, UNROUTED: 1}
        assert a.recvfrom_nowait() is None
        assert net.host("192.0.2.20").dropped[FILTERED] == 1


async def test_symmetric_nat_uses_a_fresh_port_per_destination() -> None:
    async with open_fake_network(0) as net:
        net.add_host("192.0.2.10")
        nat = net.add_nat(NAT_B, kind="symmetric")
        net.add_host(BOB_IP, behind=nat)
        s1 = net.socket_factory(socket.AF_INET, "192.0.2.10", 7000)
        s2 = net.socket_factory(socket.AF_INET, "192.0.2.10", 7001)
        b = net.socket_factory(socket.AF_INET, BOB_IP, 0)
        b.sendto_nowait(b"x", ("192.0.2.10", 7000))
        b.sendto_nowait(b"y", ("192.0.2.10", 7001))
        b.sendto_nowait(b"x again", ("192.0.2.10", 7000))
        with trio.fail_after(1):
            await s1.wait_readable()
            await s2.wait_readable()
        (_, p1), (_, p1_again) = s1.recvfrom_nowait(), s1.recvfrom_nowait()  # type: ignore[misc]
        _, p2 = s2.recvfrom_nowait()  # type: ignore[misc]
        assert p1 == p1_again
        assert p1 != p2
        assert p1[0] == p2[0] == NAT_B


async def receive_all(sock: FakeSocket) -> list[tuple[bytes, Any]]:
    """Every datagram that reaches ``sock`` (bounded on trio's clock: use the mock clock)."""
    got: list[tuple[bytes, Any]] = []
    with trio.move_on_after(1):
        while True:
            await sock.wait_readable()
            while (datagram := sock.recvfrom_nowait()) is not None:
                got.append(datagram)
    return got


@pytest.mark.parametrize(
    ("filtering", "same_ip_other_port", "other_ip"),
    [
        ("port-restricted", FILTERED, FILTERED),
        ("address-restricted", "in", FILTERED),
        ("open", "in", "in"),
    ],
)
async def test_nat_filtering_decides_who_gets_in_through_a_mapping(
    autojump_clock: trio.testing.MockClock,
    filtering: Filtering,
    same_ip_other_port: str,
    other_ip: str,
) -> None:
    async with open_fake_network(0) as net:
        net.add_host("192.0.2.10")
        net.add_host("192.0.2.20")
        nat = net.add_nat(NAT_A, kind="cone", filtering=filtering)
        net.add_host(ALICE_IP, behind=nat)
        contacted = net.socket_factory(socket.AF_INET, "192.0.2.10", 7000)
        other_port = net.socket_factory(socket.AF_INET, "192.0.2.10", 7001)
        stranger = net.socket_factory(socket.AF_INET, "192.0.2.20", 7000)
        alice = net.socket_factory(socket.AF_INET, ALICE_IP, 4000)
        alice.sendto_nowait(b"hello", ("192.0.2.10", 7000))
        (_, public), *_ = await receive_all(contacted)
        assert public == (NAT_A, 4000)

        contacted.sendto_nowait(b"reply", public)
        other_port.sendto_nowait(b"same ip, other port", public)
        stranger.sendto_nowait(b"other ip", public)
        stranger.sendto_nowait(b"unmapped port", (NAT_A, 4001))
        got = {data for data, _ in await receive_all(alice)}
        expected = {b"reply"}
        expected |= {b"same ip, other port"} if same_ip_other_port == "in" else set()
        expected |= {b"other ip"} if other_ip == "in" else set()
        assert got == expected
        # Even an open NAT drops what arrives at a port it never mapped.
        refused = [same_ip_other_port, other_ip].count(FILTERED)
        assert net.dropped == {NO_MAPPING: 1, **({FILTERED: refused} if refused else {})}
        assert nat.filtering == filtering


async def test_hosts_behind_one_nat_reach_each_other_without_translation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_network(0) as net:
        nat = net.add_nat(NAT_B, kind="symmetric")
        net.add_host(ALICE_IP, behind=nat)
        net.add_host("10.0.1.3", behind=nat)
        a = net.socket_factory(socket.AF_INET, ALICE_IP, 5000)
        b = net.socket_factory(socket.AF_INET, "10.0.1.3", 5000)
        a.sendto_nowait(b"next door", ("10.0.1.3", 5000))
        assert await receive_all(b) == [(b"next door", (ALICE_IP, 5000))]
        assert nat.mappings == {}


async def test_duplication_follows_the_seed_and_is_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def run(seed: int) -> list[bytes]:
        async with open_fake_network(seed, duplicate=0.25) as net:
            net.add_host("192.0.2.10")
            net.add_host("192.0.2.20")
            tx = net.socket_factory(socket.AF_INET, "192.0.2.10", 0)
            rx = net.socket_factory(socket.AF_INET, "192.0.2.20", 9)
            for i in range(200):
                tx.sendto_nowait(b"%d" % i, ("192.0.2.20", 9))
            arrived = [data for data, _ in await receive_all(rx)]
            duplicated = net.stats["duplicated"]
            assert 20 < duplicated < 80  # about a quarter
            assert net.stats == {
                "sent": 200,
                "delivered": 200 + duplicated,
                "duplicated": duplicated,
            }
            assert net.host("192.0.2.20").stats["received"] == 200 + duplicated
            assert rx.stats["received"] == len(arrived) == 200 + duplicated
            assert sorted(set(arrived), key=int) == [b"%d" % i for i in range(200)]
            return arrived

    arrived = await run(3)
    assert await run(3) == arrived
    assert await run(4) != arrived


async def test_bad_settings_are_refused_saying_what_is_wrong() -> None:
    for options, match in [
        ({"loss": 1.5}, "loss is a probability"),
        ({"duplicate": -0.1}, "duplicate is a probability"),
        ({"delay": (0.2, 0.1)}, "delay must be"),
        ({"mtu": -1}, "mtu"),
    ]:
        with pytest.raises(ValueError, match=match):
            async with open_fake_network(0, **options):
                pytest.fail("a bad setting was accepted")  # pragma: no cover
    async with open_fake_network(0) as net:
        nat = net.add_nat(NAT_A)
        with pytest.raises(ValueError, match="unknown NAT kind 'full'"):
            net.add_nat(NAT_B, kind="full")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="unknown NAT filtering"):
            net.add_nat(NAT_B, filtering="strict")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="already on the network"):
            net.add_host(NAT_A)
        with pytest.raises(ValueError, match="not an IPv4 address"):
            net.add_host("::1")
        with pytest.raises(KeyError, match=r"no host 10\.9\.9\.9"), net.on_host("10.9.9.9"):
            pytest.fail("on_host accepted a host that does not exist")  # pragma: no cover
        net.add_host(ALICE_IP, behind=nat)
        with pytest.raises(OSError, match="IPv4 only"):
            net.socket_factory(socket.AF_INET6, "::", 0)


async def test_datagrams_over_the_mtu_are_dropped() -> None:
    async with open_fake_network(0) as net:
        net.add_host("192.0.2.10")
        net.add_host("192.0.2.20")
        tx = net.socket_factory(socket.AF_INET, "192.0.2.10", 0)
        rx = net.socket_factory(socket.AF_INET, "192.0.2.20", 9)
        tx.sendto_nowait(b"x" * 1473, ("192.0.2.20", 9))
        tx.sendto_nowait(b"y" * 1472, ("192.0.2.20", 9))
        with trio.fail_after(1):
            await rx.wait_readable()
        assert rx.recvfrom_nowait() == (b"y" * 1472, ("192.0.2.10", 50_000))
        assert net.dropped == {TOO_BIG: 1}


async def test_delay_loss_and_order_follow_the_seed_and_the_trio_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def run(seed: int, reorder: float) -> tuple[list[bytes], list[float], int]:
        async with open_fake_network(seed, loss=0.3, delay=(0.010, 0.020), reorder=reorder) as net:
            net.add_host("192.0.2.10")
            net.add_host("192.0.2.20")
            tx = net.socket_factory(socket.AF_INET, "192.0.2.10", 0)
            rx = net.socket_factory(socket.AF_INET, "192.0.2.20", 9)
            start = trio.current_time()
            for i in range(200):
                tx.sendto_nowait(b"%d" % i, ("192.0.2.20", 9))
            arrived: list[bytes] = []
            times: list[float] = []
            with trio.move_on_after(1):
                while True:
                    await rx.wait_readable()
                    while (got := rx.recvfrom_nowait()) is not None:
                        arrived.append(got[0])
                        times.append(trio.current_time() - start)
            assert len(arrived) + net.dropped[LOST] == 200
            return arrived, times, net.dropped[LOST]

    arrived, times, lost = await run(seed=7, reorder=0.0)
    assert 30 < lost < 90  # about 30 %
    assert all(0.010 <= t <= 0.020 for t in times)
    assert arrived == sorted(arrived, key=int)  # first in, first out without reordering
    # The same seed gives the same losses; another seed other ones.
    assert (await run(seed=7, reorder=0.0))[0] == arrived
    assert (await run(seed=8, reorder=0.0))[0] != arrived
    reordered, _, _ = await run(seed=7, reorder=0.2)
    assert reordered != sorted(reordered, key=int)


def current_socket_factory() -> _quic.SocketFactory:
    factory = _quic.set_socket_factory(None)
    _quic.set_socket_factory(factory)
    return factory


async def test_fake_network_installs_and_restores_the_socket_factory() -> None:
    before = current_socket_factory()

    async def failing_block() -> None:
        async with open_fake_network(0) as net:
            assert current_socket_factory() == net.socket_factory
            net.add_host("192.0.2.10")
            sock = _quic.make_udp_socket(socket.AF_INET, "192.0.2.10", 0)
            assert sock.getsockname() == ("192.0.2.10", 50_000)
            with pytest.raises(OSError, match="on_host"):
                _quic.make_udp_socket(socket.AF_INET, "0.0.0.0", 0)
            raise KeyError("the block failed")

    with pytest.raises(KeyError):  # as it is, not wrapped in an exception group
        await failing_block()
    assert current_socket_factory() is before


async def test_spin_guard_turns_a_busy_loop_into_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def busy() -> None:
        while True:
            # A checkpoint, but never a wait: the mock clock stands still.
            await trio.lowlevel.checkpoint()

    async def guarded() -> None:
        async with spin_guard(0.1), trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            await trio.sleep(1)

    with pytest.raises(SpinError, match="busy"):
        await guarded()


# --- the library on the fake network -------------------------------------------------------------


async def test_proxied_stream_on_the_fake_network(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with open_fake_network(0) as net:
        build(net, None, None)
        async with open_lab(net, identity) as (coord, alice, bob):
            assert coord.address == (COORD_IP, COORD_PORT)
            assert coord.num_clients == 2
            with trio.fail_after(PATIENCE):
                send, recv = await alice.new_proxied_stream("bob")
                incoming, got = await send_and_collect(send, bob, [b"hello", b"", b"x" * 5000])
                assert send.stream_id.is_proxied
                assert (incoming.peer, incoming.stream_id) == ("alice", send.stream_id)
                assert got == [b"hello", b"", b"x" * 5000]
                await incoming.send.send(b"back")
                assert await recv.receive() == b"back"
        # It all went over the simulated network: the coordinator's host relayed it.
        assert net.host(COORD_IP).stats["received"] > 0
        assert net.sent(by=ALICE_IP, to=BOB_IP) == 0


async def test_leaving_the_blocks_closes_every_socket(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with open_fake_network(0) as net:
        build(net, "cone", "cone")
        async with open_lab(net, identity):
            assert {s.host.ip for s in net.open_sockets()} == {COORD_IP, ALICE_IP, BOB_IP}
            sockets = net.open_sockets()
        assert net.open_sockets() == []
        assert all(s.closed for s in sockets)


async def test_cone_nats_direct_channel_is_opened_by_hole_punching(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with open_fake_network(0) as net:
        build(net, "cone", "cone")
        async with open_lab(net, identity) as (_, alice, bob):
            with trio.fail_after(CHANNEL_TIMEOUT):
                await alice.new_channel("bob")
            # bob's NAT let alice's packets in (the case without punching below shows it
            # does not on its own).
            assert net.host(BOB_IP).received_from[NAT_A] > 0
            with trio.fail_after(PATIENCE):
                send, recv = await alice.new_direct_stream("bob")
                before = net.sent_bytes(by=ALICE_IP, to=NAT_B)
                messages = [b"direct %d" % i for i in range(20)] + [b"y" * 100_000]
                incoming, got = await send_and_collect(send, bob, messages)
                assert got == messages
                assert send.stream_id.is_direct
                assert incoming.stream_id == send.stream_id
                await incoming.send.send(b"back")
                assert await recv.receive() == b"back"
            # The 100 kB went straight to bob's NAT, not through the coordinator, in
            # datagrams the path carries (1472 bytes at most here).
            assert net.sent_bytes(by=ALICE_IP, to=NAT_B) - before >= 100_000


async def test_cone_nats_without_hole_punching_cannot_connect(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with open_fake_network(0) as net:
        build(net, "cone", "cone")
        async with open_lab(
            net, identity, alice={"holepunch": False}, bob={"holepunch": False}
        ) as (_, alice, _bob):
            start = trio.current_time()
            with trio.fail_after(CHANNEL_TIMEOUT + 5), pytest.raises(conec_trio.ChannelError):
                await alice.new_channel("bob")
            elapsed = trio.current_time() - start
            assert CHANNEL_TIMEOUT <= elapsed <= CHANNEL_TIMEOUT + 2
            # alice's handshake reached bob's NAT and was filtered: nothing of it got in.
            assert net.sent(where=initials(ALICE_IP, NAT_B)) > 0
            assert net.host(ALICE_IP).dropped[FILTERED] > 0
            assert net.host(BOB_IP).received_from[NAT_A] == 0


@pytest.mark.parametrize("symmetric", ["opener", "acceptor"])
async def test_symmetric_nat_falls_back_to_proxied(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes], symmetric: str
) -> None:
    async with open_fake_network(0) as net:
        if symmetric == "opener":
            build(net, "symmetric", "cone")
        else:
            build(net, "cone", "symmetric")
        async with open_lab(net, identity) as (_, alice, bob):
            # new_stream gives a direct channel its head start, then goes through the
            # coordinator while the channel is attempted in the background.
            start = trio.current_time()
            send, recv = await alice.new_stream("bob")
            assert trio.current_time() - start <= alice.config.direct_head_start + 0.1
            assert send.stream_id.is_proxied
            with trio.fail_after(PATIENCE):
                incoming, got = await send_and_collect(send, bob, [b"via coordinator"])
                assert got == [b"via coordinator"]
                assert incoming.stream_id.is_proxied
                await incoming.send.send(b"back")
                assert await recv.receive() == b"back"

            with (
                trio.fail_after(CHANNEL_TIMEOUT + 5),
                pytest.raises(conec_trio.ChannelError, match="'bob'"),
            ):
                await alice.new_channel("bob")
            # The symmetric NAT did map the punches to other ports than the coordinator saw.
            nat = net.nats[NAT_A if symmetric == "opener" else NAT_B]
            assert len(nat.mappings) > 1


# Not strict: the loss-timer spin depends on float rounding of RTT samples, so it shows in
# some runs only (how trio interleaves tasks changes which packets are lost).
async def test_cone_nats_connect_through_loss_delay_and_reordering(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    # At 20 % loss each way, QUIC's exponential probe backoff can outlast the default 10 s
    # idle timeout now and then; this test is about punching and ordering, not that race.
    patient = {"idle_timeout": 30.0}

    async def run(seed: int, **impairments: Any) -> int:
        """Open a channel and check a direct stream; return alice's Initial datagrams."""
        async with open_fake_network(seed, **impairments) as net:
            build(net, "cone", "cone")
            async with open_lab(net, identity, alice=patient, bob=patient, coord=patient) as (
                _,
                alice,
                bob,
            ):
                with trio.fail_after(CHANNEL_TIMEOUT):
                    await alice.new_channel("bob")
                handshake = net.sent(where=initials(ALICE_IP, NAT_B))
                with trio.fail_after(PATIENCE):
                    send, _ = await alice.new_direct_stream("bob")
                    messages = [bytes([i]) * (i * 997 % 3_000) for i in range(40)]
                    _, got = await send_and_collect(send, bob, messages)
                assert got == messages, f"seed {seed}: messages lost, damaged or out of order"
                if impairments:
                    assert net.dropped[LOST] > 0
                return handshake

    baseline = await run(0)
    assert baseline > 0
    lossy = [
        await run(seed, loss=0.2, delay=(0.005, 0.050), reorder=0.1, duplicate=0.02)
        for seed in range(5)
    ]
    # Lost handshake packets were sent again (QUIC's Initial retransmission is the retry).
    assert min(lossy) >= baseline
    assert sum(lossy) > 5 * baseline, (baseline, lossy)


async def test_unreachable_peer_fails_after_the_channel_timeout(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with open_fake_network(0) as net:
        build(net, "cone", "cone")
        net.block(NAT_A, NAT_B)
        async with open_lab(net, identity) as (_, alice, _bob):
            start = trio.current_time()
            with (
                trio.fail_after(CHANNEL_TIMEOUT + 5),
                pytest.raises(conec_trio.ChannelError, match="'bob'"),
            ):
                await alice.new_channel("bob")
            elapsed = trio.current_time() - start
            assert CHANNEL_TIMEOUT <= elapsed <= CHANNEL_TIMEOUT + 2
            assert net.dropped[BLOCKED] > 0


async def test_silent_client_is_dropped_after_its_idle_timeout(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    idle = 2.0
    async with open_fake_network(0) as net:
        build(net, None, None)
        async with open_lab(
            net,
            identity,
            alice={"idle_timeout": idle, "reconnect": False},  # the loss is final
            bob={"idle_timeout": idle},
        ) as (coord, alice, _bob):
            assert coord.client_ids() == ["alice", "bob"]
            net.block(ALICE_IP)  # alice vanishes: nothing gets in or out any more
            start = trio.current_time()
            await wait_for(lambda: coord.num_clients == 1, timeout=PATIENCE)
            gone = trio.current_time()
            last_heard = max(
                d.sent_at for d in net.sent_log if d.sender[0] == ALICE_IP and d.sent_at <= start
            )
            # Dropped one idle timeout after alice's last packet, not before, not much later.
            assert gone - last_heard >= idle - 1e-6
            assert gone - start <= idle + 1
            assert coord.client_ids() == ["bob"]
            # alice's side notices too: its incoming streams break, its calls fail.
            with trio.fail_after(PATIENCE), pytest.raises(trio.BrokenResourceError):
                await alice.incoming_streams.receive()
            with pytest.raises(conec_trio.ConecError):
                await alice.new_proxied_stream(None)
            # bob, idle just as long but with keepalive, stays connected.
            await trio.sleep(5 * idle)
            assert coord.client_ids() == ["bob"]


# --- idle clients -------------------------------------------------------------------------------
# What an idle client costs is what a coordinator with many of them pays: the traffic of the
# keepalives and the state kept per connection. Both must stay flat however long it idles.

ONE_WAY = 0.01  # link delay in these tests


async def test_idle_client_costs_one_datagram_each_way_per_keepalive(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net:
        build(net, None, None)
        async with open_lab(net, identity) as (coord, _alice, _bob):
            await trio.sleep(30)  # handshake, path MTU probing and the hellos are long over
            start = len(net.sent_log)
            window = 120.0
            await trio.sleep(window)
            idle = net.sent_log[start:]
            pings = [d for d in idle if d.sender[0] == ALICE_IP and d.dst[0] == COORD_IP]
            acks = [d for d in idle if d.sender[0] == COORD_IP and d.dst[0] == ALICE_IP]
            timeout = DEFAULT_IDLE_TIMEOUT
            # At least one keepalive per idle timeout (else the client would be dropped), and
            # no more than one per third of it.
            assert window / timeout <= len(pings) <= window / (timeout / 3) + 1
            # Each answered by one datagram, sent the moment the keepalive arrived (no ack
            # delay, which would cost the coordinator a second wakeup per keepalive).
            assert len(acks) == len(pings)
            for ping, ack in zip(pings, acks, strict=True):
                assert ack.sent_at == pytest.approx(ping.sent_at + ONE_WAY, abs=1e-6)
            assert coord.client_ids() == ["alice", "bob"]


async def test_idle_connections_keep_no_growing_state(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net:
        build(net, None, None)
        async with open_lab(net, identity) as (coord, alice, bob):
            await trio.sleep(30)
            sides = {
                "coordinator": coord._clients["alice"].conn.quic,
                "client": alice._link.conn.quic,  # type: ignore[union-attr]
            }
            for side, quic in sides.items():
                # The handshake's buffers are gone once it is over.
                buffers = quic._crypto_buffers.values()
                assert sum(b.capacity for b in buffers) <= 4096, side
            await trio.sleep(600)  # ten minutes of keepalives
            for side, quic in sides.items():
                # aioquic keeps each sent packet until it is acknowledged; a peer never
                # acknowledges packets that carry nothing but ACKs, so those must not pile up.
                sent = quic._spaces[tls.Epoch.ONE_RTT].sent_packets
                assert len(sent) <= 2, f"{side} keeps {len(sent)} sent packets"
            # ... and the connections still carry streams.
            send, _recv = await alice.new_proxied_stream("bob")
            await send.send(b"still here")
            incoming = await bob.incoming_streams.receive()
            assert await incoming.recv.receive() == b"still here"


# --- the QUIC driver under the mock clock ------------------------------------------------------
# The driver must wait for something in the future every time round its loop. A driver that
# wakes up again at the same instant burns a CPU on a real clock and hangs under MockClock,
# where time only moves when every task waits. A scripted aioquic connection makes each
# trigger exact.


class _ScriptedQuic(_quic.FlowControlledConnection):
    """The library's aioquic connection with its timer, PINGs and output scripted."""

    def __init__(self, timer: float | None) -> None:
        super().__init__(
            configuration=QuicConfiguration(is_client=True),
            request_client_certificate=False,
            stream_window=1 << 20,
            connection_window=1 << 20,
            max_streams=10,
        )
        self._state = QuicConnectionState.CONNECTED
        self.timer = timer
        self.timer_handled: list[float] = []
        self.pings: list[float] = []

    def get_timer(self) -> float | None:
        return self.timer

    def handle_timer(self, now: float) -> None:
        # The timer stays where it was, as aioquic's loss timer can when float rounding
        # makes _detect_loss find nothing lost at exactly the loss time.
        self.timer_handled.append(now)

    def send_ping(self, uid: int) -> None:
        self.pings.append(trio.current_time())

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        return []  # nothing can leave (say, the congestion window is full)


class _StubEndpoint:
    def __init__(self) -> None:
        self.urgent: dict[_quic.QuicConn, None] = {}

    def forget(self, conn: _quic.QuicConn) -> None:
        pass


async def drive_for(conn: _quic.QuicConn, seconds: float) -> None:
    async with spin_guard(), trio.open_nursery() as nursery:
        nursery.start_soon(conn.drive)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_driver_waits_when_a_handled_timer_stays_put(
    autojump_clock: trio.testing.MockClock,
) -> None:
    quic = _ScriptedQuic(timer=trio.current_time() + 0.5)
    conn = _quic.QuicConn(_StubEndpoint(), quic, ("192.0.2.9", 1), keepalive_interval=None)  # type: ignore[arg-type]
    await drive_for(conn, 1.0)
    # Handled again once the clock has moved on (a later `now` lets aioquic see the loss),
    # never twice at one instant.
    assert len(quic.timer_handled) >= 2
    assert len(set(quic.timer_handled)) == len(quic.timer_handled)


@pytest.mark.parametrize("handshake_done", [False, True], ids=["handshaking", "ping-cannot-leave"])
async def test_driver_keepalive_waits_for_its_interval(
    autojump_clock: trio.testing.MockClock, handshake_done: bool
) -> None:
    quic = _ScriptedQuic(timer=None)
    conn = _quic.QuicConn(_StubEndpoint(), quic, ("192.0.2.9", 1), keepalive_interval=1.0)  # type: ignore[arg-type]
    if handshake_done:
        conn.handshake_complete.set()
    await drive_for(conn, 3.5)
    if handshake_done:
        # One PING per interval, even though none of them could be sent yet.
        assert 1 <= len(quic.pings) <= 4
        assert len(set(quic.pings)) == len(quic.pings)
    else:
        assert quic.pings == []  # nothing to keep alive before the handshake


async def test_a_lost_request_sent_from_the_writers_task_is_retransmitted_promptly(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    # A request and its reply leave from the tasks that write them, while the connections'
    # drivers stay parked; the driver must still wake for the loss timer of what was sent,
    # not only at its next keepalive.
    async with open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net:
        build(net, None, None)
        async with open_lab(net, identity) as (coord, alice, _bob):
            with trio.fail_after(PATIENCE):
                async with coordinator_echo(alice, coord) as (send, recv):
                    for i in range(5):
                        await send.send(b"warm-up %d" % i)
                        assert await recv.receive() == b"warm-up %d" % i
                    await trio.sleep(1.0)  # every driver is parked with nothing to do
                    dropped: list[Datagram] = []

                    def drop_next_request(d: Datagram) -> bool:
                        if not dropped and d.sender[0] == ALICE_IP and d.dst[0] == COORD_IP:
                            dropped.append(d)
                            return True
                        return False

                    net.add_filter(drop_next_request)
                    start = trio.current_time()
                    await send.send(b"request")
                    assert await recv.receive() == b"request"
                    elapsed = trio.current_time() - start
            assert dropped, "the request was not dropped"
            # One probe timeout (a few round trips), far below the keepalive interval.
            assert elapsed < 1.0, f"the lost request took {elapsed:.2f} s to be answered"
