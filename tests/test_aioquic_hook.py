"""Canary for the aioquic internals conec_trio relies on.

aioquic has no public switch to ask a client for its certificate, and no public hook for
receive credit that follows what the application consumed; ``_quic.FlowControlledConnection``
reaches into private attributes for both. An aioquic upgrade that renames or removes any of
them must fail here, loudly and by name, not as a silent loss of client authentication or of
backpressure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aioquic
import pytest
import trio
from aioquic import tls
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import ClientFactory, coordinator_echo, wait_for

import conec_trio
from conec_trio import _quic, certs

UPGRADE = f"aioquic {aioquic.__version__}"


def _aioquic_broke(what: str) -> str:
    return (
        f"{UPGRADE} no longer provides {what}, which conec_trio._quic.FlowControlledConnection "
        "relies on: adapt conec_trio/_quic/_aioquic.py to this aioquic version, or keep the "
        "version pin below it"
    )


@asynccontextmanager
async def connected(
    open_client: ClientFactory, coord: conec_trio.Coordinator, client_id: str, **options: Any
) -> AsyncIterator[conec_trio.Client]:
    """``open_client``, where a refusal for a missing client certificate names the cause."""
    try:
        async with open_client(coord, client_id, **options) as client:
            yield client
    except conec_trio.CertificateError as exc:
        if "no certificate" not in str(exc):
            raise
        pytest.fail(
            f"{UPGRADE}: the coordinator did not receive the client's certificate ({exc}); the "
            "client-certificate request hook in FlowControlledConnection._initialize (setting "
            "tls._request_client_certificate) no longer works with this aioquic version"
        )


def _coordinator_side_connection(
    coord: conec_trio.Coordinator, client_id: str
) -> _quic.FlowControlledConnection:
    session = coord._clients[client_id]
    quic = session.conn.quic
    assert isinstance(quic, _quic.FlowControlledConnection)
    return quic


def test_overridden_methods_still_exist_in_aioquic() -> None:
    # FlowControlledConnection overrides these; if aioquic renamed them, the overrides would
    # silently never run (no client certificate request, no consumption-based credit).
    for name in (
        "_initialize",
        "_write_stream_limits",
        "_write_connection_limits",
        "_handle_ping_frame",
        "receive_datagram",
        "datagrams_to_send",
    ):
        assert callable(getattr(QuicConnection, name, None)), _aioquic_broke(
            f"QuicConnection.{name}()"
        )
        assert name in vars(_quic.FlowControlledConnection), (
            f"FlowControlledConnection no longer overrides {name}: update this test"
        )


async def test_coordinator_sees_the_clients_certificate(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    cert_pem, key_pem = certs.self_signed_cert(["alice"])
    expected = x509.load_pem_x509_certificate(cert_pem)
    async with connected(open_client, coord, "alice", cert_chain=cert_pem, private_key=key_pem):
        quic = _coordinator_side_connection(coord, "alice")
        tls_ctx = quic.tls
        assert getattr(tls_ctx, "_request_client_certificate", None) is True, _aioquic_broke(
            "tls.Context._request_client_certificate (asking the client for its certificate)"
        )
        assert hasattr(tls_ctx, "_peer_certificate"), _aioquic_broke(
            "tls.Context._peer_certificate"
        )
        assert hasattr(tls_ctx, "_peer_certificate_chain"), _aioquic_broke(
            "tls.Context._peer_certificate_chain (intermediates sent by a client)"
        )
        seen = quic.peer_certificate
        assert seen is not None, (
            f"{UPGRADE}: the coordinator asked for the client's certificate but did not get "
            "one; the client-certificate request hook in FlowControlledConnection._initialize "
            "no longer works"
        )
        assert seen.public_bytes(serialization.Encoding.DER) == expected.public_bytes(
            serialization.Encoding.DER
        ), f"{UPGRADE}: the coordinator saw a certificate other than the client's"


async def test_client_side_does_not_ask_the_coordinator_for_a_client_cert(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    # The hook is server-side only: a client-role connection must not request anything.
    async with connected(open_client, coord, "alice") as alice:
        conn = alice._link.conn
        assert conn is not None
        assert conn.quic.tls._request_client_certificate is False
        # ... and it does see the coordinator's certificate, through the same attribute.
        assert conn.quic.peer_certificate is not None


async def test_flow_control_attributes_are_where_we_reach_for_them(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with connected(open_client, coord, "alice") as alice:
        with trio.fail_after(5):
            send, recv = await alice.new_proxied_stream(None)
            await send.send(b"x" * 10_000)
            incoming = await coord.incoming_streams.receive()
            assert await incoming.recv.receive() == b"x" * 10_000
            await incoming.send.send(b"y" * 10_000)
            assert await recv.receive() == b"y" * 10_000
        quic = _coordinator_side_connection(coord, "alice")

        for name, fields in (
            ("_local_max_data", ("value", "used", "sent")),
            ("_local_max_streams_bidi", ("value", "sent")),
            ("_local_max_streams_uni", ("value", "sent")),
        ):
            limit = getattr(quic, name, None)
            assert limit is not None, _aioquic_broke(f"QuicConnection.{name}")
            for field in fields:
                assert isinstance(getattr(limit, field, None), int), _aioquic_broke(
                    f"QuicConnection.{name}.{field} (an int)"
                )
        # FlowControlledConnection.__init__ writes the stream limit into aioquic's Limit.
        assert quic._local_max_streams_bidi.value == coord.config.max_streams_per_client

        streams = getattr(quic, "_streams", None)
        assert isinstance(streams, dict), _aioquic_broke("QuicConnection._streams (a dict)")
        # The stream that carried the messages.
        stream = next((s for s in streams.values() if s.receiver.highest_offset >= 10_000), None)
        assert stream is not None, _aioquic_broke("QuicStream.receiver.highest_offset")
        for obj, attr in (
            (stream.sender, "_buffer_start"),
            (stream.sender, "_buffer_stop"),
            (stream.sender, "is_finished"),
            (stream.receiver, "highest_offset"),
            (stream, "max_stream_data_local"),
            (stream, "max_stream_data_local_sent"),
            (stream, "stream_id"),
        ):
            assert hasattr(obj, attr), _aioquic_broke(f"{type(obj).__name__}.{attr}")
        assert stream.sender._buffer_stop >= 10_000, _aioquic_broke(
            "QuicStreamSender._buffer_stop as the end offset of written data"
        )
        assert quic.send_backlog(stream.stream_id) >= 0

        # Connection state the endpoint reads.
        for attr in (
            "_state",
            "_close_event",
            "_host_cids",
            "_is_client",
            "_remote_max_idle_timeout",
        ):
            assert hasattr(quic, attr), _aioquic_broke(f"QuicConnection.{attr}")


async def test_connections_work_after_the_handshake_state_is_dropped(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    # Once the handshake is over, FlowControlledConnection drops aioquic's handshake buffers
    # and shares its frame table; streams, a key update and the close must not notice.
    async with connected(open_client, coord, "alice") as alice:
        conn = alice._link.conn
        assert conn is not None
        client_side = conn.quic
        coord_side = _coordinator_side_connection(coord, "alice")
        for quic in (client_side, coord_side):
            spaces = getattr(quic, "_spaces", None)
            assert isinstance(spaces, dict), _aioquic_broke("QuicConnection._spaces (a dict)")
            for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
                assert spaces[epoch].discarded, _aioquic_broke("QuicPacketSpace.discarded")
            assert hasattr(spaces[tls.Epoch.ONE_RTT], "sent_packets"), _aioquic_broke(
                "QuicPacketSpace.sent_packets"
            )
            buffers = getattr(quic, "_crypto_buffers", None)
            assert isinstance(buffers, dict), _aioquic_broke("QuicConnection._crypto_buffers")
            assert sum(b.capacity for b in buffers.values()) < 3 * 16384, (
                "the handshake buffers were not dropped after the handshake"
            )
            handlers = getattr(quic, "_QuicConnection__frame_handlers", None)
            assert isinstance(handlers, dict), _aioquic_broke("QuicConnection.__frame_handlers")
        phase = client_side._cryptos[tls.Epoch.ONE_RTT].key_phase
        client_side.request_key_update()
        with trio.fail_after(5):
            send, recv = await alice.new_proxied_stream(None)
            incoming = await coord.incoming_streams.receive()
            for n in range(3):
                await send.send(bytes([n]) * 50_000)
                assert await incoming.recv.receive() == bytes([n]) * 50_000
                await incoming.send.send(bytes([n]) * 50_000)
                assert await recv.receive() == bytes([n]) * 50_000
        assert client_side._cryptos[tls.Epoch.ONE_RTT].key_phase != phase
        assert coord_side._cryptos[tls.Epoch.ONE_RTT].key_phase != phase
    # Leaving closed it: the coordinator saw the goodbye, not an idle timeout.
    await wait_for(lambda: coord.num_clients == 0)


def test_tls_context_flag_is_off_by_default() -> None:
    # aioquic documents this flag as "for test purposes only"; we switch it on per server
    # connection, so its default must still be off and it must still be a plain attribute.
    ctx = tls.Context(is_client=False)
    assert getattr(ctx, "_request_client_certificate", None) is False, _aioquic_broke(
        "tls.Context._request_client_certificate (defaulting to False)"
    )


@asynccontextmanager
async def counting_client(
    open_client: ClientFactory, coord: conec_trio.Coordinator, client_id: str
) -> AsyncIterator[tuple[conec_trio.Client, list[int]]]:
    """A client whose socket counts the datagrams it sends (appended per send call)."""
    sent: list[int] = []

    def counting_socket(family: int, host: str, port: int) -> _quic.DatagramSocket:
        sock = _quic.real_udp_socket(family, host, port)
        real_send = sock.send_batch_nowait

        def send_batch_nowait(datagrams: list[tuple[bytes, Any]], start: int) -> int:
            count = real_send(datagrams, start)
            sent.append(count)
            return count

        sock.send_batch_nowait = send_batch_nowait  # type: ignore[method-assign]
        return sock

    old = _quic.set_socket_factory(counting_socket)
    try:
        async with connected(open_client, coord, client_id, listen=False) as client:
            _quic.set_socket_factory(old)
            yield client, sent
    finally:
        _quic.set_socket_factory(old)


async def test_a_reply_carries_the_ack_of_its_request(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    # aioquic delays ACKs by a millisecond, so a reply would go without the ACK and an
    # ACK-only packet would follow; QuicConn brings the ACK forward (through the 1-RTT
    # space's ``ack_at``) into the reply's packet. A ping-pong then takes one datagram each
    # way per round trip, which halves the packet work of request/response traffic.
    async with counting_client(open_client, coord, "alice") as (alice, sent):
        with trio.fail_after(10):
            async with coordinator_echo(alice, coord) as (send, recv):
                rounds = 200
                before = sum(sent)
                for i in range(rounds):
                    await send.send(i.to_bytes(64, "big"))
                    assert await recv.receive() == i.to_bytes(64, "big")
                datagrams = sum(sent) - before
    # One datagram per request; a few more for keepalive or a path MTU probe at most.
    assert datagrams <= rounds + 10, _aioquic_broke(
        f"QuicPacketSpace.ack_at as the time the next ACK is due ({datagrams} datagrams "
        f"for {rounds} round trips)"
    )


async def test_a_stream_of_small_writes_shares_packets(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    # Only an answer to what arrived goes out on its own at once; messages written one
    # after another are gathered into packets, even when ACKs come back quickly (here all
    # runs in one process, so they come back within a few scheduling rounds). Relayed to
    # bob after a bulk transfer, as in the demo, where they once went nearly one by one.
    messages = 5_000
    async with (
        counting_client(open_client, coord, "alice") as (alice, sent),
        open_client(coord, "bob", listen=False) as bob,
    ):
        with trio.fail_after(20):
            for size, count in ((64 * 1024, 64), (64, messages)):
                send, _recv = await alice.new_proxied_stream("bob")
                await send.send(b"hello")
                incoming = await bob.incoming_streams.receive()
                assert await incoming.recv.receive() == b"hello"
                before = sum(sent)
                async with trio.open_nursery() as nursery:
                    received: list[bytes] = []

                    async def collect(
                        recv: trio.abc.ReceiveChannel[bytes], into: list[bytes]
                    ) -> None:
                        async for message in recv:
                            into.append(message)

                    nursery.start_soon(collect, incoming.recv, received)
                    for i in range(count):
                        await send.send(i.to_bytes(size, "big"))
                    await send.aclose()
                datagrams = sum(sent) - before
                assert received == [i.to_bytes(size, "big") for i in range(count)]
    # The bulk transfer grew the datagrams (path MTU probing), so 320 KB of messages fit in a
    # few dozen; answers sent one by one took over 300 here.
    assert datagrams <= messages / 25, f"{datagrams} datagrams for {messages} messages"
