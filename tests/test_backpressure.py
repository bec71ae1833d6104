"""Backpressure through the coordinator: a reader that stops reading stops its sender, the
relay holds a bounded amount per stream meanwhile, and other streams keep flowing."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from helpers import wait_for, wait_until_stalled

import conec_trio
from conec_trio import IncomingStream

DEADLINE = 15  # seconds; every wait in these tests is bounded by it
KIB = 1024
MIB = 1024 * KIB
DEFAULT_WINDOW = 1 * MIB  # the default stream_window of clients and coordinator
HEADER_SLACK = 16  # a frame header, and then some
RELAY_CHUNK = 64 * KIB  # the relay may write this much past a full window


def pattern(i: int, size: int) -> bytes:
    """A message whose content says which one it is."""
    return (i.to_bytes(4, "big") + bytes([i % 251]) * size)[:size]


async def open_pair(opener: Any, acceptor: Any) -> tuple[Any, Any, IncomingStream]:
    with trio.fail_after(DEADLINE):
        send, recv = await opener.new_proxied_stream(acceptor.id)
        incoming: IncomingStream = await acceptor.incoming_streams.receive()
    return send, recv, incoming


def held_bytes(coord: conec_trio.Coordinator, relayed_streams: int = 1) -> int:
    """Bytes the coordinator holds now for slow readers of its relayed streams, checking
    that ``relayed_streams`` are open (so the bytes are theirs)."""
    stats = coord.statistics()
    assert stats.relayed_streams == relayed_streams, stats
    return stats.held_bytes


class Sender:
    """Sends ``count`` numbered messages of ``size`` bytes in the background, counting."""

    def __init__(self, send: trio.abc.SendChannel[bytes], count: int, size: int) -> None:
        self.send = send
        self.count = count
        self.size = size
        self.sent = 0
        self.done = trio.Event()

    async def run(self) -> None:
        for i in range(self.count):
            await self.send.send(pattern(i, self.size))
            self.sent += 1
        await self.send.aclose()
        self.done.set()

    @property
    def sent_bytes(self) -> int:
        return self.sent * self.size


async def read_all(recv: trio.abc.ReceiveChannel[bytes], count: int, size: int) -> None:
    for i in range(count):
        assert await recv.receive() == pattern(i, size), f"message {i} is wrong"
    with pytest.raises(trio.EndOfChannel):
        await recv.receive()


async def test_stalled_reader_blocks_sender_and_relay_memory_stays_bounded(coord, open_client):
    """Default windows (1 MiB): the sender stops after a few windows' worth; the coordinator
    holds at most about two windows for that stream; other streams keep flowing; reading
    again lets everything through."""
    size = 64 * KIB
    count = 76  # 4.75 MiB: more than the pipeline can hold
    bound = 2 * DEFAULT_WINDOW + RELAY_CHUNK + size + HEADER_SLACK
    # In flight at most: a window at the sender (plus the message that filled it), one held
    # by each half at the coordinator (plus a relay chunk), one unread at the reader.
    sender_limit = 4 * DEFAULT_WINDOW + RELAY_CHUNK + 2 * size
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        send, _, stalled = await open_pair(alice, bob)
        sender = Sender(send, count, size)
        measured: list[int] = []
        flowing_measured: list[int] = []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.run)
                # bob does not read: the sender must get stuck, well short of everything.
                await wait_until_stalled()
                assert not sender.done.is_set()
                assert sender.sent_bytes <= sender_limit, sender.sent_bytes
                stalled_at = sender.sent_bytes
                measured.append(held_bytes(coord))

                # Other streams between the same clients keep flowing, both ways, while the
                # sender keeps trying on the stalled one.
                for opener, acceptor in ((alice, bob), (bob, alice)):
                    other_send, _, other = await open_pair(opener, acceptor)
                    other_sender = Sender(other_send, 16, size)  # 1 MiB
                    async with trio.open_nursery() as flowing:
                        flowing.start_soon(other_sender.run)
                        for i in range(16):
                            assert await other.recv.receive() == pattern(i, size)
                            if i % 2 == 0:
                                # Two streams now, each held to its own bound.
                                flowing_measured.append(held_bytes(coord, 2))
                        with pytest.raises(trio.EndOfChannel):
                            await other.recv.receive()
                        await other.send.aclose()  # the stream ends both ways
                assert not sender.done.is_set()
                assert sender.sent_bytes <= sender_limit
                await wait_for(lambda: coord.statistics().relayed_streams == 1)
                measured.append(held_bytes(coord))

                # Reading resumes: everything arrives, in order, and the sender finishes.
                await read_all(stalled.recv, count, size)
                await sender.done.wait()
        # Everything was read: the coordinator holds nothing any more.
        await wait_for(lambda: coord.statistics().held_bytes == 0)
    print(
        f"sender stalled after {stalled_at} bytes; coordinator held at most {max(measured)} "
        f"bytes for the stalled stream (bound {bound}), at most {max(flowing_measured)} with "
        "another stream flowing"
    )
    assert max(measured) <= bound
    assert max(measured) >= DEFAULT_WINDOW, "the measurement saw nothing held: is it measuring?"
    assert max(flowing_measured) <= 2 * bound


@pytest.mark.parametrize("stalled_reader", ["opener", "acceptor"])
async def test_small_windows_bound_sender_and_relay(coord_config, open_client, stalled_reader):
    """Same with 64 KiB windows, in both directions of a stream."""
    window = 64 * KIB
    size = 8 * KIB
    count = 100  # 800 KiB, far beyond four windows
    flow = {"stream_window": window, "connection_window": 8 * window}
    bound = 2 * window + RELAY_CHUNK + size + HEADER_SLACK
    sender_limit = 4 * window + RELAY_CHUNK + 2 * size
    async with (
        conec_trio.open_coordinator(coord_config(**flow)) as coord,
        open_client(coord, "alice", **flow) as alice,
        open_client(coord, "bob", **flow) as bob,
    ):
        send, recv, incoming = await open_pair(alice, bob)
        if stalled_reader == "acceptor":
            sender, reader = Sender(send, count, size), incoming.recv
        else:
            sender, reader = Sender(incoming.send, count, size), recv
        measured: list[int] = []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.run)
                await wait_until_stalled()
                assert not sender.done.is_set()
                assert sender.sent_bytes <= sender_limit, sender.sent_bytes
                for _ in range(10):  # the sender is still trying all along
                    measured.append(held_bytes(coord))
                    await trio.sleep(0.01)
                assert sender.sent_bytes <= sender_limit
                await read_all(reader, count, size)
                await sender.done.wait()
    assert max(measured) <= bound, (max(measured), bound)
    assert max(measured) >= window // 2


async def test_stalled_coordinator_reader_blocks_the_client(coord_config, open_client):
    """A stream to the coordinator has backpressure too: the coordinator's own reader."""
    window = 64 * KIB
    size = 8 * KIB
    count = 100
    sender_limit = 2 * window + 2 * size  # a window at each end: no relay in between
    flow = {"stream_window": window, "connection_window": 8 * window}
    async with (
        conec_trio.open_coordinator(coord_config(**flow)) as coord,
        open_client(coord, "alice", **flow) as alice,
    ):
        with trio.fail_after(DEADLINE):
            send, _ = await alice.new_proxied_stream(None)
            incoming = await coord.incoming_streams.receive()
            sender = Sender(send, count, size)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.run)
                await wait_until_stalled()
                assert not sender.done.is_set()
                assert sender.sent_bytes <= sender_limit, sender.sent_bytes
                await read_all(incoming.recv, count, size)
                await sender.done.wait()


async def flood(send: trio.abc.SendChannel[bytes]) -> None:
    """Send until the stream breaks."""
    with pytest.raises(trio.BrokenResourceError):  # noqa: PT012 - the loop ends that way
        while True:
            await send.send(bytes(4 * KIB))


async def test_streams_closed_mid_transfer_do_not_use_up_the_connection(coord_config, open_client):
    """A reader that closes a stream while its sender is busy must give back the
    connection-level credit of whatever was still in flight; else after enough such streams
    (connection_window / stream_window with the defaults: 16) the whole connection stalls."""
    flow = {"stream_window": 32 * KIB, "connection_window": 64 * KIB}
    async with (
        conec_trio.open_coordinator(coord_config(**flow)) as coord,
        open_client(coord, "alice", **flow) as alice,
        open_client(coord, "bob", **flow) as bob,
    ):
        for _ in range(40):
            with trio.fail_after(2):  # one round takes milliseconds
                send, recv, incoming = await open_pair(alice, bob)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood, send)
                    for _ in range(20):
                        await incoming.recv.receive()
                    # bob is done with the stream while alice is still sending.
                    await incoming.recv.aclose()
                    await incoming.send.aclose()
                await recv.aclose()
        # The connections still carry data at full speed.
        with trio.fail_after(DEADLINE):
            send, _, incoming = await open_pair(alice, bob)
            sender = Sender(send, 64, 16 * KIB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.run)
                await read_all(incoming.recv, 64, 16 * KIB)


async def test_a_full_socket_buffer_delays_messages_and_loses_none(coord, open_client, monkeypatch):
    # The client's socket refuses every other send (as a full buffer does with EAGAIN).
    # Messages sent from the writer's task and by the connection's driver must then wait
    # for the socket, in order: none may be dropped, not even to be recovered by QUIC's
    # retransmission (which would hide the loss from the application, only slower).
    from aioquic.quic.recovery import QuicPacketRecovery

    from conec_trio import _quic

    refused = 0
    lost: list[int] = []
    on_packets_lost = QuicPacketRecovery._on_packets_lost

    def count_lost(self: Any, *, packets: Any, **kwargs: Any) -> None:
        packets = list(packets)
        lost.append(len(packets))
        on_packets_lost(self, packets=packets, **kwargs)

    monkeypatch.setattr(QuicPacketRecovery, "_on_packets_lost", count_lost)

    def flaky_socket(family: int, host: str, port: int) -> _quic.DatagramSocket:
        sock = _quic.real_udp_socket(family, host, port)
        real_send = sock.send_batch_nowait
        calls = 0

        def send_batch_nowait(datagrams: list[tuple[bytes, Any]], start: int) -> int:
            nonlocal calls, refused
            calls += 1
            if calls % 2 == 0:
                refused += 1
                return 0
            return real_send(datagrams, start)

        sock.send_batch_nowait = send_batch_nowait  # type: ignore[method-assign]
        return sock

    old = _quic.set_socket_factory(flaky_socket)
    try:
        async with open_client(coord, "alice", listen=False) as alice:
            _quic.set_socket_factory(old)
            with trio.fail_after(DEADLINE):
                send, recv = await alice.new_proxied_stream(None)
                await send.send(b"hello")
                incoming = await coord.incoming_streams.receive()
                assert await incoming.recv.receive() == b"hello"
                got: list[bytes] = []

                async def collect() -> None:
                    async for message in incoming.recv:
                        got.append(message)
                        await incoming.send.send(message[:4])

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collect)
                    for i in range(100):  # request and reply: sent inline
                        await send.send(pattern(i, 64))
                        assert await recv.receive() == pattern(i, 64)[:4]
                    for i in range(100, 400):  # a stream of writes: gathered by the driver
                        await send.send(pattern(i, 300))
                    await send.aclose()
                    for i in range(100, 400):
                        assert await recv.receive() == pattern(i, 300)[:4]
                    nursery.cancel_scope.cancel()
    finally:
        _quic.set_socket_factory(old)
    assert got == [pattern(i, 64) for i in range(100)] + [pattern(i, 300) for i in range(100, 400)]
    assert refused > 50
    assert sum(lost) == 0, f"{sum(lost)} packets were lost on loopback"


async def test_row05_relay_holds_what_the_reader_granted_not_a_window_per_stream(
    coord_config, open_client
):
    """Hostile input, row 5: a client opens many streams to an accomplice that reads none of
    them. The coordinator used to hold up to a window per stream on the accomplice's side
    (300 streams: +336 MB); it now hands on only what the accomplice's connection granted
    and takes from the sender only what it handed on, so it holds about two connection
    windows however many streams there are. Others' streams flow meanwhile, and once the
    accomplice reads, everything arrives."""
    window = 64 * KIB
    flow = {"stream_window": window, "connection_window": 4 * window}
    streams, count, size = 24, 8, 32 * KIB  # 24 streams x 256 KiB: 6 MiB in all
    # What mallory's connection may hold unread at the coordinator, what the accomplice's
    # connection granted, and a relay chunk in between.
    bound = 2 * flow["connection_window"] + RELAY_CHUNK
    async with (
        conec_trio.open_coordinator(coord_config(**flow)) as coord,
        open_client(coord, "mallory", **flow) as mallory,
        open_client(coord, "accomplice", **flow) as accomplice,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        with trio.fail_after(DEADLINE):
            senders = [Sender((await mallory.new_proxied_stream("accomplice"))[0], count, size)]
            for _ in range(streams - 1):
                senders.append(
                    Sender((await mallory.new_proxied_stream("accomplice"))[0], count, size)
                )
            async with trio.open_nursery() as nursery:
                for sender in senders:
                    nursery.start_soon(sender.run)
                await wait_until_stalled()
                assert not all(sender.done.is_set() for sender in senders)
                held = coord.statistics().held_bytes
                assert held >= window, "nothing held: is the attack running?"
                assert held <= bound, (held, bound)

                # alice and bob are not held up by it.
                send, recv, incoming = await open_pair(alice, bob)
                await send.send(b"ping")
                assert await incoming.recv.receive() == b"ping"
                await incoming.send.send(b"pong")
                assert await recv.receive() == b"pong"
                assert coord.statistics().held_bytes <= bound + 2 * HEADER_SLACK

                # The accomplice reads at last: every stream delivers everything, in order,
                # without waiting for a keepalive (5 s) to carry the credit it frees.
                with trio.fail_after(4.0):
                    async with trio.open_nursery() as readers:
                        for _ in range(streams):
                            taken = await accomplice.incoming_streams.receive()
                            readers.start_soon(read_all, taken.recv, count, size)
        await wait_for(lambda: coord.statistics().held_bytes == 0)
