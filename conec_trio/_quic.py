"""A Trio UDP endpoint driving aioquic's sans-IO ``QuicConnection``.

This is the only module that touches aioquic internals and UDP sockets. One socket serves
client-role and server-role connections alike (demultiplexed by connection id), because a
client must accept direct channels on the very socket (and so the very NAT mapping) it talks
to the coordinator from.

Performance shape: the receive loop drains a batch of datagrams per wakeup, feeds them all to
their connections, and only then lets each touched connection transmit once. Writers never
transmit themselves; they mark their connection dirty and its driver task sends, so several
small messages written in one scheduling round share packets.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from typing import Any, Protocol

import trio
from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import END_STATES, QuicConnection, QuicConnectionState
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.retry import QuicRetryTokenHandler
from cryptography import x509

from . import _tls
from ._config import KEEPALIVE_FRACTION

log = logging.getLogger("conec_trio.quic")

CID_LENGTH = 8
# UDP generic segmentation offload (Linux >= 4.18): constants are not in the socket module.
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64  # the kernel's limit per send
GSO_MAX_BYTES = 65_000  # one send carries at most a 64 KiB datagram's worth
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_PROBE = getattr(socket, "IP_PMTUDISC_PROBE", 3)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_PROBE = getattr(socket, "IPV6_PMTUDISC_PROBE", 3)
GSO_SUPPORTED = sys.platform == "linux" and os.environ.get("CONEC_TRIO_NO_GSO", "") == ""
# Datagrams read per wakeup before the touched connections transmit (see module docstring).
RECEIVE_BATCH = 32
# Small writes wait up to this many scheduling rounds, or until this many bytes are pending,
# before the connection transmits (see QuicConn._coalesce).
# Path MTU probing (RFC 8899 style): datagram sizes tried in turn once the handshake is
# confirmed; each becomes the sending size when a probe of that size is acknowledged.
# Loopback and LAN paths end up with large datagrams, internet paths stay at what works.
PMTU_LADDER = (1452, 4096, 8952, 16384)
PMTU_PROBE_TIMEOUT = 1.0  # a probe not acknowledged by then is taken as too large
# Probing starts once this much stream data was written: large datagrams pay off for bulk
# transfers only, so idle and chatty connections (most of a coordinator's) never probe.
PMTU_AFTER_BYTES = 64 * 1024
# How long closing waits for the CONNECTION_CLOSE datagram to leave.
CLOSE_SEND_TIMEOUT = 1.0
# aioquic timers that do not move after being handled are retried this much later.
TIMER_GRANULARITY = 0.001
COALESCE_ROUNDS = 256
COALESCE_BYTES = 16 * 1200
MAX_UDP_PAYLOAD = 65_535
SMALLEST_INITIAL = 1200
# aioquic gives every connection three 16 KiB buffers for TLS handshake output. Once the
# handshake is over, TLS writes nothing more on a QUIC connection (no tickets are issued, key
# updates are QUIC's own), so they shrink to this.
POST_HANDSHAKE_CRYPTO_BUFFER = 1024
# aioquic builds a frame-type -> allowed-epochs table per connection; the epoch sets are the
# same for every connection, so all connections share one copy of each.
_SHARED_EPOCH_SETS: dict[frozenset[Any], frozenset[Any]] = {}


class _ClientTlsContext(tls.Context):
    """aioquic's TLS context with its check of the server's certificate replaced by the same
    check on a trust store made once (``_tls.verify_server_certificate``): aioquic rebuilds
    the store in every handshake, which costs a tenth of a millisecond with one CA and over
    ten with the system's CAs."""

    # Gives (certificate, chain, private key) when the server asks for them and the
    # configuration had none yet: a client may make its identity during the handshake.
    identity: Callable[[], tuple[x509.Certificate, list[x509.Certificate], Any]] | None = None

    def _client_handle_finished(self, input_buf: Buffer, output_buf: Any) -> None:
        if self.certificate is None and self.identity is not None:
            self.certificate, self.certificate_chain, self.certificate_private_key = self.identity()
        super()._client_handle_finished(input_buf, output_buf)

    def _client_handle_certificate_verify(self, input_buf: Buffer) -> None:
        verify = tls.pull_certificate_verify(input_buf)
        self._check_certificate_verify_signature(verify)
        if self._verify_mode != ssl.CERT_NONE:
            assert self._peer_certificate is not None
            try:
                _tls.verify_server_certificate(
                    self._peer_certificate,
                    self._peer_certificate_chain,
                    self._server_name,
                    self._cadata,
                    self._cafile,
                    self._capath,
                )
            except _tls.ServerCertificateError as exc:
                expired = exc.kind == "expired"
                alert = tls.AlertCertificateExpired if expired else tls.AlertBadCertificate
                raise alert(str(exc)) from exc
        assert self.key_schedule is not None
        self.key_schedule.update_hash(input_buf.data)
        self._set_state(tls.State.CLIENT_EXPECT_FINISHED)


class FlowControlledConnection(QuicConnection):
    """aioquic's connection with two changes this library relies on.

    1. Server side: asks the client for a certificate (aioquic has no public switch). aioquic
       then checks the client's CertificateVerify signature (proof of the key) and keeps the
       cert; chain, name and pin checks are ours (see ``_tls``).
    2. Receive credit follows what the application consumed, not what arrived. aioquic raises
       MAX_STREAM_DATA / MAX_DATA as soon as data is received, so a reader that stops reading
       would never slow its sender. Here credit is ``consumed + window``, which gives
       end-to-end backpressure with memory bounded by the window.
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        request_client_certificate: bool,
        stream_window: int,
        connection_window: int,
        max_streams: int,
        max_datagram_size: int = PMTU_LADDER[-1],
        identity: Callable[[], tuple[x509.Certificate, list[x509.Certificate], Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._request_client_cert = request_client_certificate
        self._identity = identity
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._stream_consumed: dict[int, int] = {}
        self._consumed_total = 0
        self.delivered_total = 0  # stream bytes handed to the application layer
        self.written_total = 0  # stream bytes the application layer wrote
        self._ping_received = False  # a PING arrived in the datagram being processed
        self.ack_due = False  # ... and its ACK has not been built yet
        self._ack_only_kept: int | None = None  # see _forget_ack_only
        self._handshake_trimmed = False
        super().__init__(configuration=configuration, **kwargs)
        handlers = self._QuicConnection__frame_handlers  # type: ignore[attr-defined]
        for frame_type, (handler, epochs) in handlers.items():
            handlers[frame_type] = (handler, _SHARED_EPOCH_SETS.setdefault(epochs, epochs))
        limit = self._local_max_streams_bidi
        limit.value = limit.sent = max_streams
        # sizes path MTU probing will try, in order
        self._pmtu_ladder = [size for size in PMTU_LADDER if size <= max_datagram_size]
        self._pmtu_next = 0  # index into the ladder of the next size to try
        self._pmtu_probe_deadline: float | None = None  # a probe is in flight until then

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if self._request_client_cert:
            self.tls._request_client_certificate = True
        if self._is_client:
            context = self.tls
            context.__class__ = _ClientTlsContext
            assert isinstance(context, _ClientTlsContext)
            context.identity = self._identity
            # aioquic makes a key share for each of four groups (P-256, P-384, X25519, X448)
            # in every ClientHello, about 0.5 ms of key generation, and an aioquic server
            # takes the first one it supports, P-256, anyway: offer only that one.
            self.tls._supported_groups = [tls.Group.SECP256R1]

    def _handle_padding_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        # aioquic skips padding one byte at a time in Python: half a millisecond for each
        # 16 KiB path MTU probe, on top of every padded Initial. The same, in C.
        pos = buf.tell()
        rest = buf.data_slice(pos, buf.capacity)
        buf.seek(pos + len(rest) - len(rest.lstrip(b"\x00")))
        if self._quic_logger is not None:
            context.quic_logger_frames.append(self._quic_logger.encode_padding_frame())

    # -- idle cost: acknowledgements and per-connection state ------------------------------

    def _handle_ping_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        super()._handle_ping_frame(context, frame_type, buf)
        self._ping_received = True

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        super().receive_datagram(data, addr, now)
        if self._ping_received:
            # A PING (a keepalive, a loss probe, a path MTU probe) is acknowledged at once:
            # no data will follow to share the ACK with, and waiting aioquic's ack delay
            # would cost a second wakeup for every keepalive.
            self._ping_received = False
            space = self._spaces.get(tls.Epoch.ONE_RTT)
            if space is not None and space.ack_at is not None:
                space.ack_at = now
                self.ack_due = True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        first = self._packet_number
        datagrams: list[tuple[bytes, Any]] = super().datagrams_to_send(now)
        if self._packet_number != first:
            self._forget_ack_only(first)
        if not self._handshake_trimmed:
            self._trim_after_handshake()
        return datagrams

    def _forget_ack_only(self, first: int) -> None:
        """Keep only the newest of the packets sent from ``first`` on that carry nothing but
        ACKs. aioquic keeps every sent packet until it is acknowledged or declared lost, but
        a peer never acknowledges a packet of ACKs alone unless it has something of its own
        to send, and loss is only declared below the highest acknowledged packet: an idle
        connection answering keepalives would keep every ACK it ever sent. The newest one is
        kept so that its acknowledgement, if one comes, still prunes our ACK ranges."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is None:
            return
        sent = space.sent_packets
        for number in range(first, self._packet_number):
            packet = sent.get(number)
            if packet is None or packet.is_ack_eliciting or packet.in_flight:
                continue
            if self._ack_only_kept is not None:
                sent.pop(self._ack_only_kept, None)
            self._ack_only_kept = number

    def _trim_after_handshake(self) -> None:
        """Once the Initial and Handshake epochs are discarded, drop what only the handshake
        needed (about 50 KiB of buffers per connection)."""
        spaces = self._spaces
        initial = spaces.get(tls.Epoch.INITIAL)
        handshake = spaces.get(tls.Epoch.HANDSHAKE)
        if initial is None or handshake is None or not (initial.discarded and handshake.discarded):
            return
        self._handshake_trimmed = True
        buffers = self._crypto_buffers
        buffers[tls.Epoch.INITIAL] = Buffer(capacity=0)
        buffers[tls.Epoch.HANDSHAKE] = Buffer(capacity=0)
        buffers[tls.Epoch.ONE_RTT] = Buffer(capacity=POST_HANDSHAKE_CRYPTO_BUFFER)

    # -- consumption-based flow control --------------------------------------------------

    def add_consumed(self, stream_id: int, nbytes: int) -> bool:
        """Record that the application consumed ``nbytes`` more of a stream.

        Returns True when the new credit is worth announcing now (a quarter window).
        """
        consumed = self._stream_consumed.get(stream_id, 0) + nbytes
        self._stream_consumed[stream_id] = consumed
        self._consumed_total += nbytes
        stream = self._streams.get(stream_id)
        if stream is None or not stream.max_stream_data_local:
            return False
        return consumed + self._stream_window - stream.max_stream_data_local >= (
            self._stream_window // 4
        )

    def add_discarded(self, nbytes: int) -> bool:
        """Bytes that arrived for a stream nobody reads any more: their credit comes back."""
        self._consumed_total += nbytes
        return nbytes > 0

    def forget_stream(self, stream_id: int) -> None:
        self._stream_consumed.pop(stream_id, None)

    def ack_with_next_packet(self, now: float) -> None:
        """Acknowledge what arrived in the next packet we build instead of after aioquic's
        ack delay: a reply then carries the ACK, where aioquic would send the reply without
        it and an ACK-only packet a millisecond later (RFC 9000 13.2.1 allows both)."""
        space = self._spaces[tls.Epoch.ONE_RTT]
        if space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if stream.max_stream_data_local:
            target = self._stream_consumed.get(stream.stream_id, 0) + self._stream_window
            if target > stream.max_stream_data_local:
                stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return  # nothing to announce (runs for every stream in every packet)
        # aioquic doubles the limit when half of it has *arrived*; hide the arrival offset
        # for this call so only the frame writing runs.
        receiver = stream.receiver
        highest = receiver.highest_offset
        receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        max_data = self._local_max_data
        # Bytes aioquic counted but never delivered (a reset's final size, gaps) are not
        # held by anyone: only delivered-and-unconsumed bytes hold connection credit.
        held = self.delivered_total - self._consumed_total
        target = max_data.used - held + self._connection_window
        if target > max_data.value:
            max_data.value = target
        bidi, uni = self._local_max_streams_bidi, self._local_max_streams_uni
        if max_data.value == max_data.sent and bidi.value == bidi.sent and uni.value == uni.sent:
            return  # nothing to announce (runs for every packet)
        used = max_data.used
        max_data.used = 0  # same trick as above: no doubling on arrival
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = used

    # -- path MTU probing -------------------------------------------------------------------

    def pmtu_timer(self) -> float | None:
        return self._pmtu_probe_deadline

    def pmtu_probe(self, now: float) -> tuple[bytes, Any] | None:
        """A padded PING datagram of the next size to try, if one is due now."""
        if self._pmtu_probe_deadline is not None:
            if now < self._pmtu_probe_deadline:
                return None
            self._pmtu_probe_deadline = None  # no answer: too large for this path
            self._pmtu_next = len(self._pmtu_ladder)
            return None
        if (
            self._pmtu_next >= len(self._pmtu_ladder)
            or self.written_total < PMTU_AFTER_BYTES
            or not self._handshake_confirmed
            or self._state in END_STATES
        ):
            return None
        size = self._pmtu_ladder[self._pmtu_next]
        if size <= self._max_datagram_size:
            self._pmtu_next += 1
            return None
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            peer_token=self._peer_token,
            quic_logger=None,
            spin_bit=self._spin_bit,
            version=self._version,  # type: ignore[arg-type]  # set once connected
        )
        builder.max_flight_bytes = size
        builder.start_packet(QuicPacketType.ONE_RTT, self._cryptos[tls.Epoch.ONE_RTT])
        builder.start_frame(QuicFrameType.PING, handler=self._on_pmtu_probe, handler_args=(size,))
        builder._datagram_needs_padding = True  # pad this 1-RTT packet up to ``size``
        datagrams, packets = builder.flush()
        if not datagrams:
            return None
        self._packet_number = builder.packet_number
        space = self._spaces[tls.Epoch.ONE_RTT]
        for packet in packets:
            packet.sent_time = now
            packet.in_flight = False  # a lost probe says nothing about congestion
            self._loss.on_packet_sent(packet=packet, space=space)
        self._pmtu_probe_deadline = now + PMTU_PROBE_TIMEOUT
        return datagrams[0], self._network_paths[0].addr

    def _on_pmtu_probe(self, delivery: QuicDeliveryState, size: int) -> None:
        if self._pmtu_probe_deadline is None:
            return  # answered after we gave up on it
        self._pmtu_probe_deadline = None
        if delivery == QuicDeliveryState.ACKED:
            self._max_datagram_size = max(self._max_datagram_size, size)
            self._pmtu_next += 1
        else:
            self._pmtu_next = len(self._pmtu_ladder)

    # -- small read-only views used by the stream layer -----------------------------------

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to a stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def fin_acked(self, stream_id: int) -> bool:
        """True when the stream's send side is done (FIN or reset acknowledged, or gone)."""
        stream = self._streams.get(stream_id)
        return stream is None or bool(stream.sender.is_finished)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        cert: x509.Certificate | None = self.tls._peer_certificate
        return cert

    @property
    def peer_certificate_chain(self) -> list[x509.Certificate]:
        return list(getattr(self.tls, "_peer_certificate_chain", []) or [])


class ConnectionListener:
    """What a connection's owner hears. All callbacks run synchronously in the endpoint."""

    def handshake_completed(self, conn: QuicConn) -> None:
        """The TLS handshake finished."""

    def stream_data(self, conn: QuicConn, stream_id: int, data: bytes, fin: bool) -> None:
        """Data (possibly empty, possibly with FIN) arrived on a stream."""

    def stream_reset(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        """The peer reset its send side of a stream."""

    def stop_sending(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        """The peer no longer reads a stream (STOP_SENDING)."""

    def send_progress(self, conn: QuicConn) -> None:
        """Acknowledgements or credit arrived: blocked writers may go on."""

    def terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        """The connection is closed (by either side, or by idle timeout)."""


class QuicConn:
    """One QUIC connection on an endpoint, with its driver task."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        quic: FlowControlledConnection,
        peer_address: tuple[Any, ...],
        *,
        keepalive_interval: float | None,
    ) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.peer_address = peer_address
        self.listener: ConnectionListener = ConnectionListener()
        self.handshake_complete = trio.Event()
        # Client role: the server confirmed the handshake (HANDSHAKE_DONE), so it accepted
        # our certificate too. Server role: same moment as handshake_complete.
        self.handshake_confirmed = trio.Event()
        self.closed = trio.Event()
        # The handshake was confirmed, or the connection closed: one event to wait on.
        self.settled = trio.Event()
        self.close_error_code: int | None = None
        self.close_reason = ""
        self._keepalive_interval = keepalive_interval
        self._cids: set[bytes] = set()
        self._dirty = False
        self._pending_bytes = 0  # stream bytes written since the last transmit
        self._delivered = False  # stream data went to readers since the last transmit
        self._unsent = False  # something happened since the last transmit that may need one
        self._transmitting = False  # the driver is waiting for the socket in transmit()
        self._backlog: list[tuple[bytes, tuple[Any, ...]]] = []  # built, not yet sent
        self._deferred: list[tuple[int, Callable[[int, int], None], int]] = []
        self._wakeup = trio.lowlevel.ParkingLot()
        self._last_activity = trio.current_time()
        self._handled_timer = -math.inf  # when the driver last ran aioquic's timer
        self._parked: trio.CancelScope | None = None  # the idle driver's wait, if it waits

    # -- called by the stream layer --------------------------------------------------------

    @property
    def is_client(self) -> bool:
        return bool(self.quic._is_client)

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    def next_stream_id(self) -> int:
        return int(self.quic.get_next_available_stream_id())

    def send_stream_data(
        self, stream_id: int, data: bytes, end_stream: bool = False, *, wake: bool = True
    ) -> None:
        """Queue stream data; ``wake=False`` when the caller ends with ``send_now``."""
        self.quic.send_stream_data(stream_id, data, end_stream)
        self.quic.written_total += len(data)
        self._pending_bytes += len(data)
        if wake:
            self.mark_dirty()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self._held_back(stream_id, self.quic.reset_stream, error_code):
            return
        try:
            self.quic.reset_stream(stream_id, error_code)
        except ValueError:
            return  # already finished or never opened on our side: nothing to reset
        self.mark_dirty()

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        if self._held_back(stream_id, self.quic.stop_stream, error_code):
            return
        try:
            self.quic.stop_stream(stream_id, error_code)
        except ValueError:
            return
        self.mark_dirty()

    def _held_back(self, stream_id: int, action: Callable[[int, int], None], code: int) -> bool:
        """A stream still waiting for the peer's stream credit must not be reset yet: the
        peer would see a stream id over its limit and close the whole connection. The
        action runs once the stream may exist (see ``_run_deferred``)."""
        stream = self.quic._streams.get(stream_id)
        if stream is None or not stream.is_blocked:
            return False
        self._deferred.append((stream_id, action, code))
        return True

    def _run_deferred(self) -> None:
        waiting = []
        for stream_id, action, code in self._deferred:
            stream = self.quic._streams.get(stream_id)
            if stream is not None and stream.is_blocked:
                waiting.append((stream_id, action, code))
                continue
            with contextlib.suppress(ValueError):
                action(stream_id, code)
        self._deferred = waiting

    def add_consumed(self, stream_id: int, nbytes: int) -> None:
        if self.quic.add_consumed(stream_id, nbytes):
            self.mark_dirty()

    def discard_received(self, nbytes: int) -> None:
        if self.quic.add_discarded(nbytes):
            self.mark_dirty()

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Start closing (CONNECTION_CLOSE goes out with the next transmit); the owner
        hears ``terminated`` at once."""
        if self.quic._state not in (
            QuicConnectionState.CLOSING,
            QuicConnectionState.DRAINING,
            QuicConnectionState.TERMINATED,
        ):
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.process_events()
        self.mark_dirty()

    def close_now(self, error_code: int, reason: str) -> None:
        """Close and send CONNECTION_CLOSE at once, without waiting (best effort): for when
        the driver is being cancelled and will not transmit again."""
        self.close(error_code, reason)
        with contextlib.suppress(Exception):
            self._send_built()

    def expedite(self) -> None:
        """Transmit what was written at the next opportunity, without waiting for more
        writes to join it: for a message the peer waits on before anything else (the
        registration hello and its welcome, a dial on a punch). Written while the endpoint
        handles received datagrams, it leaves from there, before any other task runs."""
        self._pending_bytes = 0
        self.endpoint._urgent[self] = None
        self.mark_dirty()

    def mark_dirty(self) -> None:
        """Ask the driver to transmit soon (coalesces with other writes this round)."""
        self._unsent = True
        if not self._dirty:
            self._dirty = True
            self._wakeup.unpark_all()

    # -- driver ------------------------------------------------------------------------------

    async def drive(self) -> None:
        """Handle timers and transmit until aioquic says the connection is over.

        A closing connection lingers here for its closing period (answering late packets
        with CONNECTION_CLOSE) although its owner was told at once that it is closed.
        """
        quic = self.quic
        try:
            while quic._state != QuicConnectionState.TERMINATED:
                if not self._dirty:
                    with trio.move_on_at(self._next_deadline()) as self._parked:
                        await self._wakeup.park()
                    if self._parked.cancelled_caught:
                        self._unsent = True
                    self._parked = None
                await self._coalesce()
                self._dirty = False
                now = trio.current_time()
                timer = quic.get_timer()
                if timer is not None and now >= timer and now > self._handled_timer:
                    self._handled_timer = now
                    quic.handle_timer(now)
                    self._unsent = True
                keepalive = self._keepalive_interval_now()
                if keepalive is not None and now >= self._last_activity + keepalive:
                    quic.send_ping(0)
                    # Counted as activity even if congestion holds the PING back for now.
                    self._last_activity = now
                    self._unsent = True
                self.process_events()
                if self._unsent:  # else a writer has sent it all already (send_now)
                    await self.transmit()
        finally:
            # Cancelled (the owner's block ended abruptly): still say goodbye, so the peer
            # does not have to wait for its idle timeout.
            self.close_now(0, "endpoint shut down")
            self.endpoint._forget(self)

    def _next_deadline(self) -> float:
        """When the idle driver must wake: aioquic's timer, a keepalive, a path MTU probe."""
        quic = self.quic
        deadline = quic.get_timer()
        if deadline is None:
            deadline = math.inf
        elif deadline <= self._handled_timer:
            # aioquic can leave its loss timer at the instant just handled (float
            # rounding); waiting for the clock to move avoids a spin.
            deadline = self._handled_timer + TIMER_GRANULARITY
        keepalive = self._keepalive_interval_now()
        if keepalive is not None:
            deadline = min(deadline, self._last_activity + keepalive)
        probe_deadline = quic.pmtu_timer()
        if probe_deadline is not None:
            deadline = min(deadline, probe_deadline)
        return deadline

    def answer_ping(self) -> bool:
        """Called by the endpoint after feeding a batch of datagrams. If they carried a PING
        (a keepalive, mostly) and the driver is idle with nothing else to send, the ACK goes
        out right here and the driver's wait is moved to the new deadline: one wakeup per
        keepalive instead of two. False: the driver must run (``mark_dirty``)."""
        quic = self.quic
        if not quic.ack_due:
            return False
        quic.ack_due = False
        parked = self._parked
        if parked is None or self._dirty or self._pending_bytes or self._deferred:
            return False
        try:
            self._send_built()
        except Exception:
            return False  # let the driver meet it (the endpoint loop must go on)
        return True

    def leave_to_reader(self) -> bool:
        """Called by the endpoint after feeding a batch of datagrams. If they delivered stream
        data to readers while nothing of ours is in flight or waiting, the driver stays
        parked, its wait moved to aioquic's ACK timer: a reader that answers sends the
        answer, ACK included, from its own task (``send_now``); for one that does not, the
        timer sends the ACK. This saves a driver wakeup per request and per reply. False:
        the driver must run (``mark_dirty``)."""
        parked = self._parked
        quic = self.quic
        if (
            parked is None
            or not self._delivered
            or self._dirty
            or self._pending_bytes
            or self._deferred
            or self._backlog
            or self in self.endpoint._urgent
            or not quic._handshake_confirmed
            or quic._loss.bytes_in_flight
            or self.closed.is_set()
        ):
            return False
        parked.deadline = self._next_deadline()
        return True

    def _keepalive_interval_now(self) -> float | None:
        """The configured keepalive interval, shortened to ``KEEPALIVE_FRACTION`` of the idle
        timeout negotiated with the peer (the lower of both sides' settings) once that is
        known. None before the handshake and after the close: nothing to keep alive then."""
        interval = self._keepalive_interval
        if interval is None or not self.handshake_complete.is_set() or self.closed.is_set():
            return None
        remote = self.quic._remote_max_idle_timeout
        if remote:  # None: not known yet; 0: the peer has no idle timeout
            interval = min(interval, remote * KEEPALIVE_FRACTION)
        return interval

    async def _coalesce(self) -> None:
        """Give writers that are running right now a few scheduling rounds to add to this
        flight, so many small messages share packets instead of one packet each. After
        data was handed to readers, they get the same rounds, so that a reply goes out in
        one packet with the ACK. Bulk data (a packet's worth already), an answer to what
        arrived while nothing of ours is in flight, and wakeups with nothing to wait for go
        out at once. Trio runs a round's tasks in random order, so only two quiet rounds in
        a row mean "no writer"."""
        quiet = 0
        quic = self.quic
        for _ in range(COALESCE_ROUNDS):
            pending = self._pending_bytes
            if pending >= COALESCE_BYTES:
                return
            if pending == 0:
                if not self._delivered:
                    return
            elif self._delivered and not quic._loss.bytes_in_flight:
                # An answer to what just arrived, with nothing of ours unacknowledged (as
                # with Nagle's algorithm): it goes out at once; a stream of writes is
                # gathered.
                return
            await trio.lowlevel.cancel_shielded_checkpoint()
            quiet = quiet + 1 if self._pending_bytes == pending else 0
            if quiet == 2:
                return

    async def transmit(self, *, probe: bool = True) -> None:
        """Send what aioquic has to send now; with ``probe``, a path MTU probe if one is due
        (the receive loop's urgent sends leave probes to the driver: a probe right behind
        a handshake's last flight would only delay what the application waits for)."""
        now = trio.current_time()
        datagrams = self._build(now)
        if probe:
            pmtu_probe = self.quic.pmtu_probe(now)
            if pmtu_probe is not None:
                datagrams.append(pmtu_probe)
        if datagrams:
            self._transmitting = True
            try:
                await self.endpoint.send_datagrams(datagrams)
            finally:
                self._transmitting = False

    def _build(self, now: float) -> list[tuple[bytes, tuple[Any, ...]]]:
        """The datagrams to send now (with any the socket refused last time first)."""
        if self._pending_bytes:
            self.quic.ack_with_next_packet(now)
        self._pending_bytes = 0
        self._delivered = False
        self._unsent = False
        self.endpoint._urgent.pop(self, None)
        if self._deferred:
            self._run_deferred()
        datagrams = self.quic.datagrams_to_send(now)
        if self._backlog:
            datagrams[:0] = self._backlog
            self._backlog = []
        if datagrams:
            self._last_activity = now
        return datagrams

    def send_now(self) -> None:
        """After a writer's message: if it answers data that arrived since our last packet
        and nothing of ours is unacknowledged (request/response traffic), send it from the
        writer's task at once (the driver would only add task switches and rounds), else
        wake the driver to gather it with what follows. A stream of writes that answers
        nothing is always gathered: sent one by one, each would cost a packet."""
        if (
            not self._delivered
            or self._transmitting
            or self._pending_bytes >= COALESCE_BYTES
            or self.quic._loss.bytes_in_flight
            or not self.handshake_complete.is_set()
        ):
            self.mark_dirty()
            return
        self._send_built()

    def _send_built(self) -> None:
        """Build and send what is due now without waiting: from a writer's task, or from
        the endpoint's receive loop."""
        datagrams = self._build(trio.current_time())
        sent = self.endpoint.sock.send_batch_nowait(datagrams, 0)
        if sent < len(datagrams):  # the socket is full: the driver sends the rest
            self._backlog = datagrams[sent:]
            self.mark_dirty()
        elif self._parked is not None:
            # What was sent has a loss timer now: the idle driver must wake for it.
            self._parked.deadline = self._next_deadline()

    def process_events(self) -> None:
        """Hand aioquic's events to the listener (synchronously)."""
        quic = self.quic
        listener = self.listener
        event = quic.next_event()
        while event is not None:
            if isinstance(event, events.StreamDataReceived):
                quic.delivered_total += len(event.data)
                self._delivered = True
                listener.stream_data(self, event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.ConnectionIdIssued):
                self.endpoint._register_cid(self, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self.endpoint._unregister_cid(self, event.connection_id)
            elif isinstance(event, events.StreamReset):
                listener.stream_reset(self, event.stream_id, event.error_code)
                quic.forget_stream(event.stream_id)
            elif isinstance(event, events.StopSendingReceived):
                listener.stop_sending(self, event.stream_id, event.error_code)
            elif isinstance(event, events.HandshakeCompleted):
                self.handshake_complete.set()
                listener.handshake_completed(self)
            event = quic.next_event()
        if quic._handshake_confirmed and not self.handshake_confirmed.is_set():
            self.handshake_confirmed.set()
            self.settled.set()
        # aioquic reports a close only after its closing period (3 PTO); the owner must know
        # at once, so peers see broken streams promptly.
        close_event = quic._close_event
        if close_event is not None:
            self._mark_closed(close_event.error_code, close_event.reason_phrase)
        else:
            listener.send_progress(self)

    def _mark_closed(self, error_code: int, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_error_code = error_code
        self.close_reason = reason
        self.closed.set()
        self.settled.set()
        self.listener.terminated(self, error_code, reason)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        self.peer_address = addr
        self._last_activity = now
        self.quic.receive_datagram(data, addr, now)

    async def aclose(self, error_code: int = 0, reason: str = "") -> None:
        """Close and wait (bounded) until CONNECTION_CLOSE has gone out."""
        self.close(error_code, reason)
        self.process_events()
        with trio.move_on_after(CLOSE_SEND_TIMEOUT) as scope:
            scope.shield = True
            await self.transmit()


class QuicEndpoint:
    """One UDP socket, many QUIC connections (client and server role)."""

    def __init__(self, sock: DatagramSocket, nursery: trio.Nursery) -> None:
        self.sock = sock
        self._nursery = nursery
        self._by_cid: dict[bytes, QuicConn] = {}
        self._accept: Callable[[], tuple[QuicConfiguration, dict[str, Any]]] | None = None
        self._on_accept: Callable[[QuicConn], None] | None = None
        self._retry: QuicRetryTokenHandler | None = None
        self._send_blocked = trio.lowlevel.ParkingLot()
        # connections with something to send at once, before the next receive (see expedite)
        self._urgent: dict[QuicConn, None] = {}
        self.raw_datagram_handler: Callable[[bytes, tuple[Any, ...]], None] | None = None

    @property
    def local_address(self) -> tuple[Any, ...]:
        return tuple(self.sock.getsockname())

    def accept_connections(
        self,
        make_config: Callable[[], tuple[QuicConfiguration, dict[str, Any]]],
        on_accept: Callable[[QuicConn], None],
        *,
        stateless_retry: bool = False,
    ) -> None:
        """Serve server-role connections: ``make_config`` gives (configuration, flow
        options) for each; ``on_accept`` is called with each new connection (before its
        handshake completes) so its owner can set a listener."""
        self._accept = make_config
        self._on_accept = on_accept
        self._retry = QuicRetryTokenHandler() if stateless_retry else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The receive loop: reads batches of datagrams and dispatches them."""
        sock = self.sock
        task_status.started()
        touched: dict[QuicConn, None] = {}
        while True:
            await sock.wait_readable()
            now = trio.current_time()
            for _ in range(RECEIVE_BATCH):
                received = sock.recvfrom_nowait()
                if received is None:
                    break
                data, addr = received
                conn = self._dispatch(data, addr, now)
                if conn is not None:
                    touched[conn] = None
            for conn in touched:
                if not conn.handshake_confirmed.is_set():
                    # A handshake flight (or its confirmation) is what the peer waits for:
                    # it leaves from here, not a scheduling round later (see expedite).
                    self._urgent[conn] = None
                try:
                    conn.process_events()
                except Exception:  # a bug or hostile input must not stop the endpoint
                    log.exception("error handling events of %s; closing it", conn.peer_address)
                    conn.close(int(QuicErrorCode.INTERNAL_ERROR), "internal error")
                if not conn.answer_ping() and not conn.leave_to_reader():
                    conn.mark_dirty()
            touched.clear()
            while self._urgent:
                conn, _ = self._urgent.popitem()
                await conn.transmit(probe=False)

    def _dispatch(self, data: bytes, addr: tuple[Any, ...], now: float) -> QuicConn | None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            if self.raw_datagram_handler is not None:
                self.raw_datagram_handler(data, addr)
            return None
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            conn = self._maybe_accept(data, header, addr)
            if conn is None:
                return None
        try:
            conn.datagram_received(data, addr, now)
        except Exception:
            conn.close(0x1, "internal error handling a datagram")
        return conn

    def _maybe_accept(self, data: bytes, header: Any, addr: tuple[Any, ...]) -> QuicConn | None:
        if self._accept is None or header.packet_type != QuicPacketType.INITIAL:
            return None
        config, options = self._accept()
        if header.version is not None and header.version not in config.supported_versions:
            self._send_now(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=config.supported_versions,
                ),
                addr,
            )
            return None
        if len(data) < SMALLEST_INITIAL:
            return None
        original_dcid: bytes = header.destination_cid
        retry_scid: bytes | None = None
        if self._retry is not None:
            if not header.token:
                source_cid = os.urandom(CID_LENGTH)
                self._send_now(
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
        options = dict(options)
        keepalive_interval = options.pop("keepalive_interval", None)
        quic = FlowControlledConnection(
            configuration=config,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
            **options,
        )
        conn = self._add(quic, addr, keepalive_interval=keepalive_interval)
        self._register_cid(conn, header.destination_cid)
        assert self._on_accept is not None
        self._on_accept(conn)
        return conn

    def connect(
        self,
        addr: tuple[Any, ...],
        config: QuicConfiguration,
        *,
        keepalive_interval: float | None,
        **options: Any,
    ) -> QuicConn:
        """Start a client-role connection; wait on ``conn.handshake_complete``/``closed``."""
        quic = FlowControlledConnection(configuration=config, **options)
        conn = self._add(quic, addr, keepalive_interval=keepalive_interval)
        quic.connect(addr, now=trio.current_time())
        conn.process_events()
        conn.mark_dirty()
        return conn

    def _add(
        self,
        quic: FlowControlledConnection,
        addr: tuple[Any, ...],
        *,
        keepalive_interval: float | None,
    ) -> QuicConn:
        conn = QuicConn(self, quic, addr, keepalive_interval=keepalive_interval)
        for cid in quic._host_cids:
            self._register_cid(conn, cid.cid)
        self._nursery.start_soon(conn.drive)
        return conn

    def _register_cid(self, conn: QuicConn, cid: bytes) -> None:
        self._by_cid[cid] = conn
        conn._cids.add(cid)

    def _unregister_cid(self, conn: QuicConn, cid: bytes) -> None:
        if self._by_cid.get(cid) is conn:
            del self._by_cid[cid]
        conn._cids.discard(cid)

    def _forget(self, conn: QuicConn) -> None:
        for cid in list(conn._cids):
            self._unregister_cid(conn, cid)

    # -- sending -----------------------------------------------------------------------------

    def _send_now(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Best-effort immediate send for stateless replies (dropped if the socket is full)."""
        self.sock.sendto_nowait(data, addr)

    async def send_datagrams(self, datagrams: list[tuple[bytes, tuple[Any, ...]]]) -> None:
        sock = self.sock
        start = 0
        while start < len(datagrams):
            sent = sock.send_batch_nowait(datagrams, start)
            if sent == 0:
                await sock.wait_writable()
            start += sent

    async def send_raw(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Send one non-QUIC datagram (hole punching)."""
        await self.send_datagrams([(data, addr)])


class DatagramSocket(Protocol):
    """What an endpoint needs of a UDP socket. Tests plug in a fake network here."""

    family: int

    def getsockname(self) -> tuple[Any, ...]: ...

    async def wait_readable(self) -> None: ...

    def recvfrom_nowait(self) -> tuple[bytes, tuple[Any, ...]] | None:
        """One datagram, or None when none is waiting."""

    def sendto_nowait(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """Send one datagram; False if the socket buffer is full (wait_writable, retry)."""

    def send_batch_nowait(self, datagrams: list[tuple[bytes, tuple[Any, ...]]], start: int) -> int:
        """Send datagrams from ``start`` on, as many as fit now; how many were sent."""

    async def wait_writable(self) -> None: ...

    def close(self) -> None: ...


class UdpSocket:
    """A real, non-blocking UDP socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.family: int = sock.family
        self._gso = GSO_SUPPORTED

    def getsockname(self) -> tuple[Any, ...]:
        return tuple(self._sock.getsockname())

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._sock)

    def recvfrom_nowait(self) -> tuple[bytes, tuple[Any, ...]] | None:
        while True:
            try:
                return self._sock.recvfrom(MAX_UDP_PAYLOAD)
            except BlockingIOError:
                return None
            except OSError:
                # ICMP errors from earlier sends can surface here; they concern one
                # destination, not this socket.
                continue

    def sendto_nowait(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return self.sendto_nowait(data, addr)
            # Unreachable destination, or an address of the other family: the datagram is
            # lost, as on the wire; QUIC's recovery deals with it.
        return True

    def send_batch_nowait(self, datagrams: list[tuple[bytes, tuple[Any, ...]]], start: int) -> int:
        """Consecutive datagrams of one size to one address leave in one system call (UDP
        GSO, Linux), which saves most of the per-packet cost; elsewhere one call each."""
        n = len(datagrams)
        i = start
        while i < n:
            data, addr = datagrams[i]
            j = i + 1
            if self._gso:
                size = len(data)
                limit = min(n, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // max(size, 1))
                while j < limit and datagrams[j][1] == addr and len(datagrams[j][0]) == size:
                    j += 1
                # the last segment may be shorter
                if j < limit and datagrams[j][1] == addr and len(datagrams[j][0]) < size:
                    j += 1
            if j - i > 1:
                ok = self._send_gso(datagrams, i, j, addr)
                if ok is None:
                    continue  # GSO refused: retry the same run one by one
                if not ok:
                    return i - start
            elif not self.sendto_nowait(data, addr):
                return i - start
            i = j
        return i - start

    def _send_gso(
        self, datagrams: list[tuple[bytes, tuple[Any, ...]]], i: int, j: int, addr: tuple[Any, ...]
    ) -> bool | None:
        payload = b"".join(d for d, _ in datagrams[i:j])
        segment = struct.pack("=H", len(datagrams[i][0]))
        try:
            self._sock.sendmsg([payload], [(SOL_UDP, UDP_SEGMENT, segment)], 0, addr)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                self._gso = False  # the device or kernel cannot segment: stop trying
                return None
            # Unreachable destination: the datagrams are lost, as on the wire.
        return True

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    def close(self) -> None:
        self._sock.close()


SocketFactory = Callable[[int, str, int], DatagramSocket]


def _real_udp_socket(family: int, host: str, port: int) -> DatagramSocket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            # Dual stack where the OS allows, so "::" serves IPv4 clients too.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        # Don't fragment: a datagram too large for the path must get lost (and so fail its
        # path MTU probe), not be split into IP fragments.
        with contextlib.suppress(OSError, AttributeError):
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return UdpSocket(sock)


_socket_factory: SocketFactory = _real_udp_socket


def set_socket_factory(factory: SocketFactory | None) -> SocketFactory:
    """Make every new endpoint use ``factory`` (None: real sockets). Returns the old one.

    For tests on a simulated network; not thread-safe, not for production use.
    """
    global _socket_factory
    old = _socket_factory
    _socket_factory = factory or _real_udp_socket
    return old


def make_udp_socket(family: int, host: str, port: int) -> DatagramSocket:
    """A bound, non-blocking UDP socket (or the test network's stand-in)."""
    return _socket_factory(family, host, port)
