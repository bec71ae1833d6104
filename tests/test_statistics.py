"""``client.statistics()`` and ``coord.statistics()``: what they report follows what happened.

Backpressure's "bytes held for slow readers" is checked in test_backpressure.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from helpers import ClientFactory, wait_for
from rawquic import open_raw_client

import conec_trio
from conec_trio import _tls, certs
from conec_trio._wire import control
from conec_trio._wire.codes import CloseCode

DEADLINE = 10
KIB = 1024
NO_REFUSALS = {
    "version": 0,
    "id-taken": 0,
    "bad-id": 0,
    "certificate": 0,
    "limit": 0,
    "protocol": 0,
}


async def send_and_read(
    send: trio.abc.SendChannel[bytes], recv: trio.abc.ReceiveChannel[bytes], messages: list[bytes]
) -> None:
    """Send ``messages`` on ``send`` and read them back whole from ``recv``."""
    async with trio.open_nursery() as nursery:

        async def sender() -> None:
            for message in messages:
                await send.send(message)

        nursery.start_soon(sender)
        for message in messages:
            assert await recv.receive() == message


async def test_relayed_bytes_count_what_the_coordinator_passed_on(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    messages = [bytes([i]) * (50 * KIB) for i in range(20)]  # 1000 KiB
    total = sum(map(len, messages))
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        before = coord.statistics()
        assert before.clients == 2
        assert before.relayed_streams == 0
        with trio.fail_after(DEADLINE):
            send, recv = await alice.new_proxied_stream("bob")
            incoming = await bob.incoming_streams.receive()
            assert coord.statistics().relayed_streams == 1
            await send_and_read(send, incoming.recv, messages)
            await send_and_read(incoming.send, recv, messages[:2])
            during = coord.statistics()
            # Both directions count, framing included.
            assert during.relayed_bytes - before.relayed_bytes >= total + 2 * 50 * KIB

            # A stream to the coordinator is not relayed: the count stays.
            to_coord, _ = await alice.new_proxied_stream(None)
            at_coord = await coord.incoming_streams.receive()
            await send_and_read(to_coord, at_coord.recv, messages[:4])
            assert coord.statistics().relayed_bytes == during.relayed_bytes
            assert coord.statistics().relayed_streams == 1

            for end in (send, recv, incoming.send, incoming.recv):
                await end.aclose()
            await wait_for(lambda: coord.statistics().relayed_streams == 0)
        after = coord.statistics()
        assert after.held_bytes == 0
        assert after.relayed_bytes == during.relayed_bytes
        assert after.refused == NO_REFUSALS


async def test_refused_clients_are_counted_by_reason(
    coord: conec_trio.Coordinator,
    open_client: ClientFactory,
    client_config: Any,
    coord_identity: tuple[bytes, bytes],
) -> None:
    assert coord.statistics().refused == NO_REFUSALS
    # A certificate for another name than the id.
    cert, key = certs.self_signed_cert(["carol"])
    with trio.fail_after(DEADLINE), pytest.raises(conec_trio.CertificateError):
        async with conec_trio.open_client(
            client_config(coord, "dave", cert_chain=cert, private_key=key)
        ):
            pass
    assert coord.statistics().refused == {**NO_REFUSALS, "certificate": 1}

    async with open_client(coord, "alice"):
        for _ in range(2):  # an id that is connected already
            with trio.fail_after(DEADLINE), pytest.raises(conec_trio.IdInUseError):
                async with conec_trio.open_client(client_config(coord, "alice")):
                    pass
        # An id no certificate could carry, said by a client that skips the local check.
        async with open_raw_client(
            coord.address, coord_identity[0], identity=_tls.ephemeral_identity("mallory")
        ) as raw:
            hello = control.Hello(control.PROTOCOL_VERSION, "bad id!", True, [])
            raw.open_frame_stream(control.encode(hello))
            code, _ = await raw.wait_closed()
            assert code == CloseCode.BAD_ID
        stats = coord.statistics()
    assert stats.refused == {**NO_REFUSALS, "certificate": 1, "id-taken": 2, "bad-id": 1}
    assert stats.clients == 1


async def test_a_direct_channel_shows_in_both_clients_statistics(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    messages = [bytes([i]) * (20 * KIB) for i in range(10)]  # 200 KiB
    total = sum(map(len, messages))
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        alice_before = alice.statistics()
        assert alice_before.id == "alice"
        assert alice_before.connected
        assert alice_before.channels == {}
        # Only control messages went to the coordinator: no path MTU probing, base size.
        assert alice_before.coordinator_datagram_size == 1200
        # On loopback the coordinator sees each client at its own socket's address.
        assert alice_before.observed_address is not None
        assert alice_before.observed_address[0] == "127.0.0.1"
        with trio.fail_after(DEADLINE):
            await alice.new_channel("bob")
            send, _ = await alice.new_direct_stream("bob")
            incoming = await bob.incoming_streams.receive()
            await send_and_read(send, incoming.recv, messages)
        at_alice = alice.statistics().channels["bob"]
        at_bob = bob.statistics().channels["alice"]
        assert at_alice.peer == "bob"
        assert at_bob.peer == "alice"
        # The channel runs between the same sockets the coordinator sees.
        assert at_alice.address == bob.statistics().observed_address
        assert at_bob.address == alice.statistics().observed_address
        for channel in (at_alice, at_bob):
            assert 0 < channel.rtt < 1
            assert channel.datagram_size >= 1200
        assert at_alice.bytes_sent >= total
        assert at_bob.bytes_received >= total
        # What went the other way: the stream header, not the messages.
        assert at_bob.bytes_sent < 1 * KIB
        assert at_alice.bytes_received < 1 * KIB
        # A snapshot stays as it was.
        with trio.fail_after(DEADLINE):
            await send_and_read(send, incoming.recv, messages[:1])
        assert alice.statistics().channels["bob"].bytes_sent >= at_alice.bytes_sent + 20 * KIB
        assert at_alice.bytes_sent < total + 1 * KIB

        with trio.fail_after(DEADLINE):
            await alice.close_channel("bob")
            await wait_for(lambda: bob.statistics().channels == {})
        assert alice.statistics().channels == {}


async def test_connected_follows_the_coordinator_connection(
    coord_config: Any, open_client: ClientFactory
) -> None:
    stop = trio.Event()

    async def run_coordinator(*, task_status: trio.TaskStatus[conec_trio.Coordinator]) -> None:
        async with conec_trio.open_coordinator(coord_config()) as coord:
            task_status.started(coord)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        coord = await nursery.start(run_coordinator)
        async with open_client(coord, "alice") as alice:
            assert alice.statistics().connected
            stop.set()  # the coordinator goes away under the client
            with trio.fail_after(DEADLINE):
                await wait_for(lambda: not alice.statistics().connected)
