"""Proxied streams through a real coordinator: opening them, who sees what, ids, adapters."""

from __future__ import annotations

import time
from typing import Any

import cbor2
import pytest
import trio
from helpers import wait_for

import conec_trio
from conec_trio import (
    CborReceiveChannel,
    CborSendChannel,
    ConecError,
    IncomingStream,
    Lagged,
    PeerNotFoundError,
    ProtocolError,
    StreamId,
    StreamIdInUseError,
    open_nonblocking,
)

DEADLINE = 10  # seconds; every wait in these tests is bounded by it


async def accept(client: Any) -> IncomingStream:
    with trio.fail_after(DEADLINE):
        stream: IncomingStream = await client.incoming_streams.receive()
    return stream


async def exchange(
    send_a: trio.abc.SendChannel[bytes],
    recv_a: trio.abc.ReceiveChannel[bytes],
    send_b: trio.abc.SendChannel[bytes],
    recv_b: trio.abc.ReceiveChannel[bytes],
) -> None:
    """Messages go both ways between two ends of one stream."""
    with trio.fail_after(DEADLINE):
        await send_a.send(b"ping")
        assert await recv_b.receive() == b"ping"
        await send_b.send(b"pong")
        assert await recv_a.receive() == b"pong"
        for i in range(3):
            await send_a.send(b"a%d" % i)
            await send_b.send(b"b%d" % i)
        assert [await recv_b.receive() for _ in range(3)] == [b"a0", b"a1", b"a2"]
        assert [await recv_a.receive() for _ in range(3)] == [b"b0", b"b1", b"b2"]


# --- opening proxied streams ------------------------------------------------------------------


async def test_proxied_stream_to_another_client(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    with trio.fail_after(DEADLINE):
        send, recv = await alice.new_proxied_stream("bob")
    incoming = await accept(bob)

    assert isinstance(incoming, IncomingStream)
    assert incoming.peer == "alice"
    assert incoming.stream_id == send.stream_id == recv.stream_id
    assert incoming.stream_id.is_proxied
    assert not incoming.stream_id.is_direct
    assert send.peer == recv.peer == "bob"
    assert incoming.send.peer == incoming.recv.peer == "alice"
    assert incoming.send.stream_id == incoming.recv.stream_id == incoming.stream_id
    peer, stream_id, in_send, in_recv = incoming  # a NamedTuple, unpacks in field order
    assert (peer, stream_id) == ("alice", send.stream_id)

    await exchange(send, recv, in_send, in_recv)


async def test_proxied_stream_to_itself(conec_client):
    alice = await conec_client("alice")
    with trio.fail_after(DEADLINE):
        send, recv = await alice.new_proxied_stream("alice")
    incoming = await accept(alice)

    assert incoming.peer == "alice"
    assert send.peer == "alice"
    assert incoming.stream_id == send.stream_id
    assert incoming.stream_id.is_proxied
    assert not incoming.stream_id.is_direct
    await exchange(send, recv, incoming.send, incoming.recv)


async def test_proxied_stream_to_the_coordinator(conec_coordinator, conec_client):
    alice = await conec_client("alice")
    with trio.fail_after(DEADLINE):
        send, recv = await alice.new_proxied_stream(None)
        incoming = await conec_coordinator.incoming_streams.receive()

    assert incoming.peer == "alice"  # always the opener's id at the coordinator
    # The coordinator, as the client sees it:
    assert send.peer is None
    assert recv.peer is None
    assert incoming.send.peer == incoming.recv.peer == "alice"
    assert incoming.stream_id == send.stream_id == recv.stream_id
    assert incoming.stream_id.is_proxied
    assert not incoming.stream_id.is_direct
    await exchange(send, recv, incoming.send, incoming.recv)


async def test_streams_to_self_and_other_are_told_apart(conec_client):
    """Every opened stream arrives once, at the right client, with its own id."""
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    with trio.fail_after(DEADLINE):
        to_bob = [await alice.new_proxied_stream("bob") for _ in range(3)]
        to_self = [await alice.new_proxied_stream("alice") for _ in range(2)]
    ids = [s.stream_id for s, _ in to_bob + to_self]
    assert len(set(ids)) == 5, "a client's streams must carry distinct ids"

    at_bob = {(await accept(bob)).stream_id for _ in to_bob}
    at_alice = {(await accept(alice)).stream_id for _ in to_self}
    assert at_bob == {s.stream_id for s, _ in to_bob}
    assert at_alice == {s.stream_id for s, _ in to_self}


# --- errors when opening -------------------------------------------------------------------------


async def test_unknown_peer_is_refused(conec_client):
    alice = await conec_client("alice")
    with trio.fail_after(DEADLINE), pytest.raises(PeerNotFoundError) as info:
        await alice.new_proxied_stream("nobody")
    assert isinstance(info.value, ConecError)
    assert "nobody" in str(info.value)
    # The client is not harmed: the next open works.
    with trio.fail_after(DEADLINE):
        send, recv = await alice.new_proxied_stream("alice")
    incoming = await accept(alice)
    await exchange(send, recv, incoming.send, incoming.recv)


async def test_peer_that_left_is_refused(coord, open_client):
    async with open_client(coord, "alice") as alice:
        async with open_client(coord, "bob"):
            assert coord.num_clients == 2
        await wait_for(lambda: coord.num_clients == 1, DEADLINE)
        with trio.fail_after(DEADLINE), pytest.raises(PeerNotFoundError, match="bob"):
            await alice.new_proxied_stream("bob")


async def test_stream_id_in_use_is_refused(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    wanted = StreamId.proxied(1234)
    with trio.fail_after(DEADLINE):
        send, recv = await alice.new_stream_with_id("bob", wanted)
    assert send.stream_id == recv.stream_id == wanted
    incoming = await accept(bob)
    assert incoming.stream_id == wanted

    with trio.fail_after(DEADLINE), pytest.raises(StreamIdInUseError) as info:
        await alice.new_stream_with_id("bob", StreamId.proxied(1234))
    assert isinstance(info.value, ConecError)
    # ... also towards a different peer: ids are scoped per opening client.
    with trio.fail_after(DEADLINE), pytest.raises(StreamIdInUseError):
        await alice.new_stream_with_id("alice", wanted)

    # The refused attempts did not disturb the stream that holds the id.
    await exchange(send, recv, incoming.send, incoming.recv)


async def test_same_stream_id_from_two_clients(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    sid = StreamId.proxied(7)
    with trio.fail_after(DEADLINE):
        a_send, _ = await alice.new_stream_with_id("bob", sid)
        b_send, _ = await bob.new_stream_with_id("alice", sid)
    at_bob = await accept(bob)
    at_alice = await accept(alice)
    assert at_bob.stream_id == at_alice.stream_id == sid
    assert (at_bob.peer, at_alice.peer) == ("alice", "bob")
    # Two different streams despite the equal ids.
    with trio.fail_after(DEADLINE):
        await a_send.send(b"from alice")
        await b_send.send(b"from bob")
        assert await at_bob.recv.receive() == b"from alice"
        assert await at_alice.recv.receive() == b"from bob"


async def test_automatic_ids_skip_chosen_ones(conec_client):
    alice = await conec_client("alice")
    with trio.fail_after(DEADLINE):
        chosen, _ = await alice.new_stream_with_id("alice", StreamId.proxied(0))
        auto_send, _ = await alice.new_proxied_stream("alice")
    assert auto_send.stream_id != chosen.stream_id
    with trio.fail_after(DEADLINE), pytest.raises(StreamIdInUseError):
        await alice.new_stream_with_id("alice", auto_send.stream_id)


async def test_refused_open_frees_its_id(conec_client):
    alice = await conec_client("alice")
    sid = StreamId.proxied(5)
    with trio.fail_after(DEADLINE), pytest.raises(PeerNotFoundError):
        await alice.new_stream_with_id("nobody", sid)
    with trio.fail_after(DEADLINE):
        send, _ = await alice.new_stream_with_id("alice", sid)
    assert send.stream_id == sid


def test_stream_id_value_semantics():
    assert StreamId.proxied(3) == StreamId.proxied(3)
    assert hash(StreamId.proxied(3)) == hash(StreamId.proxied(3))
    assert StreamId.proxied(3) != StreamId.proxied(4)
    assert StreamId.proxied(3) != StreamId.direct(3)
    assert len({StreamId.proxied(3), StreamId.proxied(3), StreamId.direct(3)}) == 2
    assert {StreamId.direct(0): "x"}[StreamId.direct(0)] == "x"

    p, d = StreamId.proxied(0), StreamId.direct(2**40)
    assert (p.is_proxied, p.is_direct) == (True, False)
    assert (d.is_proxied, d.is_direct) == (False, True)
    assert "proxied" in repr(p)
    assert "direct" in repr(d)

    for bad in (-1, 1.0, "1", None, True):
        with pytest.raises(ValueError):  # noqa: PT011 - the bad value is what is checked
            StreamId.proxied(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):  # noqa: PT011
            StreamId.direct(bad)  # type: ignore[arg-type]


# --- many streams at once ----------------------------------------------------------------------


async def test_a_thousand_concurrent_streams(coord, open_client):
    n_streams, n_messages = 1000, 5
    started = time.perf_counter()
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        opened: dict[int, StreamId] = {}
        received: dict[int, tuple[StreamId, list[bytes]]] = {}

        async def open_and_send(i: int) -> None:
            send, _ = await alice.new_proxied_stream("bob")
            opened[i] = send.stream_id
            for j in range(n_messages):
                await send.send(b"stream %d message %d" % (i, j))
            await send.aclose()

        async def read_one(incoming: IncomingStream) -> None:
            assert incoming.peer == "alice"
            messages = [msg async for msg in incoming.recv]
            i = int(messages[0].split()[1])
            assert i not in received, f"stream {i} arrived twice"
            received[i] = (incoming.stream_id, messages)

        async def accept_all(nursery: trio.Nursery) -> None:
            for _ in range(n_streams):
                nursery.start_soon(read_one, await bob.incoming_streams.receive())

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_all, nursery)
                for i in range(n_streams):
                    nursery.start_soon(open_and_send, i)

        assert sorted(received) == list(range(n_streams))
        assert len(set(opened.values())) == n_streams
        for i, (stream_id, messages) in received.items():
            assert stream_id == opened[i]
            assert messages == [b"stream %d message %d" % (i, j) for j in range(n_messages)]
    elapsed = time.perf_counter() - started
    print(f"{n_streams} concurrent proxied streams in {elapsed:.2f} s")


# --- adapters over real streams ------------------------------------------------------------------


class EndWatcher(trio.abc.ReceiveChannel[bytes]):
    """Passes messages through and sets ``ended`` once its source said EndOfChannel."""

    def __init__(self, recv: trio.abc.ReceiveChannel[bytes]) -> None:
        self._recv = recv
        self.ended = trio.Event()

    async def receive(self) -> bytes:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            self.ended.set()
            raise

    async def aclose(self) -> None:
        await self._recv.aclose()


async def test_nonblocking_reader_never_holds_the_sender_back(
    coord_config, client_config, open_client
):
    # Small windows, so that a blocking reader would stop this sender after a few dozen
    # messages: the sender finishing proves the adapter kept draining.
    window = 16 * 1024
    n_messages, capacity, size = 2000, 10, 256
    config = coord_config(stream_window=window, connection_window=4 * window)
    async with conec_trio.open_coordinator(config) as coord:
        small = {"stream_window": window, "connection_window": 4 * window}
        async with (
            open_client(coord, "alice", **small) as alice,
            open_client(coord, "bob", **small) as bob,
        ):
            with trio.fail_after(DEADLINE):
                send, _ = await alice.new_proxied_stream("bob")
            incoming = await accept(bob)
            watched = EndWatcher(incoming.recv)
            async with open_nonblocking(watched, capacity) as nb:
                with trio.fail_after(DEADLINE):
                    for i in range(n_messages):
                        await send.send(i.to_bytes(4, "big") * (size // 4))
                    await send.aclose()
                    await watched.ended.wait()

                with pytest.raises(Lagged) as info:
                    await nb.receive()
                assert info.value.count == n_messages - capacity
                tail = [await nb.receive() for _ in range(capacity)]
                assert [int.from_bytes(m[:4], "big") for m in tail] == list(
                    range(n_messages - capacity, n_messages)
                )
                assert all(len(m) == size for m in tail)
                with pytest.raises(trio.EndOfChannel):
                    await nb.receive()


async def test_cbor_channels_over_a_proxied_stream(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    with trio.fail_after(DEADLINE):
        send, recv = await alice.new_proxied_stream("bob")
    incoming = await accept(bob)
    values: list[Any] = [
        {"op": "put", "key": b"\x00\x01", "n": [1, 2.5, None, True]},
        "text",
        2**70,
        [],
    ]
    with trio.fail_after(DEADLINE):
        cbor_send = CborSendChannel(send)
        for value in values:
            await cbor_send.send(value)
        await cbor_send.aclose()
        got = [value async for value in CborReceiveChannel(incoming.recv)]
    assert got == values

    # And back the other way on the same stream.
    with trio.fail_after(DEADLINE):
        await CborSendChannel(incoming.send).send({"reply": 1})
        assert await CborReceiveChannel(recv).receive() == {"reply": 1}


async def test_bad_cbor_from_the_peer_is_an_error_not_a_crash(conec_client):
    alice = await conec_client("alice")
    bob = await conec_client("bob")
    with trio.fail_after(DEADLINE):
        send, recv = await alice.new_proxied_stream("bob")
    incoming = await accept(bob)
    cbor_recv = CborReceiveChannel(recv)
    with trio.fail_after(DEADLINE):
        # bob uses the plain byte channel to send garbage, then a good value.
        await incoming.send.send(b"\xff\xfe not cbor")
        await incoming.send.send(cbor2.dumps({"good": True}))
        with pytest.raises(ProtocolError):
            await cbor_recv.receive()
        assert await cbor_recv.receive() == {"good": True}

        # Both clients keep working.
        await send.send(b"still here")
        assert await incoming.recv.receive() == b"still here"
        send2, recv2 = await alice.new_proxied_stream("bob")
    incoming2 = await accept(bob)
    await exchange(send2, recv2, incoming2.send, incoming2.recv)
