"""What ``client.statistics()`` and ``coord.statistics()`` return: snapshots of plain numbers
and strings, taken at the call and never updated afterwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._quic import QuicConn
from ._wire.codes import CloseCode

# The close codes with which a coordinator refuses a client, in the order they are listed.
REFUSAL_CODES = (
    CloseCode.VERSION,
    CloseCode.ID_TAKEN,
    CloseCode.BAD_ID,
    CloseCode.CERTIFICATE,
    CloseCode.LIMIT,
    CloseCode.PROTOCOL,
)


def refusal_name(code: CloseCode) -> str:
    """The key of a refusal in ``CoordinatorStatistics.refused``: ``"id-taken"`` for
    ``CloseCode.ID_TAKEN``."""
    return code.name.lower().replace("_", "-")


def plain_address(addr: tuple[Any, ...]) -> tuple[str, int]:
    """``(host, port)`` of a socket address; an IPv4 peer seen by a dual-stack socket as
    ``::ffff:a.b.c.d`` shows as ``a.b.c.d``."""
    host = str(addr[0])
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    return (host, int(addr[1]))


@dataclass(frozen=True)
class ChannelStatistics:
    """One direct channel of a client, as its QUIC connection sees it now."""

    peer: str
    """The id of the client at the other end."""
    address: tuple[str, int]
    """``(host, port)`` the peer's datagrams come from (its NAT's mapping, if it has one)."""
    rtt: float
    """Smoothed round-trip time in seconds (QUIC's estimate; 0.0 before the first sample)."""
    datagram_size: int
    """The largest UDP payload the channel sends now, in bytes (grows as path MTU probes
    succeed)."""
    bytes_sent: int
    """Stream bytes this client wrote to the channel since it opened, message framing
    included (QUIC's own packet overhead and retransmissions not)."""
    bytes_received: int
    """Stream bytes the channel delivered to this client since it opened, counted the same
    way."""


@dataclass(frozen=True)
class ClientStatistics:
    """A client's view of itself (``client.statistics()``)."""

    id: str
    """This client's id."""
    observed_address: tuple[str, int] | None
    """This client's public ``(host, port)`` as the coordinator sees it (after a NAT, the
    NAT's mapping); None before the coordinator first told it."""
    connected: bool
    """The coordinator connection is up now."""
    channels: dict[str, ChannelStatistics]
    """Every open direct channel, by peer id."""
    direct_failures: dict[str, str]
    """Peers with no open direct channel whose last attempt to open one failed, by id: why
    it failed (the ``ChannelError`` message, which names the cause: the peer does not
    listen, or no address answered, as behind a symmetric NAT). ``new_stream`` goes through
    the coordinator to them until a later attempt succeeds."""
    coordinator_datagram_size: int | None = None
    """The largest UDP payload the coordinator connection sends now, in bytes (grows as path
    MTU probes succeed, falls back when the path stops carrying it); None while not
    connected."""


@dataclass(frozen=True)
class CoordinatorStatistics:
    """A coordinator's view of what it serves (``coord.statistics()``)."""

    clients: int
    """Clients connected now."""
    broadcasts: int
    """Broadcast channels alive now."""
    relayed_streams: int
    """Streams between two clients relayed by the coordinator that have not ended both ways
    (streams to the coordinator itself and broadcast streams are not counted)."""
    relayed_bytes: int
    """Bytes passed on by relayed streams since the coordinator started, both directions,
    message framing included."""
    held_bytes: int
    """Bytes of relayed streams the coordinator holds now for readers that have not taken
    them yet: received from the writer and not passed on, plus passed on and not yet
    acknowledged by the reader. Flow control bounds it per pair of connections, not per
    stream: the writer's connection window on one side, and on the other what the reader's
    connection granted (at most ``connection_window`` waiting to be sent) plus what is in
    flight."""
    pending_connections: int
    """Connections that have not said hello yet (see
    ``CoordConfig.max_pending_connections``)."""
    reply_backlog: int
    """Bytes of control messages (replies, offers) written to clients and not yet
    acknowledged. A client's requests are not read while more than 64 KiB of replies to it
    wait, so each client holds at most that plus one message here."""
    refused: dict[str, int]
    """Clients refused since the coordinator started, by reason: ``"version"``,
    ``"id-taken"``, ``"bad-id"``, ``"certificate"``, ``"limit"`` and ``"protocol"`` (a bad
    hello, or a registered client breaking the control protocol); every reason is present,
    zero if it never happened."""


def channel_statistics(peer: str, conn: QuicConn) -> ChannelStatistics:
    """A snapshot of the direct channel to ``peer`` over ``conn``."""
    return ChannelStatistics(
        peer=peer,
        address=plain_address(conn.peer_address),
        rtt=conn.smoothed_rtt,
        datagram_size=conn.datagram_size,
        bytes_sent=conn.bytes_sent,
        bytes_received=conn.bytes_received,
    )
