"""Paths: new_stream never waits out a hole punch, proxied streams move onto the direct
channel once it is up, failures are remembered with a growing back-off, and ping.

Most tests run on the fake network under ``MockClock(autojump_threshold=0)``, so timings are
exact simulated seconds; the bulk transfer runs on real loopback sockets.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from helpers import wait_for

import conec_trio
from conec_trio import Path, certs
from conec_trio.testing import FakeNetwork, NatKind, open_fake_network

COORD_IP, COORD_PORT = "192.0.2.1", 1719
NAT_A, ALICE_IP = "198.51.100.1", "10.0.1.2"
NAT_B, BOB_IP = "203.0.113.1", "10.0.2.2"
# One way between a host and the coordinator, or between the two NATs, on the fake network.
ONE_WAY = 0.02
PATIENCE = 60.0
HEAD_START = 0.3


@pytest.fixture(scope="module")
def identity() -> tuple[bytes, bytes]:
    return certs.self_signed_cert([COORD_IP])


@asynccontextmanager
async def open_lab(
    net: FakeNetwork,
    identity: tuple[bytes, bytes],
    alice_nat: NatKind,
    bob_nat: NatKind,
    coord: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[conec_trio.Client, conec_trio.Client]]:
    """A public coordinator; alice and bob behind NATs of those kinds."""
    net.add_host(COORD_IP)
    net.add_host(ALICE_IP, behind=net.add_nat(NAT_A, kind=alice_nat))
    net.add_host(BOB_IP, behind=net.add_nat(NAT_B, kind=bob_nat))
    cert, key = identity
    async with AsyncExitStack() as stack:
        with net.on_host(COORD_IP):
            await stack.enter_async_context(
                conec_trio.open_coordinator(
                    conec_trio.CoordConfig(
                        cert, key, host=COORD_IP, port=COORD_PORT, **(coord or {})
                    )
                )
            )
        clients = []
        for name, ip in (("alice", ALICE_IP), ("bob", BOB_IP)):
            config = conec_trio.ClientConfig(
                id=name, coord_host=COORD_IP, coord_port=COORD_PORT, ca=cert, **overrides
            )
            with net.on_host(ip):
                clients.append(await stack.enter_async_context(conec_trio.open_client(config)))
        yield clients[0], clients[1]


def numbered(who: bytes, i: int) -> bytes:
    return b"%s %d " % (who, i) + bytes([i % 251]) * (i * 613 % 3000)


async def exchange_across_move(
    alice: conec_trio.Client, bob: conec_trio.Client, count: int
) -> tuple[conec_trio.MessageSendChannel, conec_trio.IncomingStream]:
    """Open a stream with new_stream and send ``count`` numbered messages each way while it
    moves; check that each side got all of them once and in order. alice's grant for the
    channel is held back until the stream is open, so that it starts proxied however fast
    the channel would open (it can win the race with the proxied stream's own setup)."""
    ctx = alice._direct.ctx
    opened = trio.Event()

    async def grant_once_opened(make: Any) -> Any:
        reply = await ctx.request(make)
        await opened.wait()
        return reply

    alice._direct.ctx = dataclasses.replace(ctx, request=grant_once_opened)
    try:
        send, recv = await alice.new_stream("bob")
    finally:
        opened.set()
        alice._direct.ctx = ctx
    assert send.path is Path.PROXIED
    assert recv.path is Path.PROXIED
    incoming = await bob.incoming_streams.receive()
    assert incoming.stream_id == send.stream_id

    sent: dict[bytes, int] = {}

    async def sender(channel: conec_trio.MessageSendChannel, who: bytes) -> None:
        # Messages keep flowing until this direction moved, and for ``count`` more.
        i = 0
        moved_at = None
        while moved_at is None or i < moved_at + count:
            await channel.send(numbered(who, i))
            i += 1
            if i % 5 == 0:
                await trio.sleep(0.01)
            if moved_at is None and channel.path is Path.DIRECT:
                moved_at = i
        sent[who] = i
        await channel.aclose()

    async def receiver(channel: trio.abc.ReceiveChannel[bytes], who: bytes) -> None:
        got = [msg async for msg in channel]
        assert got == [numbered(who, i) for i in range(sent[who])]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, send, b"alice")
        nursery.start_soon(sender, incoming.send, b"bob")  # type: ignore[arg-type]
        nursery.start_soon(receiver, incoming.recv, b"alice")
        nursery.start_soon(receiver, recv, b"bob")
    return send, incoming


async def test_symmetric_nat_new_stream_returns_after_the_head_start(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, identity, "symmetric", "cone") as (alice, bob),
    ):
        start = trio.current_time()
        send, recv = await alice.new_stream("bob")
        # The head start, then one round trip to the coordinator to open the stream.
        assert trio.current_time() - start <= HEAD_START + 2 * ONE_WAY + 0.01
        assert send.stream_id.is_proxied
        assert send.path is Path.PROXIED
        assert recv.path is Path.PROXIED
        await send.send(b"at once")
        incoming = await bob.incoming_streams.receive()
        assert await incoming.recv.receive() == b"at once"
        assert incoming.send.path is Path.PROXIED  # type: ignore[attr-defined]
        # The attempt fails in the background; the stream keeps working meanwhile, and
        # stays proxied.
        with trio.fail_after(PATIENCE):
            await trio.sleep(11)  # the 10 s channel timeout, not yet the back-off
        await incoming.send.send(b"still here")
        assert await recv.receive() == b"still here"
        assert send.path is Path.PROXIED
        assert "bob" not in alice.statistics().channels
        # Why is public: the attempt's error, naming the peer and the likely cause.
        why = alice.statistics().direct_failures["bob"]
        assert "'bob'" in why
        assert "symmetric NAT" in why
        # A failure is remembered: the next new_stream does not wait the head start again.
        start = trio.current_time()
        await alice.new_stream("bob")
        assert trio.current_time() - start <= 2 * ONE_WAY + 0.01


async def test_cone_nats_with_no_head_start_go_proxied_then_move(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, identity, "cone", "cone", direct_head_start=0) as (alice, bob),
    ):
        with trio.fail_after(PATIENCE):
            send, incoming = await exchange_across_move(alice, bob, 200)
        # Both ends on both sides moved, and kept their proxied id.
        assert send.path is Path.DIRECT
        assert incoming.recv.path is Path.DIRECT  # type: ignore[attr-defined]
        assert send.stream_id == incoming.stream_id == conec_trio.StreamId.proxied(0)
        assert "bob" in alice.statistics().channels
        # Later streams are direct from the start.
        send2, _ = await alice.new_stream("bob")
        assert send2.stream_id.is_direct
        assert send2.path is Path.DIRECT


async def test_streams_on_a_good_link_are_direct_from_the_start(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(0, delay=(0.002, 0.002)) as net,
        open_lab(net, identity, "cone", "cone") as (alice, _bob),
    ):
        start = trio.current_time()
        send, _ = await alice.new_stream("bob")
        assert trio.current_time() - start < HEAD_START
        assert send.stream_id.is_direct
        assert send.path is Path.DIRECT


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_move_under_loss_reordering_and_duplication(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes], seed: int
) -> None:
    impairments: dict[str, Any] = {
        "loss": 0.1 + 0.02 * seed,
        "reorder": 0.1,
        "duplicate": 0.05,
        "delay": (0.005, 0.040),
    }
    async with (
        open_fake_network(seed, **impairments) as net,
        # At 20% loss QUIC's probe backoff can outlast the default 10 s idle timeout now
        # and then (as in test_fakenet): this test is about the move, not that race.
        open_lab(
            net,
            identity,
            "cone",
            "cone",
            coord={"idle_timeout": 30.0},
            direct_head_start=0,
            idle_timeout=30.0,
        ) as (
            alice,
            bob,
        ),
    ):
        with trio.fail_after(PATIENCE * 3):
            send, incoming = await exchange_across_move(alice, bob, 150)
        assert send.path is Path.DIRECT, f"seed {seed}: the stream did not move"
        assert incoming.recv.path is Path.DIRECT  # type: ignore[attr-defined]
        assert net.dropped["lost"] > 0


async def flood_stalled(send: conec_trio.MessageSendChannel, size: int) -> int:
    """Send numbered messages to a receiver that reads nothing until the sender is held
    back; how many went."""
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:
            await send.send(sent.to_bytes(4, "big") + bytes(size - 4))
            sent += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await trio.sleep(5)  # simulated: far longer than filling every window takes
        nursery.cancel_scope.cancel()
    return sent


async def test_move_while_the_receiver_is_stalled_keeps_memory_bounded(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    window = 64 * 1024
    size = 1024
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(
            net,
            identity,
            "cone",
            "cone",
            coord={"stream_window": window},
            direct_head_start=0,
            stream_window=window,
        ) as (alice, bob),
    ):
        # What a stalled proxied stream holds, before any channel is up.
        send, _ = await alice.new_proxied_stream("bob")
        proxied_only = await flood_stalled(send, size)
        assert proxied_only * size > window
        # A movable stream that moves while its receiver reads nothing.
        send, _ = await alice.new_stream("bob")
        assert send.path is Path.PROXIED
        moved = await flood_stalled(send, size)
        assert send.path is Path.DIRECT
        # What a stalled direct stream holds.
        dsend, _ = await alice.new_direct_stream("bob")
        direct_only = await flood_stalled(dsend, size)
        # Both paths were filled, and no more than each holds on its own.
        assert proxied_only < moved <= proxied_only + direct_only + 1
        incoming = [await bob.incoming_streams.receive() for _ in range(3)]
        movable = next(i for i in incoming if i.stream_id == send.stream_id)
        for i in range(moved):
            msg = await movable.recv.receive()
            assert int.from_bytes(msg[:4], "big") == i
        assert movable.recv.path is Path.DIRECT  # type: ignore[attr-defined]


async def test_ping_over_each_path_and_not_to_the_application(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, identity, "cone", "cone") as (alice, bob),
    ):
        result = await alice.ping("bob")
        assert result.path is Path.PROXIED
        assert result.rtt == pytest.approx(4 * ONE_WAY, abs=0.01)  # via the coordinator
        await alice.new_channel("bob")
        result = await bob.ping("ALICE")
        assert result.path is Path.DIRECT
        assert result.rtt == pytest.approx(2 * ONE_WAY, abs=0.01)
        with pytest.raises(conec_trio.PeerNotFoundError):
            await alice.ping("carol")
        for client in (alice, bob):
            with trio.move_on_after(5):
                incoming = await client.incoming_streams.receive()
                pytest.fail(f"a ping reached {client.id}'s application: {incoming}")


async def test_closing_the_channel_breaks_a_moved_stream(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, identity, "cone", "cone", direct_head_start=0) as (alice, bob),
    ):
        _send, recv = await alice.new_stream("bob")
        incoming = await bob.incoming_streams.receive()
        await wait_for(lambda: incoming.send.path is Path.DIRECT, PATIENCE)  # type: ignore[attr-defined]
        await incoming.send.send(b"moved")
        assert await recv.receive() == b"moved"
        assert recv.path is Path.DIRECT
        await alice.close_channel("bob")
        with pytest.raises(trio.BrokenResourceError):
            await recv.receive()
        with pytest.raises(trio.BrokenResourceError):
            await incoming.recv.receive()


async def test_proxied_and_direct_streams_do_not_move(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, identity, "cone", "cone") as (alice, bob),
    ):
        send, recv = await alice.new_proxied_stream("bob")
        incoming = await bob.incoming_streams.receive()
        await alice.new_channel("bob")
        await send.send(b"one")
        assert await incoming.recv.receive() == b"one"
        await incoming.send.send(b"two")
        assert await recv.receive() == b"two"
        assert send.path is Path.PROXIED
        assert recv.path is Path.PROXIED
        assert incoming.recv.path is Path.PROXIED  # type: ignore[attr-defined]
        dsend, drecv = await alice.new_direct_stream("bob")
        assert dsend.path is Path.DIRECT
        assert drecv.path is Path.DIRECT


async def test_a_nat_that_lets_punches_through_later_gets_a_direct_path(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, identity, "cone", "cone", holepunch=False) as (alice, bob),
    ):
        # Without punching, two port-restricted cone NATs keep each other out.
        send, recv = await alice.new_stream("bob")
        assert send.path is Path.PROXIED
        incoming = await bob.incoming_streams.receive()
        start = trio.current_time()
        await trio.sleep(30)
        assert send.path is Path.PROXIED
        # Now bob's NAT lets anyone in: a background attempt finds the direct path, with no
        # call from either application, and the stream in use moves onto it.
        net.nats[NAT_B].filtering = "open"
        net.nats[NAT_A].filtering = "open"
        assert "bob" in alice.statistics().direct_failures
        await wait_for(lambda: send.path is Path.DIRECT, 600)
        assert alice.statistics().direct_failures == {}
        # The attempts backed off: not one every few seconds.
        assert trio.current_time() - start > 30
        await send.send(b"direct now")
        assert await incoming.recv.receive() == b"direct now"
        await incoming.send.send(b"and back")
        assert await recv.receive() == b"and back"


async def test_a_peer_that_does_not_listen_is_reached_through_the_coordinator(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, identity, "cone", "cone", listen=False) as (alice, _bob),
    ):
        assert alice.statistics().direct_failures == {}
        start = trio.current_time()
        send, _ = await alice.new_stream("bob")
        # The coordinator says no at once: no need to wait out the head start.
        assert trio.current_time() - start < HEAD_START
        assert send.path is Path.PROXIED
        assert "does not accept direct channels" in alice.statistics().direct_failures["bob"]


async def test_bulk_transfer_that_moves_midway_arrives_intact(
    conec_coordinator: conec_trio.Coordinator, conec_client: Any
) -> None:
    alice = await conec_client("alice", direct_head_start=0)
    bob = await conec_client("bob")
    chunk = 64 * 1024
    total = 24 * 1024 * 1024
    data = bytes(range(256)) * (total // 256)
    send, _recv = await alice.new_stream("bob")
    assert send.path is Path.PROXIED
    incoming = await bob.incoming_streams.receive()
    paths = set()

    async def sender() -> None:
        for offset in range(0, total, chunk):
            paths.add(send.path)
            await send.send(data[offset : offset + chunk])
        await send.aclose()

    digest = hashlib.sha256()
    received = 0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            async for msg in incoming.recv:
                digest.update(msg)
                received += len(msg)
    assert received == total
    assert digest.digest() == hashlib.sha256(data).digest()
    assert paths == {Path.PROXIED, Path.DIRECT}
    assert incoming.recv.path is Path.DIRECT  # type: ignore[attr-defined]


async def test_a_moved_marker_on_a_stream_that_cannot_move_breaks_it(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    from conec_trio._wire.framing import MOVED_MARKER

    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, identity, "cone", "cone") as (alice, bob),
    ):
        send, _ = await alice.new_proxied_stream("bob")
        await send.send(b"before")
        send._st.write(MOVED_MARKER, end=True)  # a peer that breaks the rules
        incoming = await bob.incoming_streams.receive()
        assert await incoming.recv.receive() == b"before"
        with pytest.raises(trio.BrokenResourceError) as info:
            await incoming.recv.receive()
        assert isinstance(info.value.__cause__, conec_trio.ProtocolError)


async def test_a_peer_not_there_yet_is_not_held_against_the_direct_path(
    conec_coordinator: conec_trio.Coordinator, conec_client: Any
) -> None:
    # A channel attempt to a peer that has not connected yet fails for that reason only: it
    # must not delay the direct path once the peer is there (the head start is long here so
    # a loaded machine cannot make the channel lose the race).
    alice = await conec_client("alice", direct_head_start=10.0)
    with trio.fail_after(5), pytest.raises(conec_trio.PeerNotFoundError):
        await alice.new_stream("bob")
    await conec_client("bob")
    with trio.fail_after(15):
        send, recv = await alice.new_stream("bob")
    assert send.path is Path.DIRECT
    assert recv.path is Path.DIRECT
