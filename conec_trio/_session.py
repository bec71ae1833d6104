"""One client as the coordinator sees it (``ClientSession``), and the small helpers the
coordinator's parts share to serve it.

A session knows its owner only through ``SessionOwner``: the config values it needs, where to
hand the streams the client opens, where to say it is gone, and where to count a refusal. The
coordinator imports this module, never the reverse.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import trio

from . import _tls
from ._config import CoordConfig
from ._exceptions import ConecError
from ._punch import candidates_for
from ._quic import QuicConn
from ._streams import StreamState, StreamTable, write_message
from ._util import TokenBucket
from ._wire import control
from ._wire.codes import CloseCode, Reason, StreamCode

log = logging.getLogger("conec_trio.coordinator")

# Channel requests a client may make: a burst, then this many a second. Each one makes its
# target punch (see _punch for the bounds on that), so they are limited at the source too.
CHANNEL_REQUEST_BURST = 20
CHANNEL_REQUEST_RATE = 5.0


def _shown(name: object, limit: int = 100) -> str:
    """A client-chosen name for a message: repr'd, and cut short if long (replies have a
    length limit, and a name's repr can be four times the name)."""
    text = repr(name)
    return text if len(text) <= limit else text[:limit] + "..."


def _clip(text: str) -> str:
    limit = control.MAX_MESSAGE_LEN
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain_host(address: tuple[Any, ...]) -> str:
    host = str(address[0])
    if host.startswith("::ffff:"):  # an IPv4 client on a dual-stack socket
        host = host[len("::ffff:") :]
    return host


def _refuse_stream(st: StreamState, reason: Reason, message: str) -> None:
    """Answer a stream's header with a refusal and end the stream both ways."""
    write_message(st, control.encode(control.StreamRefused(reason, message)))
    st.finish_send()
    st.stop_receiving(StreamCode.REFUSED)


class SessionOwner(Protocol):
    """What a session needs of the coordinator that owns it."""

    @property
    def config(self) -> CoordConfig: ...

    def _stream_opened(self, session: ClientSession, st: StreamState) -> None:
        """The client opened ``st`` (its header may not be here yet)."""

    def _client_gone(self, session: ClientSession, reason: str) -> None:
        """The client's connection ended."""

    def _count_refusal(self, code: CloseCode) -> None:
        """A client was refused with ``code`` (for statistics)."""


class ClientSession:
    """One connected (or connecting) client, as the coordinator sees it."""

    def __init__(self, owner: SessionOwner, conn: QuicConn) -> None:
        self.owner = owner
        self.conn = conn
        self.id: str | None = None
        self.listen = False
        self.local_addrs: list[tuple[str, int]] = []
        self.control: StreamState | None = None
        self.hello_seen = trio.Event()
        self.offers: dict[int, trio.MemorySendChannel[control.ChannelOfferReply]] = {}
        self.channel_requests = TokenBucket(CHANNEL_REQUEST_RATE, CHANNEL_REQUEST_BURST)
        # Counted against its quotas: streams it opened through the coordinator that have
        # not ended both ways, and those of them to the coordinator not yet taken by the
        # application (see _IncomingStreams).
        self.open_streams = 0
        self.pending_opens = 0
        # Counted under CoordConfig.max_pending_connections until its hello (or its end).
        self.pending_host: str | None = None
        self.table = StreamTable(
            conn,
            window=owner.config.stream_window,
            max_message_size=owner.config.max_message_size,
            on_new_stream=self._new_stream,
            on_terminated=self._terminated,
            describe_loss=self._describe_loss,
            relay_budget=owner.config.connection_window,
        )

    @property
    def cert_der(self) -> bytes:
        cert = self.conn.peer_certificate
        return _tls.cert_der(cert) if cert is not None else b""

    @property
    def observed_addr(self) -> tuple[str, int]:
        return (_plain_host(self.conn.peer_address), int(self.conn.peer_address[1]))

    @property
    def candidates(self) -> list[tuple[str, int]]:
        """Where peers may reach this client: as the coordinator sees it, then its own view."""
        # dict.fromkeys: the first of equal addresses, in order, in linear time
        return list(dict.fromkeys([self.observed_addr, *self.local_addrs]))

    def candidates_for(self, viewer: ClientSession) -> list[tuple[str, int]]:
        """Where ``viewer`` may punch and dial this client: the observed address, and this
        client's own private-range addresses only if both share a public IP (see _punch)."""
        return candidates_for(self.observed_addr, self.local_addrs, viewer.observed_addr[0])

    def _describe_loss(self) -> ConecError:
        return ConecError(f"client {self.id!r} disconnected")

    def _new_stream(self, st: StreamState) -> None:
        self.owner._stream_opened(self, st)

    def _terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        self.owner._client_gone(self, reason)

    def refuse(self, code: CloseCode, message: str, claimed: str | None = None) -> None:
        """Close the connection saying why; the log names the client by its id (``claimed``
        when the id is not, or no longer, this session's) and always by its address."""
        name = claimed if claimed is not None else self.id
        host, port = self.observed_addr
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        who = where if name is None else f"{_shown(name)} ({where})"
        log.info("refusing client %s: %s", who, message)
        self.owner._count_refusal(code)
        self.conn.close(int(code), message)


@contextmanager
def _serving(session: ClientSession) -> Iterator[None]:
    """Work on behalf of one client: a failure in it (a bug, or input we did not foresee)
    closes that client's connection, never the coordinator."""
    try:
        yield
    except Exception:
        log.exception("error serving client %r; disconnecting it", session.id)
        session.conn.close(int(CloseCode.PROTOCOL), "internal error serving this client")
