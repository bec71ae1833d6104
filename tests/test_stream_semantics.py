"""What a stream promises its user, checked on real proxied streams through a coordinator:
whole messages in order, size limits, clean ends, own closes, breaks, cancelled sends."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from helpers import wait_until_stalled

import conec_trio
from conec_trio import (
    ConecError,
    DisconnectedError,
    IncomingStream,
    MessageTooLargeError,
    StreamId,
)

DEADLINE = 10  # seconds; every wait in these tests is bounded by it
KIB = 1024
MIB = 1024 * KIB
SMALL_MAX = 64 * KIB


async def open_pair(opener: Any, acceptor: Any) -> tuple[Any, Any, IncomingStream]:
    """A proxied stream from ``opener`` to ``acceptor``: (send, recv, acceptor's IncomingStream)."""
    with trio.fail_after(DEADLINE):
        send, recv = await opener.new_proxied_stream(acceptor.id)
        incoming: IncomingStream = await acceptor.incoming_streams.receive()
    assert incoming.stream_id == send.stream_id
    return send, recv, incoming


@asynccontextmanager
async def small_max_setup(coord_config, open_client) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A coordinator and two clients that all allow messages of at most SMALL_MAX bytes."""
    async with (
        conec_trio.open_coordinator(coord_config(max_message_size=SMALL_MAX)) as coord,
        open_client(coord, "alice", max_message_size=SMALL_MAX) as alice,
        open_client(coord, "bob", max_message_size=SMALL_MAX) as bob,
    ):
        yield coord, alice, bob


FLOW = {"stream_window": 32 * KIB, "connection_window": 256 * KIB}  # senders block soon


class Flood:
    """A task that sends until it fails; ``error`` says how, once ``finished`` is set."""

    def __init__(self, send: trio.abc.SendChannel[bytes]) -> None:
        self.send = send
        self.sent = 0
        self.error: BaseException | None = None
        self.finished = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                await self.send.send(bytes(4 * KIB))
                self.sent += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.error = exc
        finally:
            self.finished.set()


async def start_flood_until_blocked(
    send: trio.abc.SendChannel[bytes], nursery: trio.Nursery
) -> Flood:
    """Start a Flood in ``nursery``; return once it is stuck on backpressure."""
    flood = Flood(send)
    nursery.start_soon(flood.run)
    await wait_until_stalled()
    assert not flood.finished.is_set()
    assert flood.sent < 1000, "the sender was never held back"
    return flood


def pattern(i: int, size: int) -> bytes:
    """A message whose every byte depends on ``i``: a mix-up or a cut shows."""
    head = i.to_bytes(4, "big")
    body = bytes((i * 7 + k) % 251 for k in range(min(size, 251)))
    data = head + body * (size // max(len(body), 1) + 1)
    return data[:size] if size >= 4 else head[:size]


# --- whole messages, in order ---------------------------------------------------------------------


async def test_many_messages_both_ways_in_order(conec_client):
    rng = random.Random(1)
    sizes = [rng.choice([0, 1, 5, 100, 1200, 1500, 5000, 20_000]) for _ in range(300)]
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    send, recv, incoming = await open_pair(alice, bob)

    async def send_all(channel: trio.abc.SendChannel[bytes], tag: int) -> None:
        for i, size in enumerate(sizes):
            await channel.send(pattern(tag * 10_000 + i, size))
        await channel.aclose()

    async def receive_all(channel: trio.abc.ReceiveChannel[bytes], tag: int) -> None:
        got = [msg async for msg in channel]  # async for ends at the clean end
        assert len(got) == len(sizes)
        for i, (msg, size) in enumerate(zip(got, sizes, strict=True)):
            assert msg == pattern(tag * 10_000 + i, size), f"message {i} differs"

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, send, 1)
            nursery.start_soon(send_all, incoming.send, 2)
            nursery.start_soon(receive_all, incoming.recv, 1)
            nursery.start_soon(receive_all, recv, 2)


async def test_empty_messages_are_messages(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    send, _, incoming = await open_pair(alice, bob)
    with trio.fail_after(DEADLINE):
        await send.send(b"")
        await send.send(b"")
        await send.send(b"x")
        await send.send(bytearray())
        await send.aclose()
        got = [msg async for msg in incoming.recv]
    assert got == [b"", b"", b"x", b""]
    assert all(isinstance(msg, bytes) for msg in got)


async def test_bytes_like_messages_are_accepted(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    send, _, incoming = await open_pair(alice, bob)
    with trio.fail_after(DEADLINE):
        await send.send(bytearray(b"array"))
        await send.send(memoryview(b"a view of bytes")[2:6])
        assert await incoming.recv.receive() == b"array"
        assert await incoming.recv.receive() == b"view"


async def test_message_of_exactly_the_maximum_arrives_whole(coord_config, open_client):
    async with small_max_setup(coord_config, open_client) as (_, alice, bob):
        send, recv, incoming = await open_pair(alice, bob)
        biggest = pattern(1, SMALL_MAX)
        with trio.fail_after(DEADLINE):
            await send.send(biggest)
            await incoming.send.send(biggest)
            assert await incoming.recv.receive() == biggest
            assert await recv.receive() == biggest


async def test_message_over_the_maximum_is_refused_and_the_stream_goes_on(
    coord_config, open_client
):
    async with small_max_setup(coord_config, open_client) as (_, alice, bob):
        send, recv, incoming = await open_pair(alice, bob)
        with trio.fail_after(DEADLINE):
            await send.send(b"before")
            with pytest.raises(MessageTooLargeError) as info:
                await send.send(b"x" * (SMALL_MAX + 1))
            assert isinstance(info.value, ConecError)
            assert str(SMALL_MAX) in str(info.value)
            # The acceptor's end refuses too.
            with pytest.raises(MessageTooLargeError):
                await incoming.send.send(bytearray(SMALL_MAX + 1))

            await send.send(b"after")
            await send.send(pattern(2, SMALL_MAX))
            await send.aclose()
            # Nothing of the refused message went out: the reader sees exactly the others.
            got = [msg async for msg in incoming.recv]
            assert got == [b"before", b"after", pattern(2, SMALL_MAX)]

            await incoming.send.send(b"reply")
            assert await recv.receive() == b"reply"


async def test_maximum_on_a_stream_to_the_coordinator(coord_config, open_client):
    async with small_max_setup(coord_config, open_client) as (coord, alice, _):
        with trio.fail_after(DEADLINE):
            send, recv = await alice.new_proxied_stream(None)
            incoming = await coord.incoming_streams.receive()
            with pytest.raises(MessageTooLargeError):
                await send.send(b"y" * (SMALL_MAX + 1))
            with pytest.raises(MessageTooLargeError):
                await incoming.send.send(b"y" * (SMALL_MAX + 1))
            await send.send(pattern(3, SMALL_MAX))
            assert await incoming.recv.receive() == pattern(3, SMALL_MAX)
            await incoming.send.send(pattern(4, SMALL_MAX))
            assert await recv.receive() == pattern(4, SMALL_MAX)


async def test_one_message_of_the_default_maximum(conec_client):
    """16 MiB, the default maximum, in one message (larger than every flow-control window)."""
    size = 16 * MIB
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    send, _, incoming = await open_pair(alice, bob)
    with trio.fail_after(DEADLINE):
        with pytest.raises(MessageTooLargeError):
            await send.send(bytes(size + 1))
        message = pattern(5, size)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send.send, message)
            got = await incoming.recv.receive()
        assert len(got) == size
        assert got == message


# --- clean ends and own closes --------------------------------------------------------------------


async def test_aclose_delivers_everything_then_end_of_channel(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    send, recv, incoming = await open_pair(alice, bob)
    with trio.fail_after(DEADLINE):
        for i in range(50):
            await send.send(pattern(i, 3000))
        await send.aclose()
        for i in range(50):
            assert await incoming.recv.receive() == pattern(i, 3000)
        with pytest.raises(trio.EndOfChannel):
            await incoming.recv.receive()
        with pytest.raises(trio.EndOfChannel):  # and again
            await incoming.recv.receive()

        # Half-close: the other direction still works.
        await incoming.send.send(b"still open this way")
        assert await recv.receive() == b"still open this way"
        await incoming.send.aclose()
        with pytest.raises(trio.EndOfChannel):
            await recv.receive()


async def test_async_for_reads_until_the_end(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    _, recv, incoming = await open_pair(alice, bob)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                async with incoming.send:  # an async context manager closes it
                    for i in range(20):
                        await incoming.send.send(b"%d" % i)

            nursery.start_soon(write)
            got = [msg async for msg in recv]
    assert got == [b"%d" % i for i in range(20)]


async def test_using_an_end_after_its_own_aclose(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    send, recv, incoming = await open_pair(alice, bob)
    with trio.fail_after(DEADLINE):
        await send.aclose()
        await send.aclose()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await send.send(b"late")
        await recv.aclose()
        await recv.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await recv.receive()
        # Same on the acceptor's ends.
        await incoming.recv.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await incoming.recv.receive()
        await incoming.send.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await incoming.send.send(b"late")


async def test_aclose_wakes_a_receiver_blocked_on_the_same_end(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    _, _, incoming = await open_pair(alice, bob)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:

            async def blocked_reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await incoming.recv.receive()

            nursery.start_soon(blocked_reader)
            await trio.testing.wait_all_tasks_blocked()
            await incoming.recv.aclose()


async def test_aclose_wakes_a_sender_blocked_on_the_same_end(coord_config, open_client):
    async with (
        conec_trio.open_coordinator(coord_config(**FLOW)) as coord,
        open_client(coord, "alice", **FLOW) as alice,
        open_client(coord, "bob", **FLOW) as bob,
    ):
        send, _, _ = await open_pair(alice, bob)
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                flood = await start_flood_until_blocked(send, nursery)
                await send.aclose()
                await flood.finished.wait()
            assert isinstance(flood.error, trio.ClosedResourceError)
            with pytest.raises(trio.ClosedResourceError):
                await send.send(b"late")


# --- breaks ---------------------------------------------------------------------------------------


async def send_until_broken(send: trio.abc.SendChannel[bytes]) -> None:
    """Keep sending until BrokenResourceError, which must come within the deadline (a send
    or two may still go out before the news of the break arrives)."""
    cause: BaseException | None = None
    with trio.fail_after(DEADLINE):
        while cause is None:
            try:
                await send.send(b"more")
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
    assert isinstance(cause, ConecError), "raised from a conec cause saying why"


@pytest.mark.parametrize("closing_reader", ["acceptor", "opener"])
async def test_reader_that_closes_breaks_the_writer(coord, open_client, closing_reader):
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        send, recv, incoming = await open_pair(alice, bob)
        if closing_reader == "acceptor":
            writer, reader, other_send, other_recv = send, incoming.recv, incoming.send, recv
        else:
            writer, reader, other_send, other_recv = incoming.send, recv, send, incoming.recv
        with trio.fail_after(DEADLINE):
            await writer.send(b"read me")
            assert await reader.receive() == b"read me"
            await reader.aclose()
        await send_until_broken(writer)
        with pytest.raises(trio.BrokenResourceError):  # and it stays broken
            await writer.send(b"again")
        # The other direction of the stream is not affected.
        with trio.fail_after(DEADLINE):
            await other_send.send(b"other way")
            assert await other_recv.receive() == b"other way"


async def test_peer_leaving_breaks_its_streams_but_loses_nothing_sent(coord, open_client):
    size = 1 * MIB  # over a window's worth: still in flight when alice leaves
    async with open_client(coord, "bob") as bob:
        async with open_client(coord, "alice") as alice:
            send_done, _, done_at_bob = await open_pair(alice, bob)
            _, _, open_at_bob = await open_pair(alice, bob)
            _, _, reading_at_bob = await open_pair(alice, bob)
            with trio.fail_after(DEADLINE):
                await send_done.send(pattern(9, size))
                await send_done.aclose()
        # alice has left; bob did not read anything yet.
        with trio.fail_after(DEADLINE):
            assert await done_at_bob.recv.receive() == pattern(9, size)
            with pytest.raises(trio.EndOfChannel):
                await done_at_bob.recv.receive()
            with pytest.raises(trio.BrokenResourceError):
                await open_at_bob.recv.receive()
        await send_until_broken(open_at_bob.send)
        await send_until_broken(reading_at_bob.send)
        await send_until_broken(done_at_bob.send)  # alice no longer reads that one either


async def test_blocked_receive_breaks_when_the_peer_leaves(coord, open_client):
    async with open_client(coord, "bob") as bob:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery, open_client(coord, "alice") as alice:
                _, _, incoming = await open_pair(alice, bob)

                async def blocked_reader() -> None:
                    with pytest.raises(trio.BrokenResourceError) as info:
                        await incoming.recv.receive()
                    # raised from a conec cause saying why
                    assert isinstance(info.value.__cause__, ConecError)

                nursery.start_soon(blocked_reader)
                await trio.testing.wait_all_tasks_blocked()


async def test_blocked_sender_breaks_when_the_peer_leaves(coord_config, open_client):
    async with (
        conec_trio.open_coordinator(coord_config(**FLOW)) as coord,
        open_client(coord, "bob", **FLOW) as bob,
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(DEADLINE):
            async with open_client(coord, "alice", **FLOW) as alice:
                send, _, _ = await open_pair(bob, alice)
                # bob's sender gets stuck: alice does not read...
                flood = await start_flood_until_blocked(send, nursery)
            # ...and then she leaves.
            await flood.finished.wait()
        assert isinstance(flood.error, trio.BrokenResourceError)
        assert isinstance(flood.error.__cause__, ConecError)


async def test_coordinator_end_breaks_when_the_client_leaves(coord, open_client):
    async with open_client(coord, "alice") as alice:
        with trio.fail_after(DEADLINE):
            send, _ = await alice.new_proxied_stream(None)
            incoming = await coord.incoming_streams.receive()
            await send.send(b"last words")
            await send.aclose()
            await alice.new_proxied_stream(None)  # left open
            incoming2 = await coord.incoming_streams.receive()
    with trio.fail_after(DEADLINE):
        # What alice sent and closed arrives; what she left open breaks.
        assert await incoming.recv.receive() == b"last words"
        with pytest.raises(trio.EndOfChannel):
            await incoming.recv.receive()
        with pytest.raises(trio.BrokenResourceError):
            await incoming2.recv.receive()
    await send_until_broken(incoming.send)
    await send_until_broken(incoming2.send)


async def test_peer_connection_idle_timeout_breaks_the_stream(coord, open_client):
    async with open_client(coord, "bob") as bob:
        async with open_client(
            coord, "alice", keepalive=False, idle_timeout=1.0, reconnect=False
        ) as alice:
            send, recv, incoming = await open_pair(alice, bob)
            with trio.fail_after(DEADLINE):
                await send.send(b"hello")
                assert await incoming.recv.receive() == b"hello"
                # alice goes quiet and the coordinator drops her; bob's end breaks.
                with pytest.raises(trio.BrokenResourceError):
                    await incoming.recv.receive()
            await send_until_broken(incoming.send)
            with trio.fail_after(DEADLINE):
                # alice's own ends break too (she lost the coordinator).
                with pytest.raises(trio.BrokenResourceError):
                    await recv.receive()
                with pytest.raises(DisconnectedError):
                    await alice.new_proxied_stream("bob")
        assert coord.num_clients == 1


async def run_coordinator(
    config: conec_trio.CoordConfig,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[conec_trio.Coordinator] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with conec_trio.open_coordinator(config) as coord:
        task_status.started(coord)
        await stop.wait()


async def test_client_that_loses_the_coordinator_with_reconnect_off(coord_config, open_client):
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        coord = await nursery.start(run_coordinator, coord_config(), stop)
        async with (
            open_client(coord, "alice", reconnect=False) as alice,
            open_client(coord, "bob", reconnect=False) as bob,
        ):
            send, recv, incoming = await open_pair(alice, bob)
            loop_send, loop_recv, _ = await open_pair(alice, alice)
            with trio.fail_after(DEADLINE):
                await send.send(b"before")
                assert await incoming.recv.receive() == b"before"

            stop.set()  # the coordinator block exits; the clients stay in theirs

            with trio.fail_after(DEADLINE):
                for end in (recv, incoming.recv, loop_recv):
                    with pytest.raises(trio.BrokenResourceError):
                        await end.receive()
                for end in (send, incoming.send, loop_send):
                    with pytest.raises(trio.BrokenResourceError):
                        await end.send(b"after")
                for client in (alice, bob):
                    with pytest.raises(trio.BrokenResourceError):
                        await client.incoming_streams.receive()
                    with pytest.raises(DisconnectedError) as info:
                        await client.new_proxied_stream("alice")
                    assert isinstance(info.value, ConecError)
                    with pytest.raises(DisconnectedError):
                        await client.new_proxied_stream(None)
                    with pytest.raises(DisconnectedError):
                        await client.new_stream_with_id("bob", StreamId.proxied(99))
                    with pytest.raises(DisconnectedError):
                        await client.new_broadcast("news")
                    with pytest.raises(DisconnectedError):
                        await client.broadcast_count("news")
        # Leaving the client blocks raised nothing.


# --- cancelled sends ------------------------------------------------------------------------------


async def test_cancelled_send_sends_all_or_nothing(coord_config, open_client):
    window = 64 * KIB
    size = 10 * KIB
    flow = {"stream_window": window, "connection_window": 4 * window}
    async with (
        conec_trio.open_coordinator(coord_config(**flow)) as coord,
        open_client(coord, "alice", **flow) as alice,
        open_client(coord, "bob", **flow) as bob,
    ):
        send, _, incoming = await open_pair(alice, bob)
        attempted: list[int] = []
        completed: set[int] = set()
        cancelled_while_blocked = 0
        i = 0
        with trio.fail_after(DEADLINE):
            # The reader does not read: sends fill the windows, then block and get cancelled.
            while cancelled_while_blocked < 3:
                assert i < 200, "sends never blocked although nobody reads"
                attempted.append(i)
                with trio.move_on_after(0.05) as scope:
                    await send.send(pattern(i, size))
                if scope.cancelled_caught:
                    cancelled_while_blocked += 1
                else:
                    completed.add(i)
                i += 1
            # A send cancelled before it starts.
            with trio.CancelScope() as scope:
                scope.cancel()
                await send.send(pattern(i, size))
            attempted.append(i)
            i += 1

            async with trio.open_nursery() as nursery:
                received: list[bytes] = []

                async def read_all() -> None:
                    async for msg in incoming.recv:
                        received.append(msg)

                nursery.start_soon(read_all)
                # The stream is still usable: more sends, cancelled at random moments.
                rng = random.Random(2)
                for _ in range(60):
                    attempted.append(i)
                    with trio.move_on_after(rng.choice([0, 0.0005, 0.002, 1])) as scope:
                        await send.send(pattern(i, size))
                    if not scope.cancelled_caught:
                        completed.add(i)
                    i += 1
                last = list(range(i, i + 10))
                for i in last:
                    await send.send(pattern(i, size))
                    completed.add(i)
                await send.aclose()

        indices = [int.from_bytes(msg[:4], "big") for msg in received]
        for index, msg in zip(indices, received, strict=True):
            assert msg == pattern(index, size), f"message {index} arrived damaged"
        assert indices == sorted(set(indices)), "messages arrived out of order or twice"
        assert set(indices) <= set(attempted) | set(last)
        assert completed <= set(indices), "a completed send was lost"
        assert indices[-10:] == last


async def test_sender_cancelled_on_backpressure_leaves_a_clean_stream(coord_config, open_client):
    size = 4 * KIB
    async with (
        conec_trio.open_coordinator(coord_config(**FLOW)) as coord,
        open_client(coord, "alice", **FLOW) as alice,
        open_client(coord, "bob", **FLOW) as bob,
    ):
        send, _, incoming = await open_pair(alice, bob)
        sent = 0
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:

                async def flood() -> None:
                    nonlocal sent
                    while True:
                        await send.send(pattern(sent, size))
                        sent += 1

                nursery.start_soon(flood)
                await wait_until_stalled()  # stuck on backpressure...
                nursery.cancel_scope.cancel()  # ...and cancelled there
            assert sent < 1000, "the sender was never held back"
            await send.aclose()
            got = [msg async for msg in incoming.recv]
        # Every completed send, and at most the whole cancelled one after them.
        assert len(got) in (sent, sent + 1)
        assert got == [pattern(k, size) for k in range(len(got))]
