"""NAT rebinding of a connection's server side: the dialling (client-role) side follows its
peer to a new address, but only on a packet that authenticates (a direct channel whose
accepting side's NAT gives it a new public port)."""

from __future__ import annotations

import os
import socket

import trio
import trio.testing
from helpers import wait_for
from test_stateless_reset import DEADLINE, SERVER, identity, settings

from conec_trio._quic import ConnectionListener, QuicConn, QuicEndpoint, make_udp_socket


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
