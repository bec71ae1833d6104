"""One UDP socket, many QUIC connections: connection-id demux, accepting server-role
connections (with QUIC Retry and version negotiation), and the receive loop.
"""

from __future__ import annotations

import enum
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import trio
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

from .._util import TokenBucket, quiet_aioquic_logs
from ._aioquic import SUPPORTED_VERSIONS, FlowControlledConnection, new_connection
from ._conn import Address, Datagrams, QuicConn
from ._reset import SMALLEST_STATELESS_RESET, stateless_reset_token
from ._udp import DatagramSocket
from .settings import ConnectionSettings

log = logging.getLogger("conec_trio.quic")

CID_LENGTH = 8
# Datagrams read per wakeup before the touched connections transmit (see ``_transmit``).
RECEIVE_BATCH = 32
# A batch that touched at most this many connections finds the endpoint quiet: a relay holds
# the ACK of what it passes on for the answer to carry. In a busy one answers come late, and
# an ACK sent with the batch is cheaper than a timer's wakeup for it (``ack_relayed``).
QUIET_BATCH = 2
SMALLEST_INITIAL = 1200
# Stateless resets we send: never as large as the datagram that caused them (no loops, no
# amplification), at most this large, and at most this many a second (a burst of them, for
# every client of a restarted coordinator at once).
LARGEST_STATELESS_RESET = 43
STATELESS_RESET_RATE = 1000.0
STATELESS_RESET_BURST = 1000


class Admission(enum.Enum):
    """What to do with a new connection's first Initial (``accept_connections(admit=...)``)."""

    ACCEPT = "accept"
    RETRY = "retry"  # make the client prove its address first (QUIC Retry), statelessly
    DROP = "drop"  # ignore it (the client's retransmission may find room later)


# Where a prepared dial's first flight would go: nowhere, until ``connect`` says where.
_NO_ADDRESS = ("0.0.0.0", 0)


class PreparedDial:
    """A client-role connection not yet started (``QuicEndpoint.prepare_dial``); one use."""

    def __init__(self, quic: FlowControlledConnection, settings: ConnectionSettings) -> None:
        self._quic: FlowControlledConnection | None = quic
        self.settings = settings

    def take(self) -> FlowControlledConnection:
        quic = self._quic
        if quic is None:
            raise RuntimeError("a prepared dial is used once")
        self._quic = None
        return quic


class QuicEndpoint:
    """One UDP socket, many QUIC connections (client and server role)."""

    def __init__(self, sock: DatagramSocket, nursery: trio.Nursery) -> None:
        quiet_aioquic_logs()
        self.sock = sock
        self._nursery = nursery
        self._by_cid: dict[bytes, QuicConn] = {}
        self._accept: Callable[[], ConnectionSettings] | None = None
        self._on_accept: Callable[[QuicConn], None] | None = None
        self._retry: QuicRetryTokenHandler | None = None
        self._always_retry = False
        self._admit: Callable[[Address, bool], Admission] | None = None
        self._reset_key: bytes | None = None
        self.reset_budget = TokenBucket(STATELESS_RESET_RATE, STATELESS_RESET_BURST)
        # client-role connections: where a stateless reset from their peer may arrive
        self._dialled: dict[QuicConn, None] = {}
        # connections with something to send at once, before the next receive (see expedite)
        self.urgent: dict[QuicConn, None] = {}
        # connections that send once the batch being handled is (see Transmitting.send_soon)
        self.handling_batch = False
        self.after_batch: dict[QuicConn, None] = {}
        self.held_acks: deque[tuple[float, QuicConn]] = deque()
        self.quiet_batch = True
        # datagrams that are not QUIC (hole punching) go here
        self.raw_datagram_handler: Callable[[bytes, Address], None] | None = None
        self.closed = False  # the receive loop has ended (see run)

    @property
    def local_address(self) -> Address:
        return tuple(self.sock.getsockname())

    def accept_connections(
        self,
        make_settings: Callable[[], ConnectionSettings],
        on_accept: Callable[[QuicConn], None],
        *,
        stateless_retry: bool = False,
        admit: Callable[[Address, bool], Admission] | None = None,
    ) -> None:
        """Serve server-role connections: ``make_settings`` gives the settings of each;
        ``on_accept`` is called with each new connection (before its handshake completes) so
        its owner can set a listener. ``admit(address, validated)`` decides on each new
        connection before any state is made for it (``validated``: it carried a valid Retry
        token); with ``stateless_retry`` every new connection goes through a Retry.
        When the settings carry a ``reset_key``, a short-header datagram for a connection
        id we do not know is answered with a stateless reset (see ``_send_stateless_reset``)."""
        self._reset_key = make_settings().reset_key
        self._accept = make_settings
        self._on_accept = on_accept
        self._always_retry = stateless_retry
        self._admit = admit
        self._retry = QuicRetryTokenHandler() if stateless_retry or admit else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The receive loop: reads batches of datagrams and dispatches them. Once it has
        ended, the endpoint takes no new connection (``connect`` raises)."""
        try:
            await self._receive_loop(task_status)
        finally:
            self.closed = True

    async def _receive_loop(self, task_status: trio.TaskStatus[None]) -> None:
        sock = self.sock
        task_status.started()
        touched: dict[QuicConn, None] = {}
        after_batch = self.after_batch
        while True:
            await sock.wait_readable()
            now = trio.current_time()
            self.handling_batch = True
            try:
                for _ in range(RECEIVE_BATCH):
                    received = sock.recvfrom_nowait()
                    if received is None:
                        break
                    data, addr = received
                    conn = self._dispatch(data, addr, now)
                    if conn is not None:
                        touched[conn] = None
                self.quiet_batch = len(touched) <= QUIET_BATCH
                for conn in touched:
                    if not conn.handshake_confirmed.is_set():
                        # A handshake flight (or its confirmation) is what the peer waits
                        # for: it leaves from here, not a scheduling round later (expedite).
                        self.urgent[conn] = None
                    try:
                        conn.process_events()
                    except Exception:  # a bug or hostile input must not stop the endpoint
                        log.exception("error handling events of %s; closing it", conn.peer_address)
                        conn.close(int(QuicErrorCode.INTERNAL_ERROR), "internal error")
                for conn in touched:
                    if conn in after_batch:
                        continue  # it sends below
                    if not (conn.answer_ping() or conn.leave_to_reader() or conn.stay_parked()):
                        conn.mark_dirty()
            finally:
                self.handling_batch = False
            touched.clear()
            while after_batch:
                conn, _ = after_batch.popitem()
                conn.flush()
            held_acks = self.held_acks
            if held_acks:
                now = trio.current_time()
                while held_acks and held_acks[0][0] <= now:
                    _, conn = held_acks.popleft()
                    conn.send_held_ack(now)
            while self.urgent:
                conn, _ = self.urgent.popitem()
                await conn.transmit(probe=False)

    def _dispatch(self, data: bytes, addr: Address, now: float) -> QuicConn | None:
        conn = self._by_short_header(data)
        if conn is None:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            except ValueError:
                if self.raw_datagram_handler is not None:
                    self.raw_datagram_handler(data, addr)
                return None
            conn = self._by_cid.get(header.destination_cid)
            if conn is not None:
                conn.last_cid = header.destination_cid
            elif header.packet_type == QuicPacketType.ONE_RTT:
                # A stateless reset carries no connection id of ours: it can only be told
                # by its last bytes, which the connections to that address check.
                for dialled in self._dialled:
                    if dialled.peer_address == addr:
                        dialled.datagram_received(data, addr, now)
                        conn = dialled
                if conn is None:
                    self._send_stateless_reset(data, header.destination_cid, addr)
                return conn
            else:
                conn = self._maybe_accept(data, header, addr)
                if conn is None:
                    return None
        try:
            conn.datagram_received(data, addr, now)
        except Exception:
            conn.close(0x1, "internal error handling a datagram")
        return conn

    def _by_short_header(self, data: bytes) -> QuicConn | None:
        """The connection a short-header datagram (what an established connection sends: a
        fixed bit, then our connection id) is for, looked up without parsing a header that
        aioquic parses again: the common case. None: take the general way."""
        if not data or data[0] & 0xC0 != 0x40:
            return None
        cid = data[1 : 1 + CID_LENGTH]
        conn = self._by_cid.get(cid)
        if conn is not None and len(cid) == CID_LENGTH:
            conn.last_cid = cid
            return conn
        return None

    def _send_stateless_reset(self, data: bytes, cid: bytes, addr: Address) -> None:
        """Tell the sender of a short-header packet for a connection id we do not know
        (this process restarted, or the connection is long gone) that the connection is
        lost, so it stops waiting for its idle timeout (RFC 9000 section 10.3). The token is
        the one our predecessor derived from the same key for that id."""
        key = self._reset_key
        if key is None:
            return
        size = min(len(data) - 1, LARGEST_STATELESS_RESET)
        if size < SMALLEST_STATELESS_RESET:
            return  # too small to answer with anything smaller than itself
        token = stateless_reset_token(key, cid)
        if data.endswith(token):
            return  # one of our own resets, reflected back: never answer it
        if not self.reset_budget.take():
            return
        self.send_raw_nowait(_stateless_reset(token, size), addr)

    def announce_reset(self, cid: bytes, addr: Address) -> None:
        """Send a stateless reset for connection id ``cid`` to ``addr`` unasked: a restarted
        server telling a client its predecessor noted (see ``_restart_notes``)."""
        if self._reset_key is not None:
            token = stateless_reset_token(self._reset_key, cid)
            self.send_raw_nowait(_stateless_reset(token, LARGEST_STATELESS_RESET), addr)

    def _maybe_accept(self, data: bytes, header: Any, addr: Address) -> QuicConn | None:
        if self._accept is None or header.packet_type != QuicPacketType.INITIAL:
            return None
        if header.version is not None and header.version not in SUPPORTED_VERSIONS:
            self.send_raw_nowait(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=SUPPORTED_VERSIONS,
                ),
                addr,
            )
            return None
        if len(data) < SMALLEST_INITIAL:
            return None
        original_dcid: bytes = header.destination_cid
        retry_scid: bytes | None = None
        validated = False
        if self._retry is not None and header.token:
            try:
                original_dcid = self._retry.validate_token(
                    address=addr,
                    destination_cid=header.destination_cid,
                    token=header.token,
                    now=trio.current_time(),
                )
            except ValueError:
                return None
            retry_scid = header.destination_cid
            validated = True
        admission = Admission.ACCEPT
        if self._admit is not None:
            admission = self._admit(addr, validated)
            if admission is Admission.DROP:
                return None
        if not validated and (self._always_retry or admission is Admission.RETRY):
            assert self._retry is not None
            source_cid = os.urandom(CID_LENGTH)
            self.send_raw_nowait(
                encode_quic_retry(
                    version=header.version,
                    source_cid=source_cid,
                    destination_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    retry_token=self._retry.create_token(
                        address=addr,
                        original_destination_connection_id=header.destination_cid,
                        retry_source_connection_id=source_cid,
                        now=trio.current_time(),
                    ),
                ),
                addr,
            )
            return None
        settings = self._accept()
        quic = new_connection(
            settings,
            is_client=False,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
        )
        conn = self._add(quic, addr, settings.keepalive_interval)
        self.register_cid(conn, header.destination_cid)
        assert self._on_accept is not None
        self._on_accept(conn)
        return conn

    def connect(self, addr: Address, settings: ConnectionSettings | PreparedDial) -> QuicConn:
        """Start a client-role connection; wait on ``conn.handshake_complete``/``closed``.
        Raises ``trio.ClosedResourceError`` once the endpoint has closed: a task that was
        resumed past its last checkpoint while its owner left (a reconnect between resolving
        and dialling) must not start a connection that nothing would drive."""
        if self.closed:
            raise trio.ClosedResourceError("this endpoint has closed")
        if isinstance(settings, PreparedDial):
            quic = settings.take()
            quic.set_peer_address(addr)
            conn = self._add(quic, addr, settings.settings.keepalive_interval)
        else:
            quic = new_connection(settings, is_client=True)
            conn = self._add(quic, addr, settings.keepalive_interval)
            quic.connect(addr, now=trio.current_time())
        self._dialled[conn] = None
        conn.process_events()
        conn.mark_dirty()
        return conn

    @staticmethod
    def prepare_dial(settings: ConnectionSettings) -> PreparedDial:
        """The costly part of a client-role connection (its TLS state and first flight),
        made while its peer's address is not known yet; ``connect`` takes it."""
        quic = new_connection(settings, is_client=True)
        quic.connect(_NO_ADDRESS, now=trio.current_time())
        return PreparedDial(quic, settings)

    def _add(
        self, quic: FlowControlledConnection, addr: Address, keepalive_interval: float | None
    ) -> QuicConn:
        conn = QuicConn(self, quic, addr, keepalive_interval=keepalive_interval)
        for cid in quic.host_cids():
            self.register_cid(conn, cid)
        self._nursery.start_soon(conn.drive)
        return conn

    def register_cid(self, conn: QuicConn, cid: bytes) -> None:
        self._by_cid[cid] = conn
        conn.cids.add(cid)

    def unregister_cid(self, conn: QuicConn, cid: bytes) -> None:
        if self._by_cid.get(cid) is conn:
            del self._by_cid[cid]
        conn.cids.discard(cid)

    def forget(self, conn: QuicConn) -> None:
        self._dialled.pop(conn, None)
        for cid in list(conn.cids):
            self.unregister_cid(conn, cid)

    # -- sending -----------------------------------------------------------------------------

    def send_raw_nowait(self, data: bytes, addr: Address) -> None:
        """Best-effort immediate send (dropped if the socket is full): stateless replies,
        punch answers."""
        self.sock.sendto_nowait(data, addr)

    def send_nowait(self, datagrams: Datagrams) -> int:
        return self.sock.send_batch_nowait(datagrams, 0)

    async def send_datagrams(self, datagrams: Datagrams) -> None:
        sock = self.sock
        start = 0
        while start < len(datagrams):
            sent = sock.send_batch_nowait(datagrams, start)
            if sent == 0:
                await sock.wait_writable()
            start += sent

    async def send_raw(self, data: bytes, addr: Address) -> None:
        """Send one non-QUIC datagram (hole punching)."""
        await self.send_datagrams([(data, addr)])


def _stateless_reset(token: bytes, size: int) -> bytes:
    unpredictable = bytearray(os.urandom(size - len(token)))
    unpredictable[0] = 0x40 | (unpredictable[0] & 0x3F)  # looks like a short header
    return bytes(unpredictable) + token
