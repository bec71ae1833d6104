"""Resource limits of CoordConfig / ClientConfig: what each one does when reached, on real
sockets. A limit either refuses with a clear error or makes the extra work wait; it never
crashes anyone, never disturbs other clients, and waiting work goes on once there is room.

(``max_broadcasts`` is covered in test_broadcast.py, exact-maximum messages and refused
oversized sends in test_stream_semantics.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from helpers import ClientFactory, wait_for

import conec_trio
from conec_trio import BroadcastNotFoundError, IncomingStream, RefusedError

DEADLINE = 10.0  # seconds: every wait is bounded by it
KIB = 1024
SMALL_MAX = 64 * KIB

CoordConfigFactory = Callable[..., conec_trio.CoordConfig]


def pattern(i: int, size: int) -> bytes:
    return bytes([i % 251]) * size


async def roundtrip(opener: conec_trio.Client, acceptor: conec_trio.Client) -> None:
    """A new proxied stream from ``opener`` to ``acceptor`` carries a message each way."""
    with trio.fail_after(DEADLINE):
        send, recv = await opener.new_proxied_stream(acceptor.id)
        incoming = await acceptor.incoming_streams.receive()
        await send.send(b"ping")
        assert await incoming.recv.receive() == b"ping"
        await incoming.send.send(b"pong")
        assert await recv.receive() == b"pong"
        await send.aclose()
        await incoming.send.aclose()


async def send_until_broken(send: trio.abc.SendChannel[bytes]) -> None:
    """Send small messages until the stream reports it broke (the caller bounds the time)."""
    while True:
        await send.send(b"more")
        await trio.sleep(0.005)


async def receive_until_broken(recv: trio.abc.ReceiveChannel[Any]) -> None:
    """Receive until the stream reports it broke (the caller bounds the time)."""
    while True:
        await recv.receive()


# --- max_clients -----------------------------------------------------------------------------


async def test_max_clients_refuses_the_next_one_naming_the_limit(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    async with (
        conec_trio.open_coordinator(coord_config(max_clients=2)) as coord,
        open_client(coord, "alice") as alice,
    ):
        async with open_client(coord, "bob") as bob:
            with trio.fail_after(DEADLINE), pytest.raises(RefusedError) as info:
                async with open_client(coord, "carol"):
                    pytest.fail("a third client got in")  # pragma: no cover
            assert "maximum of 2 clients" in str(info.value)
            assert coord.client_ids() == ["alice", "bob"]
            # The first two keep working.
            await roundtrip(alice, bob)
            await roundtrip(bob, alice)
        # Room again once one leaves; the refused id was never taken.
        await wait_for(lambda: coord.num_clients == 1, DEADLINE)
        async with open_client(coord, "carol") as carol:
            await roundtrip(carol, alice)


# --- max_message_size --------------------------------------------------------------------------


async def test_relay_does_not_apply_the_coordinators_maximum(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    """The relay passes bytes on without parsing frames: between two clients, only their own
    maximum counts, even when the coordinator's is smaller."""
    big = pattern(7, 4 * SMALL_MAX)
    async with (
        conec_trio.open_coordinator(coord_config(max_message_size=SMALL_MAX)) as coord,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        with trio.fail_after(DEADLINE):
            send, recv = await alice.new_proxied_stream("bob")
            incoming = await bob.incoming_streams.receive()
            await send.send(big)
            assert await incoming.recv.receive() == big
            await incoming.send.send(big)
            assert await recv.receive() == big


async def test_message_over_the_receivers_maximum_breaks_only_that_stream(
    coord: conec_trio.Coordinator, open_client: ClientFactory
):
    """alice allows 16 MiB, bob only 64 KiB: a 100 KiB message from alice breaks that stream
    at bob's end (saying why), and alice's end after it; both stay connected."""
    async with (
        open_client(coord, "alice") as alice,
        open_client(coord, "bob", max_message_size=SMALL_MAX) as bob,
    ):
        with trio.fail_after(DEADLINE):
            send, _ = await alice.new_proxied_stream("bob")
            incoming = await bob.incoming_streams.receive()
            await send.send(b"small first")
            assert await incoming.recv.receive() == b"small first"
            await send.send(pattern(1, SMALL_MAX + 36 * KIB))
            with pytest.raises(trio.BrokenResourceError) as info:
                await incoming.recv.receive()
            assert "maximum" in str(info.value.__cause__)
            with pytest.raises(trio.BrokenResourceError):
                await send_until_broken(send)
        await roundtrip(alice, bob)
        await roundtrip(bob, alice)


async def test_message_over_the_coordinators_maximum_on_a_stream_to_it(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    async with (
        conec_trio.open_coordinator(coord_config(max_message_size=SMALL_MAX)) as coord,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        with trio.fail_after(DEADLINE):
            send, recv = await alice.new_proxied_stream(None)
            incoming = await coord.incoming_streams.receive()
            await send.send(b"small first")
            assert await incoming.recv.receive() == b"small first"
            await send.send(pattern(2, 2 * SMALL_MAX))
            with pytest.raises(trio.BrokenResourceError):
                await incoming.recv.receive()
            with pytest.raises(trio.BrokenResourceError):
                await recv.receive()
        await roundtrip(alice, bob)


async def test_broadcast_message_over_the_coordinators_maximum_breaks_only_its_sender(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    async with (
        conec_trio.open_coordinator(coord_config(max_message_size=SMALL_MAX)) as coord,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        with trio.fail_after(DEADLINE):
            a_send, a_recv = await alice.new_broadcast("room")
            b_send, b_recv = await bob.new_broadcast("room")
            await a_send.send(b"small first")
            assert (await b_recv.receive()).data == b"small first"
            await a_send.send(pattern(3, 2 * SMALL_MAX))
            with pytest.raises(trio.BrokenResourceError):
                await receive_until_broken(a_recv)
            # bob's membership is untouched.
            await b_send.send(b"still here")
            assert (await b_recv.receive()).data == b"still here"
        await wait_for(lambda: coord.broadcasts.counts("room") == (1, 1), DEADLINE)


# --- max_pending_opens ---------------------------------------------------------------------------


async def test_opens_to_a_coordinator_that_does_not_read_wait_beyond_max_pending(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    """Nobody reads ``coord.incoming_streams``: it holds at most ``max_pending_opens`` streams;
    the opens beyond that still return (the coordinator accepted them) and their streams wait
    in line, with every message kept, until the coordinator reads. Other clients carry on."""
    n = 6
    async with (
        conec_trio.open_coordinator(coord_config(max_pending_opens=2)) as coord,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        ids = []
        with trio.fail_after(DEADLINE):
            for i in range(n):
                send, _ = await alice.new_proxied_stream(None)
                await send.send(b"message %d" % i)
                ids.append(send.stream_id)
        await wait_for(lambda: coord.incoming_streams.statistics().current_buffer_used == 2)
        await roundtrip(alice, bob)
        await roundtrip(bob, alice)
        assert coord.incoming_streams.statistics().current_buffer_used == 2
        got: dict[Any, bytes] = {}
        with trio.fail_after(DEADLINE):
            for _ in range(n):
                incoming = await coord.incoming_streams.receive()
                assert incoming.peer == "alice"
                got[incoming.stream_id] = await incoming.recv.receive()
        assert got == {sid: b"message %d" % i for i, sid in enumerate(ids)}


# --- max_streams_per_client ---------------------------------------------------------------------


async def streams_setup_open(
    alice: conec_trio.Client, bob: conec_trio.Client, count: int
) -> list[tuple[Any, Any, IncomingStream]]:
    out = []
    with trio.fail_after(DEADLINE):
        for _ in range(count):
            send, recv = await alice.new_proxied_stream("bob")
            out.append((send, recv, await bob.incoming_streams.receive()))
    return out


async def close_both_ways(send: Any, recv: Any, incoming: IncomingStream) -> None:
    with trio.fail_after(DEADLINE):
        await send.aclose()
        await incoming.send.aclose()
        assert [m async for m in incoming.recv] == []
        assert [m async for m in recv] == []


async def test_opens_beyond_max_streams_per_client_wait_for_a_free_slot(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    """The limit is QUIC's stream credit: with 4 streams allowed (the control stream is one),
    alice's 4th stream open waits, her other streams and requests keep working, and the
    open completes as soon as one of her streams has ended both ways."""
    async with (
        conec_trio.open_coordinator(coord_config(max_streams_per_client=4)) as coord,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        streams = await streams_setup_open(alice, bob, 3)
        extra: list[Any] = []

        async def open_extra() -> None:
            extra.append(await alice.new_proxied_stream("bob"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_extra)
            # Round trips through the coordinator, after the extra open was issued.
            with trio.fail_after(DEADLINE):
                with pytest.raises(BroadcastNotFoundError):
                    await alice.broadcast_count("nothing")
                send, _, incoming = streams[1]
                await send.send(b"still flowing")
                assert await incoming.recv.receive() == b"still flowing"
            assert not extra, "the open beyond the limit did not wait"
            await close_both_ways(*streams[0])
            await wait_for(lambda: bool(extra), DEADLINE)
        send, _ = extra[0]
        with trio.fail_after(DEADLINE):
            incoming = await bob.incoming_streams.receive()
            await send.send(b"made it")
            assert await incoming.recv.receive() == b"made it"


async def test_cancelled_open_waiting_for_a_slot_leaves_the_client_connected(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    async with (
        conec_trio.open_coordinator(coord_config(max_streams_per_client=4)) as coord,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        streams = await streams_setup_open(alice, bob, 3)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice.new_proxied_stream, "bob")
                with trio.fail_after(DEADLINE), pytest.raises(BroadcastNotFoundError):
                    await alice.broadcast_count("nothing")
                scope.cancel()  # the user gives up on the waiting open
        await close_both_ways(*streams[0])
        with trio.fail_after(DEADLINE), pytest.raises(BroadcastNotFoundError):
            await alice.broadcast_count("nothing")
        assert coord.client_ids() == ["alice", "bob"]
        await roundtrip(alice, bob)


# --- fairness: a stream flooder does not starve others -------------------------------------------

FLOOD_TASKS = 8
ROUND_TRIPS = 50  # ping-pong round trips made while the flood goes on
# A starved round trip never completes; a served one takes milliseconds. How fast it is under
# load is a benchmark's question, not this test's: the bound is only "it was not starved".
NOT_STARVED = 2.0


async def test_a_stream_flooder_does_not_starve_other_clients(coord, open_client):
    """While a client opens, uses and closes streams as fast as it can, another pair's
    ping-pong round trips through the same coordinator keep completing, and the flood goes
    on all the while (neither side is shut out)."""
    async with (
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
        open_client(coord, "flooder") as flooder,
        open_client(coord, "sink") as sink,
    ):
        with trio.fail_after(DEADLINE):
            send, recv = await alice.new_proxied_stream("bob")
            echo = await bob.incoming_streams.receive()

        async def bob_echoes() -> None:
            async for msg in echo.recv:
                await echo.send.send(msg)

        flooded = 0

        async def flood() -> None:
            nonlocal flooded
            while True:
                s, r = await flooder.new_proxied_stream("sink")
                await s.send(b"x" * 100)
                assert await r.receive() == b"x" * 100
                await s.aclose()
                await r.aclose()
                flooded += 1

        async def sink_serves() -> None:
            async with trio.open_nursery() as nursery:
                async for incoming in sink.incoming_streams:
                    nursery.start_soon(serve_one, incoming)

        async def serve_one(incoming: IncomingStream) -> None:
            try:
                async for msg in incoming.recv:
                    await incoming.send.send(msg)
                await incoming.send.aclose()
            except trio.BrokenResourceError:
                pass  # the flooder closed its reading end first: fine

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob_echoes)
            nursery.start_soon(sink_serves)
            for _ in range(FLOOD_TASKS):
                nursery.start_soon(flood)
            # The flood is under way before the measured round trips start.
            await wait_for(lambda: flooded >= 20, DEADLINE)
            flooded_before = flooded
            for i in range(ROUND_TRIPS):
                with trio.fail_after(NOT_STARVED):
                    await send.send(b"ping %d" % i)
                    assert await recv.receive() == b"ping %d" % i
            flooded_during = flooded - flooded_before
            nursery.cancel_scope.cancel()

    # The flooder was served too while the round trips went through.
    assert flooded_during > 0, "the flood stopped while the ping-pong ran: it measured nothing"


# --- per-client quotas (hostile input, row 15) ---------------------------------------------------
# The limits above are the coordinator's; without a share per client, one client held 9,999 of
# the 10,000 broadcast channels and everyone else was refused. Each quota refuses only the
# client that reached it, names itself, and frees up as that client's own things end.


async def test_row15_a_client_at_its_broadcast_quota_leaves_channels_to_others(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    async with (
        conec_trio.open_coordinator(
            coord_config(max_broadcasts=3, max_broadcasts_per_client=2)
        ) as coord,
        open_client(coord, "mallory") as mallory,
        open_client(coord, "alice") as alice,
    ):
        with trio.fail_after(DEADLINE):
            m0_send, _ = await mallory.new_broadcast("m0")
            m1_send, m1_recv = await mallory.new_broadcast("m1")
            with pytest.raises(RefusedError, match="max_broadcasts_per_client") as info:
                await mallory.new_broadcast("m2")
            assert "'mallory'" in str(info.value)
            # Joining an existing channel is a membership too.
            with pytest.raises(RefusedError, match="max_broadcasts_per_client"):
                await mallory.new_broadcast("m0")
            # The last channel the coordinator allows is alice's to create, and she joins
            # mallory's channel as well.
            a_send, a_recv = await alice.new_broadcast("a0")
            _, a_m0 = await alice.new_broadcast("m0")
            assert coord.num_broadcasts == 3
            await m0_send.send(b"from mallory")
            assert (await a_m0.receive()).data == b"from mallory"
            await a_send.send(b"from alice")
            assert (await a_recv.receive()).data == b"from alice"
            # Once mallory leaves a channel she may join another.
            await m1_send.aclose()
            await m1_recv.aclose()
        await wait_for(lambda: coord.num_broadcasts == 2, DEADLINE)
        with trio.fail_after(DEADLINE):
            await mallory.new_broadcast("m2")


async def test_row15_a_client_at_its_open_stream_quota_does_not_stop_others(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    async with (
        conec_trio.open_coordinator(coord_config(max_open_streams_per_client=3)) as coord,
        open_client(coord, "mallory") as mallory,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        relayed = await streams_setup_open(mallory, bob, 2)
        with trio.fail_after(DEADLINE):
            await mallory.new_proxied_stream(None)
            await coord.incoming_streams.receive()
            for peer in ("bob", None):  # relayed and to the coordinator count alike
                with pytest.raises(RefusedError, match="max_open_streams_per_client") as info:
                    await mallory.new_proxied_stream(peer)
                assert "'mallory'" in str(info.value)
            # Others open streams as before, to clients and to the coordinator.
            await roundtrip(alice, bob)
            await roundtrip(bob, alice)
            send, _ = await alice.new_proxied_stream(None)
            await send.send(b"from alice")
            incoming = await coord.incoming_streams.receive()
            assert incoming.peer == "alice"
            assert await incoming.recv.receive() == b"from alice"
        # One of mallory's streams ends both ways: she may open one again.
        await close_both_ways(*relayed[0])
        await roundtrip(mallory, bob)


async def test_row15_a_client_at_its_pending_open_quota_does_not_keep_others_waiting(
    coord_config: CoordConfigFactory, open_client: ClientFactory
):
    """Nobody reads ``coord.incoming_streams`` at first: mallory's opens to the coordinator
    beyond her quota are refused, so alice's stream waits behind at most that many."""
    async with (
        conec_trio.open_coordinator(coord_config(max_pending_opens_per_client=2)) as coord,
        open_client(coord, "mallory") as mallory,
        open_client(coord, "alice") as alice,
    ):
        with trio.fail_after(DEADLINE):
            for _ in range(2):
                await mallory.new_proxied_stream(None)
            with pytest.raises(RefusedError, match="max_pending_opens_per_client") as info:
                await mallory.new_proxied_stream(None)
            assert "'mallory'" in str(info.value)
            send, _ = await alice.new_proxied_stream(None)
            await send.send(b"from alice")
            taken = [await coord.incoming_streams.receive() for _ in range(3)]
            assert sorted(s.peer for s in taken) == ["alice", "mallory", "mallory"]
            from_alice = next(s for s in taken if s.peer == "alice")
            assert await from_alice.recv.receive() == b"from alice"
            # The coordinator took mallory's streams: her quota is free again.
            await mallory.new_proxied_stream(None)
            assert (await coord.incoming_streams.receive()).peer == "mallory"
