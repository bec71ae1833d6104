"""Two of the library's aioquic connections in memory, connected: no sockets, a made-up
clock, datagrams moved by hand (for tests of what one send pass builds)."""

from __future__ import annotations

from typing import Any

from conec_trio import _tls, certs
from conec_trio._quic._aioquic import new_connection
from conec_trio._quic.settings import ConnectionSettings, Identity

SERVER, CLIENT = ("127.0.0.1", 1), ("127.0.0.1", 2)


def _settings() -> ConnectionSettings:
    cert_pem, key_pem = certs.self_signed_cert(["coord"])
    chain = _tls.load_cert_chain_pem(cert_pem)
    identity = Identity(chain[0], tuple(chain[1:]), _tls.load_private_key(key_pem))
    return ConnectionSettings(
        alpn="test",
        idle_timeout=10.0,
        stream_window=1 << 20,
        connection_window=1 << 22,
        max_streams=100,
        identity=identity,
    )


class Pair:
    """A client and a server connection, connected, datagrams moved by hand."""

    def __init__(self) -> None:
        settings = _settings()
        self.now = 1000.0
        self.client = new_connection(settings, is_client=True)
        self.client.connect(SERVER, now=self.now)
        self.server = new_connection(
            settings,
            is_client=False,
            original_destination_connection_id=self.client._peer_cid.cid,
        )
        self.settle()
        assert self.client.handshake_confirmed
        assert self.server.handshake_confirmed

    def settle(self) -> None:
        for _ in range(50):
            self.now += 0.001
            moved = self.to_server(self.client.datagrams_to_send(self.now))
            moved += self.to_client(self.server.datagrams_to_send(self.now))
            if not moved:
                return

    def to_server(self, datagrams: list[tuple[bytes, Any]]) -> int:
        return self._deliver(self.server, datagrams, CLIENT)

    def to_client(self, datagrams: list[tuple[bytes, Any]]) -> int:
        return self._deliver(self.client, datagrams, SERVER)

    def _deliver(self, receiver: Any, datagrams: list[tuple[bytes, Any]], source: Any) -> int:
        """Hand ``datagrams`` from ``source`` to ``receiver`` and drain its events."""
        for data, _ in datagrams:
            receiver.receive_datagram(data, source, self.now)
        while receiver.next_event() is not None:
            pass
        return len(datagrams)

    def ping_server(self) -> None:
        self.now += 1.0
        self.client.send_ping(0)
        assert self.to_server(self.client.datagrams_to_send(self.now)) == 1
