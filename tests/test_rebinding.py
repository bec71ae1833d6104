"""NAT rebinding. Of a connection's server side: the dialling (client-role) side follows its
peer to a new address, but only on a packet that authenticates (a direct channel whose
accepting side's NAT gives it a new public port). And of either side of a direct channel
between two clients behind port-restricted NATs, on the fake network: the channel and its
streams go on."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import trio
import trio.testing
from helpers import wait_for
from test_paths import ALICE_IP, COORD_IP, NAT_A, PATIENCE, numbered, open_lab
from test_stateless_reset import DEADLINE, SERVER, identity, settings

import conec_trio
from conec_trio import certs
from conec_trio._quic import ConnectionListener, QuicConn, QuicEndpoint, make_udp_socket
from conec_trio.testing import FILTERED, Nat, NatMapping, open_fake_network


class Received(ConnectionListener):
    def __init__(self) -> None:
        self.data = bytearray()

    def stream_data(self, conn: QuicConn, stream_id: int, data: bytes, fin: bool) -> None:
        self.data += data


class RebindingNat:
    """A UDP relay in front of a server, like a NAT: the client talks to ``public``; after
    ``rebind()`` the server's traffic leaves from a new public port and the old one is
    forgotten (whatever still arrives there is dropped)."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.ports = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        self.inside = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.current = 0
        self.client: tuple[str, int] | None = None
        self.forged: list[bytes] = []  # sent from the new port before the real traffic

    async def start(self, nursery: trio.Nursery) -> tuple[str, int]:
        for sock in (*self.ports, self.inside):
            await sock.bind(("127.0.0.1", 0))
        for index in range(2):
            nursery.start_soon(self._outbound, index)
        nursery.start_soon(self._inbound)
        return self.public(0)

    def public(self, index: int) -> tuple[str, int]:
        return tuple(self.ports[index].getsockname())

    async def rebind(self) -> None:
        self.current = 1
        assert self.client is not None
        for data in self.forged:
            await self.ports[1].sendto(data, self.client)

    async def _outbound(self, index: int) -> None:
        while True:
            data, addr = await self.ports[index].recvfrom(65536)
            if index != self.current:
                continue  # the forgotten mapping
            self.client = addr
            await self.inside.sendto(data, self.server)

    async def _inbound(self) -> None:
        while True:
            data = await self.inside.recv(65536)
            if self.client is not None:
                await self.ports[self.current].sendto(data, self.client)


async def test_a_dialled_peer_behind_a_rebinding_nat_is_followed_to_its_new_port() -> None:
    server_sock = make_udp_socket(socket.AF_INET, "127.0.0.1", 0)
    client_sock = make_udp_socket(socket.AF_INET, "127.0.0.1", 0)
    try:
        async with trio.open_nursery() as nursery:
            accepted: list[QuicConn] = []
            server = QuicEndpoint(server_sock, nursery)
            server.accept_connections(lambda: settings(SERVER), accepted.append)
            await nursery.start(server.run)
            nat = RebindingNat(server.local_address)
            public = await nat.start(nursery)
            client = QuicEndpoint(client_sock, nursery)
            await nursery.start(client.run)
            conn = client.connect(public, settings(identity("client")))
            received = Received()
            conn.listener = received
            with trio.fail_after(DEADLINE):
                await conn.settled.wait()
            assert conn.is_open
            (server_conn,) = accepted
            stream_id = server_conn.next_stream_id()
            server_conn.send_stream_data(stream_id, b"before")
            await wait_for(lambda: received.data == b"before", DEADLINE)

            # Packets from the new port that carry the connection's id but do not
            # authenticate move nothing.
            nat.forged = [bytes([0x40 | n]) + conn.quic.host_cid + os.urandom(50) for n in (0, 1)]
            await nat.rebind()
            await trio.testing.wait_all_tasks_blocked()
            assert conn.peer_address == public
            server_conn.send_stream_data(stream_id, b" after")
            await wait_for(lambda: received.data == b"before after", DEADLINE)
            assert conn.peer_address == nat.public(1)
            # ... and the new path was validated: the client's own data gets through it
            client_stream = conn.next_stream_id()
            server_received = Received()
            server_conn.listener = server_received
            conn.send_stream_data(client_stream, b"back")
            await wait_for(lambda: server_received.data == b"back", DEADLINE)
            assert conn.quic._network_paths[0].is_validated
            nursery.cancel_scope.cancel()
    finally:
        server_sock.close()
        client_sock.close()


# --- a direct channel whose one side gets a new public port (the fake network) ---------------

MESSAGES = 30  # numbered messages on the stream before the rebinding, and as many after
ONE_WAY = 0.01


@pytest.fixture(scope="module")
def coord_identity() -> tuple[bytes, bytes]:
    return certs.self_signed_cert([COORD_IP])


def rebind(nat: Nat) -> None:
    """``nat`` forgets every mapping (it restarted, or they expired) while its old public
    ports stay taken: each host behind it gets a new public port with its next datagram, and
    whatever still arrives at an old one is filtered."""
    taken = list(nat.mappings)
    nat._by_key.clear()
    nat.mappings.clear()
    for port in taken:
        nat.mappings[port] = NatMapping(("0.0.0.0", 0), port)  # it contacted no one


async def echo(incoming: conec_trio.IncomingStream) -> None:
    async for message in incoming.recv:
        await incoming.send.send(message)
    await incoming.send.aclose()


async def talk(send: conec_trio.MessageSendChannel, recv: Any, numbers: range) -> None:
    """Send these numbered messages all at once while reading their echoes: every one comes
    back once, in order."""

    async def send_all() -> None:
        for i in numbers:
            await send.send(numbered(b"n", i))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        for i in numbers:
            assert await recv.receive() == numbered(b"n", i)


@pytest.mark.parametrize(
    ("dialler", "talker"), [("alice", "alice"), ("bob", "alice"), ("alice", "bob")]
)
async def test_a_direct_stream_goes_on_when_a_nat_gives_its_side_a_new_port(
    autojump_clock: trio.testing.MockClock,
    coord_identity: tuple[bytes, bytes],
    dialler: str,
    talker: str,
) -> None:
    """alice's NAT gives her a new public port while ``talker`` sends on a direct stream to
    the other, who echoes. bob's NAT filters what comes from alice's new port until bob sends
    there, so the side whose packets go unanswered asks, through the coordinator, that the
    other punch where the coordinator sees it (when bob talks, alice is heard from her new
    port only once she sends something of her own: her keepalive). The stream goes on over
    the same channel, none lost, duplicated or reordered, and bob's side follows alice."""
    async with (
        open_fake_network(0, delay=(ONE_WAY, ONE_WAY)) as net,
        open_lab(net, coord_identity, "cone", "cone") as (alice, bob),
    ):
        clients = {"alice": alice, "bob": bob}
        listener = "bob" if talker == "alice" else "alice"
        with trio.fail_after(PATIENCE):
            await clients[dialler].new_channel("bob" if dialler == "alice" else "alice")
            send, recv = await clients[talker].new_direct_stream(listener)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo, await clients[listener].incoming_streams.receive())
                await talk(send, recv, range(MESSAGES))
                assert bob.statistics().channels["alice"].address == alice.observed_address
                filtered = net.dropped[FILTERED]
                rebind(net.nats[NAT_A])
                await talk(send, recv, range(MESSAGES, 2 * MESSAGES))
                await send.aclose()
                with pytest.raises(trio.EndOfChannel):
                    await recv.receive()
            assert net.dropped[FILTERED] > filtered  # the rebinding did cut the old path
            (new_port,) = [
                port for port, m in net.nats[NAT_A].mappings.items() if m.private[0] == ALICE_IP
            ]
            assert alice.observed_address is not None
            assert new_port != alice.observed_address[1]
            channel = bob.statistics().channels["alice"]
            assert channel.address == (NAT_A, new_port)
            # The same channel all along: it carried the messages of before the rebinding.
            sizes = sum(len(numbered(b"n", i)) for i in range(2 * MESSAGES))
            assert channel.bytes_received >= sizes
            assert alice.statistics().channels["bob"].bytes_received >= sizes
            # alice's coordinator connection followed her too.
            assert alice.connected
            assert sorted(await alice.list_peers()) == ["alice", "bob"]
