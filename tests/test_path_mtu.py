"""Path MTU probing: a connection that carries bulk data grows its datagrams as far as the
path allows (loopback allows the largest size tried), one that only carries control traffic
never sends a probe, and ``max_datagram_size`` caps the growth."""

from __future__ import annotations

import trio
from helpers import ClientFactory, wait_for

import conec_trio
from conec_trio import _quic

DEADLINE = 10.0


def client_side(client: conec_trio.Client) -> _quic.FlowControlledConnection:
    conn = client._link.conn
    assert conn is not None
    return conn.quic


def coordinator_side(
    coord: conec_trio.Coordinator, client_id: str
) -> _quic.FlowControlledConnection:
    return coord._clients[client_id].conn.quic


async def send_bulk(client: conec_trio.Client, coord: conec_trio.Coordinator, nbytes: int) -> None:
    with trio.fail_after(DEADLINE):
        send, _recv = await client.new_proxied_stream(None)
        incoming = await coord.incoming_streams.receive()
        chunk = bytes(16 * 1024)
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                received = 0
                async for message in incoming.recv:
                    received += len(message)
                assert received == nbytes

            nursery.start_soon(drain)
            for _ in range(nbytes // len(chunk)):
                await send.send(chunk)
            await send.aclose()


async def test_bulk_data_grows_the_datagrams_on_loopback(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice", listen=False) as alice:
        quic = client_side(alice)
        assert quic._max_datagram_size == 1200  # aioquic's safe start
        await send_bulk(alice, coord, 1024 * 1024)
        # Probes go out one size at a time, each confirmed by its ACK.
        with trio.fail_after(DEADLINE):
            await wait_for(lambda: quic._max_datagram_size == _quic.PMTU_LADDER[-1])
        # Congestion control and pacing count in the new size: a window of at least two.
        assert quic._loss._cc._max_datagram_size == _quic.PMTU_LADDER[-1]
        assert quic._loss._pacer._max_datagram_size == _quic.PMTU_LADDER[-1]
        assert quic._loss.congestion_window >= 2 * _quic.PMTU_LADDER[-1]
        # The coordinator only sent ACKs and flow-control credit: it did not probe.
        assert coordinator_side(coord, "alice")._max_datagram_size == 1200


async def test_control_traffic_alone_sends_no_probe(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice", listen=False) as alice:
        with trio.fail_after(DEADLINE):
            send, recv = await alice.new_proxied_stream(None)
            incoming = await coord.incoming_streams.receive()
            for i in range(50):
                await send.send(b"request %d" % i)
                assert await incoming.recv.receive() == b"request %d" % i
                await incoming.send.send(b"reply")
                assert await recv.receive() == b"reply"
        for quic in (client_side(alice), coordinator_side(coord, "alice")):
            assert quic.pmtu_timer() is None  # no probe in flight...
            assert quic._pmtu_next == 0  # ...and none ever sent
            assert quic._max_datagram_size == 1200


async def test_max_datagram_size_caps_the_probing(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice", listen=False, max_datagram_size=4096) as alice:
        quic = client_side(alice)
        await send_bulk(alice, coord, 1024 * 1024)
        with trio.fail_after(DEADLINE):
            await wait_for(lambda: quic._max_datagram_size == 4096)
            # Every size up to the cap was tried; nothing larger ever will be.
            await wait_for(lambda: quic._pmtu_next == len(quic._pmtu_ladder))
        assert max(quic._pmtu_ladder) == 4096
