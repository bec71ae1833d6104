"""What a role asks of a QUIC connection, in the library's own types.

Role modules (coordinator, client, direct channels) describe a connection with
``ConnectionSettings``; only ``_quic`` turns that into aioquic's configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

# Path MTU probing raises the datagram size up to this much where the path carries it.
LARGEST_DATAGRAM = 16384


@dataclass(frozen=True, slots=True)
class Identity:
    """A certificate, the chain that goes with it, and its private key."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes


@dataclass(frozen=True, slots=True)
class TrustStore:
    """The CAs a client-role connection checks the server's certificate against (PEM data,
    or a file or folder as OpenSSL takes them)."""

    cadata: bytes | None = None
    cafile: str | None = None
    capath: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """One connection's settings.

    ``identity`` is presented to the peer; a callable makes it when the handshake first
    needs it (a client's ephemeral certificate is made while its first flight is out).
    ``trust`` is for client-role connections: the server's certificate must chain to it and
    be valid for ``server_name``; ``None`` means no check here, because the role pins the
    peer's exact certificate once the handshake is over (direct channels). Server-role
    connections always ask the client for a certificate; roles check it.

    ``reset_key`` (see ``stateless_reset_key``): the stateless reset tokens of our
    connection ids are derived from it instead of random, so that a process restarted with
    the same key can reset its predecessor's connections (RFC 9000 section 10.3). ``None``:
    random tokens, and the endpoint never sends a stateless reset.
    """

    alpn: str
    idle_timeout: float
    stream_window: int
    connection_window: int
    max_streams: int
    max_datagram_size: int = LARGEST_DATAGRAM
    keepalive_interval: float | None = None
    identity: Identity | Callable[[], Identity] | None = None
    server_name: str | None = None
    trust: TrustStore | None = None
    reset_key: bytes | None = None
