"""Configuration of coordinators and clients (see the public API contract)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ._exceptions import InvalidIdError

PemSource = bytes | str | os.PathLike[str]

DEFAULT_PORT = 1719
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 10.0
# With keepalive on, a PING goes out after this fraction of the idle timeout without traffic:
# half leaves the other half for the PING's loss recovery (several retransmissions at
# internet round-trip times), and each keepalive costs a coordinator one datagram each way.
KEEPALIVE_FRACTION = 0.5
# Per-stream receive window: how many bytes of complete, unread messages a receiver lets a
# sender put in flight. The relay holds at most about two windows per direction per stream.
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


def read_pem_option(path: str | os.PathLike[str] | None, option: str) -> bytes | None:
    """The PEM file a command-line option names (None stays None); ``ValueError`` saying
    which option is wrong if it cannot be read or is not PEM."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{option}: cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise ValueError(f"{option}: {path} is not a PEM file")
    return data


@dataclass
class CoordConfig:
    """How to run a coordinator. ``cert_chain``/``private_key``: PEM bytes or a path."""

    cert_chain: PemSource
    private_key: PemSource
    host: str = "::"
    port: int = DEFAULT_PORT
    client_ca: PemSource | None = None
    stateless_retry: bool = False
    idle_timeout: float | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    # Limits on the whole coordinator. A client beyond max_clients is refused; opens beyond
    # max_streams_per_client (QUIC stream credit, the control stream included) wait for one
    # of the client's streams to end; a broadcast channel beyond max_broadcasts is refused;
    # streams to the coordinator beyond the max_pending_opens that incoming_streams holds
    # wait in line for the application to take them.
    max_clients: int = 10_000
    max_streams_per_client: int = 10_000
    max_broadcasts: int = 10_000
    max_pending_opens: int = 1_000
    # Quotas of each client, below the limits above, so that one client cannot take what is
    # meant for all (the others keep working). Beyond one, the client's next open is refused
    # (RefusedError, naming the quota) until one of its own ends.
    # Broadcast channels a client is a member of at once, created or joined (joining the
    # same channel twice counts twice).
    max_broadcasts_per_client: int = 100
    # Streams a client has open through the coordinator at once: relayed to a client and to
    # the coordinator itself (broadcast streams count under max_broadcasts_per_client).
    max_open_streams_per_client: int = 1_000
    # Streams a client opened to the coordinator that the application has not yet taken from
    # incoming_streams (so one client cannot fill its queue and keep others waiting).
    max_pending_opens_per_client: int = 100
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE
    # A client that has not said hello this long after connecting is dropped.
    hello_timeout: float = 10.0


@dataclass
class ClientConfig:
    """How a client connects. With no ``cert_chain`` it makes an ephemeral self-signed cert."""

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
    # How long open_client waits for the coordinator before giving up (ConnectError).
    connect_timeout: float = 10.0
    # Seconds new_stream gives a direct channel before it returns a proxied stream (which
    # moves onto the channel once it is up), as in Happy Eyeballs.
    direct_head_start: float = 0.3
