"""Configuration of coordinators and clients (see the public API contract)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ._exceptions import ConfigError, InvalidIdError

PemSource = bytes | str | os.PathLike[str]

DEFAULT_PORT = 1719
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 10.0
# With keepalive on, a PING goes out after this fraction of the idle timeout without traffic:
# half leaves the other half for the PING's loss recovery (several retransmissions at
# internet round-trip times), and each keepalive costs a coordinator one datagram each way.
KEEPALIVE_FRACTION = 0.5
# Per-stream receive window: how many bytes of complete, unread messages a receiver lets a
# sender put in flight.
DEFAULT_STREAM_WINDOW = 1024 * 1024
DEFAULT_CONNECTION_WINDOW = 16 * 1024 * 1024
# Path MTU probing raises the datagram size from QUIC's safe 1200 bytes up to this much where
# the path carries it (loopback, LAN); 1200 turns probing off.
DEFAULT_MAX_DATAGRAM_SIZE = 16384

# A client id must be usable as a certificate DNS name: labels of letters, digits and '-',
# joined by '.'. Always matched with fullmatch: "$" would also match before a final newline.
_ID_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


def check_client_id(client_id: object) -> str:
    """Return ``client_id`` in its canonical form (:func:`canonical_id`) if a certificate DNS
    name can carry it, else raise InvalidIdError."""
    if not isinstance(client_id, str) or len(client_id) > 253 or not _ID_RE.fullmatch(client_id):
        raise InvalidIdError(
            f"client id {client_id!r} is not valid: use letters, digits, '-' and '.' as in a "
            "DNS name (labels of 1-63 characters, not starting or ending with '-')"
        )
    return canonical_id(client_id)


def canonical_id(name: str) -> str:
    """The one form in which ids are registered and compared: lowercase, since certificate
    DNS names match case-insensitively (one certificate for ``alice`` is valid for ``ALICE``).

    Only ASCII letters are folded: ``str.lower`` also maps some other letters onto ASCII ones
    (KELVIN SIGN to ``k``), and a name with any non-ASCII character is never a valid id.
    """
    return name.lower() if name.isascii() else name


def load_pem(source: PemSource | None) -> bytes | None:
    """PEM bytes as given, or read from a path; None stays None."""
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


@dataclass
class CoordConfig:
    """How to run a coordinator (:func:`~conec_trio.open_coordinator`).

    Files are checked when the config is built: a path that cannot be read, PEM that does
    not parse, or a key that does not match its certificate raises
    :class:`~conec_trio.ConfigError` naming the setting.

    Attributes:
        cert_chain: The coordinator's certificate, then any intermediates: PEM bytes, or the
            path of a PEM file. Clients check it against their ``ca`` and ``coord_host``.
        private_key: The private key of ``cert_chain``'s first certificate, unencrypted PEM
            bytes or a path.
        host: The address to bind; ``"::"`` (the default) is every IPv6 and, where the OS
            allows, IPv4 address.
        port: The UDP port to bind (default 1719; 0 picks a free one, see
            :attr:`Coordinator.address <conec_trio.Coordinator.address>`).
        client_ca: If set (PEM bytes or a path), only clients whose certificate this CA signed
            get in; otherwise any certificate valid for the client's id does.
        stateless_retry: Validate a client's address with a QUIC Retry before its connection
            costs any state (one more round trip per connection).
        idle_timeout: Seconds of silence after which a client is dropped (default 10; the
            lower of both sides' settings counts).
        max_message_size: The largest message, in bytes, relayed or received (default 16 MiB).
        max_clients: Clients connected at once; one more is refused.
        max_streams_per_client: QUIC stream credit of each client (the control stream
            included); opens beyond it wait for one of the client's streams to end.
        max_broadcasts: Broadcast channels at once; one more is refused.
        max_pending_opens: Streams opened to the coordinator that ``incoming_streams`` holds
            before the application takes them; more wait in line.
        max_broadcasts_per_client: Broadcast channels one client is a member of at once
            (created or joined; joining the same channel twice counts twice).
        max_open_streams_per_client: Streams one client has open through the coordinator at
            once (relayed to a client, or to the coordinator itself).
        max_pending_opens_per_client: Streams one client opened to the coordinator that the
            application has not taken yet, so one client cannot keep the others waiting.
            Beyond any ``*_per_client`` quota the client's next open is refused
            (:class:`~conec_trio.RefusedError`, naming the quota) until one of its own ends.
        stream_window: Bytes of complete, unread messages a sender may have in flight on one
            stream (flow control).
        connection_window: The same for all streams of one connection together.
        max_datagram_size: The largest UDP datagram path MTU probing tries (1200 turns
            probing off).
        hello_timeout: Seconds a client may take to say hello after connecting; then it is
            dropped.
        max_pending_connections: Connections that have not said hello yet (handshaking, or
            connected and silent), in all; beyond it new connections are ignored until one
            of them says hello or is dropped (each costs tens of KiB until then; default 512).
        max_pending_connections_per_address: The same, from one IP address (default 256).
        retry_above_pending: Above this many pending connections, a new one must first prove
            its address with a QUIC Retry round trip, so spoofed packets make no state
            (default 256; ``stateless_retry=True`` asks for it always).
        restart_notes: A file (path) where the coordinator keeps its clients' addresses up to
            date (every 2 s). A coordinator started with the same file and private key after
            a crash tells every client in it at once that its session is gone (a QUIC
            stateless reset), so they reconnect within moments instead of at their next
            keepalive (up to half the idle timeout later). ``None`` (the default): no notes.
    """

    cert_chain: PemSource
    private_key: PemSource
    host: str = "::"
    port: int = DEFAULT_PORT
    client_ca: PemSource | None = None
    stateless_retry: bool = False
    idle_timeout: float | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_clients: int = 10_000
    max_streams_per_client: int = 10_000
    max_broadcasts: int = 10_000
    max_pending_opens: int = 1_000
    max_broadcasts_per_client: int = 100
    max_open_streams_per_client: int = 1_000
    max_pending_opens_per_client: int = 100
    stream_window: int = DEFAULT_STREAM_WINDOW
    # Per-client budget of relayed bytes, however many streams: the coordinator holds at
    # most this much received from a client and not yet passed on, and hands a reader no
    # more than its connection granted, with at most this much of it waiting to be sent.
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE
    hello_timeout: float = 10.0
    max_pending_connections: int = 512
    max_pending_connections_per_address: int = 256
    retry_above_pending: int = 256
    restart_notes: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        check_files(self, ("cert_chain", "private_key", "client_ca"))
        check_identity(self.cert_chain, self.private_key)


@dataclass
class ClientConfig:
    """How a client connects (:func:`~conec_trio.open_client`).

    Files are checked when the config is built: a path that cannot be read, PEM that does
    not parse, or a key that does not match its certificate raises
    :class:`~conec_trio.ConfigError` naming the setting.

    Attributes:
        id: This client's name, unique among the coordinator's clients: letters, digits,
            ``-`` and ``.``, as in a DNS name (else :class:`~conec_trio.InvalidIdError`).
        coord_host: The coordinator's host name or address; its certificate must be valid for
            it (default ``"localhost"``).
        coord_port: The coordinator's UDP port (default 1719).
        ca: The CA (or the coordinator's self-signed certificate) that the coordinator's
            certificate must chain to, PEM bytes or a path; None uses the system trust store.
        cert_chain: This client's certificate (then any intermediates), PEM bytes or a path.
            None (the default) makes an ephemeral self-signed certificate for ``id``.
        private_key: The private key of ``cert_chain``, unencrypted PEM bytes or a path; given
            with ``cert_chain`` or not at all.
        client_ca: The CA that peers' certificates must chain to for direct channels: set it
            to the coordinator's ``client_ca`` when the coordinator has one.
        listen: Accept direct channels from peers (if False, streams to this client go
            through the coordinator).
        holepunch: Try UDP hole punching when a direct channel is opened.
        keepalive: Send a PING after half the idle timeout without traffic, so that NAT
            mappings and the connection stay up.
        idle_timeout: Seconds of silence after which a connection is dropped (default 10; the
            lower of both sides' settings counts).
        max_message_size: The largest message, in bytes, this client sends or receives
            (default 16 MiB).
        max_streams: QUIC stream credit granted to each peer connection.
        stream_window: Bytes of complete, unread messages a sender may have in flight on one
            stream (flow control).
        connection_window: The same for all streams of one connection together.
        max_datagram_size: The largest UDP datagram path MTU probing tries (1200 turns
            probing off).
        connect_timeout: Seconds :func:`~conec_trio.open_client` waits for the coordinator
            before giving up with :class:`~conec_trio.ConnectError`.
        reconnect: After losing the coordinator, connect again by itself from the same
            socket (jittered backoff, 0.2 s doubling to 5 s) while direct channels go on
            (default True); False: a loss is final.
        direct_head_start: Seconds ``new_stream`` gives a direct channel before it returns a
            proxied stream, which moves onto the channel once it is up (default 0.3).
    """

    id: str
    coord_host: str = "localhost"
    coord_port: int = DEFAULT_PORT
    ca: PemSource | None = None
    cert_chain: PemSource | None = None
    private_key: PemSource | None = None
    client_ca: PemSource | None = None
    listen: bool = True
    holepunch: bool = True
    keepalive: bool = True
    idle_timeout: float | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_streams: int = 10_000
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE
    connect_timeout: float = 10.0
    reconnect: bool = True
    direct_head_start: float = 0.3

    def __post_init__(self) -> None:
        check_files(self, ("ca", "cert_chain", "private_key", "client_ca"))
        if (self.cert_chain is None) != (self.private_key is None):
            missing = "private_key" if self.private_key is None else "cert_chain"
            raise ConfigError(missing, "cert_chain and private_key go together: give both")
        if self.cert_chain is not None and self.private_key is not None:
            check_identity(self.cert_chain, self.private_key)


def check_files(config: object, settings: tuple[str, ...]) -> None:
    """Each of ``settings`` that is a path must name a readable PEM file (ConfigError)."""
    for setting in settings:
        source = getattr(config, setting)
        if source is None or isinstance(source, bytes):
            continue
        if not isinstance(source, str | os.PathLike):
            raise ConfigError(setting, f"expected PEM bytes or a path, not {type(source).__name__}")
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError(setting, f"cannot read {source}: {exc.strerror or exc}") from exc
        if b"-----BEGIN" not in data:
            raise ConfigError(setting, f"{source} is not a PEM file")


def check_identity(cert_chain: PemSource, private_key: PemSource) -> None:
    """The first certificate of ``cert_chain`` and ``private_key`` must parse and belong
    together: a mismatch would otherwise only show as a failed TLS handshake."""
    cert_pem, key_pem = load_pem(cert_chain), load_pem(private_key)
    assert cert_pem is not None and key_pem is not None
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise ConfigError("cert_chain", f"not a PEM certificate: {exc}") from exc
    try:
        if key_pem.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(key_pem, password=None)
        else:  # the library has always taken DER keys too
            key = serialization.load_der_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError("private_key", f"not an unencrypted PEM private key: {exc}") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(
            "private_key",
            f"key does not match certificate (cert_chain: {cert.subject.rfc4514_string()})",
        )
