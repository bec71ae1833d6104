"""The library's aioquic connection: every use of aioquic's private names lives here (and in
``_pmtu``, ``_pacing`` and ``_reset``), with no trio, so an aioquic upgrade has one place to
check.

What it adds to aioquic's ``QuicConnection``:

1. Server side: asks the client for a certificate (aioquic has no public switch). aioquic then
   checks the client's CertificateVerify signature (proof of the key) and keeps the cert;
   chain, name and pin checks are the roles' (see ``_tls``).
2. Receive credit follows what the application consumed, not what arrived.
3. Idle connections keep no growing ACK bookkeeping and no handshake buffers.
4. Path MTU probing and black-hole fallback, and a cap on PTO back-off (``_pmtu``); a pacer
   whose bursts do not collapse at high rates (``_pacing``).
5. Stateless resets, and a client role that follows its peer's NAT rebinding (``_reset``).
6. Read-only views the driver and the stream layer need (``is_client``, ``bytes_in_flight``,
   ``send_backlog`` ...), so nothing outside this package touches aioquic objects.

``new_connection`` builds one from the roles' ``ConnectionSettings``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnectionState
from cryptography import x509

from ._ack_only import LeanAcks
from ._pacing import BurstPacer
from ._reset import StatelessResets
from ._tls_context import ClientTlsContext
from ._views import ConnectionViews
from .settings import LARGEST_DATAGRAM, ConnectionSettings, Identity

# Pacing waits shorter than this are not slept (trio's timers have millisecond resolution);
# what is due within it is sent at once, in at most this many extra rounds per transmit.
PACING_SLACK = 0.001
MAX_PACING_ROUNDS = 64
# aioquic gives every connection three 16 KiB buffers for TLS handshake output. Once the
# handshake is over, TLS writes nothing more on a QUIC connection (no tickets are issued, key
# updates are QUIC's own), so they shrink to this.
POST_HANDSHAKE_CRYPTO_BUFFER = 1024
# aioquic builds a frame-type -> allowed-epochs table per connection; the epoch sets are the
# same for every connection, so all connections share one copy of each.
_SHARED_EPOCH_SETS: dict[frozenset[Any], frozenset[Any]] = {}
# the QUIC versions a server accepts (aioquic's defaults)
SUPPORTED_VERSIONS: list[int] = list(QuicConfiguration(is_client=False).supported_versions)
_CLOSING_STATES = (
    QuicConnectionState.CLOSING,
    QuicConnectionState.DRAINING,
    QuicConnectionState.TERMINATED,
)


class FlowControlledConnection(LeanAcks, StatelessResets, ConnectionViews):
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
        max_datagram_size: int = LARGEST_DATAGRAM,
        identity: Callable[[], tuple[x509.Certificate, list[x509.Certificate], Any]] | None = None,
        reset_key: bytes | None = None,
        **kwargs: Any,
    ) -> None:
        self._request_client_cert = request_client_certificate
        self._reset_key = reset_key
        self._authenticated = 0  # packets of the datagram being processed that decrypted
        self._identity = identity
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._stream_consumed: dict[int, int] = {}
        self._consumed_total = 0
        # Stream bytes written, and of those, bytes a reset dropped before they were sent:
        # what is written and not yet sent is what waits for the peer's credit (send_room).
        self._stream_written = 0
        self._unsent_dropped = 0
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
        self._loss._pacer.__class__ = BurstPacer
        self._init_pmtu(max_datagram_size)
        self._derive_reset_tokens()

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if self._request_client_cert:
            self.tls._request_client_certificate = True
        if self._is_client:
            context = self.tls
            context.__class__ = ClientTlsContext
            assert isinstance(context, ClientTlsContext)
            context.identity = self._identity
            # aioquic makes a key share for each of four groups (P-256, P-384, X25519, X448)
            # in every ClientHello, about 0.5 ms of key generation, and an aioquic server
            # takes the first one it supports, P-256, anyway: offer only that one.
            self.tls._supported_groups = [tls.Group.SECP256R1]

    def hold_confirmation(self, hold: bool) -> None:
        """Server role, handshake complete: with ``hold``, no HANDSHAKE_DONE (the client's
        confirmation) leaves until called again without it (the role has not accepted the
        client's certificate yet)."""
        if not self._is_client and self._handshake_complete:
            self._handshake_done_pending = not hold

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
        self._authenticated = 0
        if self._is_client and all(path.addr != addr for path in self._network_paths):
            self._receive_from_new_address(data, addr, now)
        else:
            super().receive_datagram(data, addr, now)
        if not self._authenticated and self.is_stateless_reset(data):
            self._reset_by_peer(now)
            return
        if self._ping_received:
            # A PING (a keepalive, a loss probe, a path MTU probe) is acknowledged at once:
            # no data will follow to share the ACK with, and waiting aioquic's ack delay
            # would cost a second wakeup for every keepalive.
            self._ping_received = False
            space = self.one_rtt_space
            if space is not None and space.ack_at is not None:
                space.ack_at = now
                self.ack_due = True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        first = self._packet_number
        datagrams = self.ack_only_datagrams(now)
        if datagrams is None:
            datagrams = super().datagrams_to_send(now)
            self._drop_idle_pacing_timer()
        # aioquic's pacer asks for waits well under a millisecond, and trio sleeps in whole
        # milliseconds: what is due within PACING_SLACK goes now, the pacer's bucket credited
        # with that time (packets keep their real send time, so RTT samples stay true).
        for _ in range(MAX_PACING_ROUNDS):
            pacing_at = self._pacing_at
            if pacing_at is None or pacing_at > now + PACING_SLACK:
                break
            self._loss._pacer.update_bucket(now=pacing_at)
            more = super().datagrams_to_send(now)
            self._drop_idle_pacing_timer()
            if not more:
                break
            datagrams += more
        if self._packet_number != first:
            self._forget_ack_only(first)
        if not self._handshake_trimmed:
            self._trim_after_handshake()
        return datagrams

    def _drop_idle_pacing_timer(self) -> None:
        """aioquic's send pass asks its pacer about a next packet even when it has nothing
        more to send, and arms its pacing timer with the answer: after nearly every packet
        the connection's driver would wake (and run another send pass) for nothing. The
        timer is dropped when only ACKs, which are not paced, could be sent; new data
        makes the writer ask for a send pass anyway."""
        if self._pacing_at is not None and self.nothing_but_acks_to_send():
            self._pacing_at = None

    def _forget_ack_only(self, first: int) -> None:
        """Keep only the newest of the packets sent from ``first`` on that carry nothing but
        ACKs. aioquic keeps every sent packet until it is acknowledged or declared lost, but
        a peer never acknowledges a packet of ACKs alone unless it has something of its own
        to send, and loss is only declared below the highest acknowledged packet: an idle
        connection answering keepalives would keep every ACK it ever sent. The newest one is
        kept so that its acknowledgement, if one comes, still prunes our ACK ranges."""
        space = self.one_rtt_space
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
        if self._connection_credit_due():
            return True
        stream = self._streams.get(stream_id)
        if stream is None or not stream.max_stream_data_local:
            return False
        return consumed + self._stream_window - stream.max_stream_data_local >= (
            self._stream_window // 4
        )

    def _connection_credit_due(self) -> bool:
        """A quarter connection window of new connection credit is waiting to be announced.
        A reader that takes a little from each of many streams frees connection credit
        without any one stream's credit being worth a packet; without this the sender
        would wait for an unrelated packet (a keepalive) to carry the MAX_DATA."""
        max_data = self._local_max_data
        held = self.delivered_total - self._consumed_total
        target = max_data.used - held + self._connection_window
        return target - max_data.sent >= self._connection_window // 4

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
        space = self.one_rtt_space
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def _stream_credit(self, stream: Any) -> int | None:
        """The stream's new credit limit to announce with the next packet, if any."""
        limit = stream.max_stream_data_local
        if limit:
            # New credit rides on a packet once it is worth a quarter window (add_consumed
            # asks for a packet then), or once the peer has sent to within a quarter window
            # of the limit: announced with every message consumed, it would make every
            # packet, ACKs alone included, one the peer must acknowledge.
            quarter = self._stream_window // 4
            target = self._stream_consumed.get(stream.stream_id, 0) + self._stream_window
            if target > limit and (
                target - limit >= quarter or stream.receiver.highest_offset + quarter >= limit
            ):
                return target
        return None

    def _connection_credit(self) -> int | None:
        """The new connection credit limit to announce with the next packet, if any."""
        max_data = self._local_max_data
        # Bytes aioquic counted but never delivered (a reset's final size, gaps) are not
        # held by anyone: only delivered-and-unconsumed bytes hold connection credit.
        held = self.delivered_total - self._consumed_total
        target = max_data.used - held + self._connection_window
        quarter = self._connection_window // 4
        if target > max_data.value and (  # as for a stream's credit, above
            target - max_data.value >= quarter or max_data.used + quarter >= max_data.value
        ):
            return target
        return None

    def _connection_limits_sent(self) -> bool:
        """Every connection-level limit (data, streams) is announced as it stands."""
        max_data, bidi, uni = (
            self._local_max_data,
            self._local_max_streams_bidi,
            self._local_max_streams_uni,
        )
        return max_data.value == max_data.sent and bidi.value == bidi.sent and uni.value == uni.sent

    def _limits_quiet(self) -> bool:
        if not self._connection_limits_sent():
            return False
        if self._connection_credit() is not None:
            return False
        return all(
            stream.max_stream_data_local_sent == stream.max_stream_data_local
            and self._stream_credit(stream) is None
            for stream in self._streams.values()
        )

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        target = self._stream_credit(stream)
        if target is not None:
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
        target = self._connection_credit()
        if target is not None:
            max_data.value = target
        if self._connection_limits_sent():
            return  # nothing to announce (runs for every packet)
        used = max_data.used
        max_data.used = 0  # same trick as above: no doubling on arrival
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = used

    # -- sending no more than the peer granted --------------------------------------------

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        self._stream_written += len(data)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self._drop_unsent(stream_id)
        super().reset_stream(stream_id, error_code)

    def _handle_stop_sending_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        # aioquic resets our send side itself on STOP_SENDING: its unsent bytes never leave.
        start = buf.tell()
        stream_id = buf.pull_uint_var()
        buf.seek(start)
        self._drop_unsent(stream_id)
        super()._handle_stop_sending_frame(context, frame_type, buf)

    def _drop_unsent(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        sender = stream.sender
        if sender._reset_error_code is None and not sender.is_finished:
            self._unsent_dropped += sender._buffer_stop - sender.highest_offset

    @property
    def unsent(self) -> int:
        """Stream bytes written and not yet sent once (mostly: waiting for the peer's credit)."""
        return self._stream_written - self._unsent_dropped - self._remote_max_data_used

    def send_room(self, stream_id: int, budget: int) -> int:
        """How many bytes may be written to a stream now so that none waits for credit the
        peer has not granted (its stream and its connection credit), and the connection's
        unsent bytes stay within ``budget`` (against a peer that grants more than it
        acknowledges)."""
        unsent = self.unsent
        room = min(self._remote_max_data - self._remote_max_data_used, budget) - unsent
        stream = self._streams.get(stream_id)
        if stream is not None:
            room = min(room, stream.max_stream_data_remote - stream.sender._buffer_stop)
        return room


def _identity_triple(identity: Identity) -> tuple[x509.Certificate, list[x509.Certificate], Any]:
    return identity.certificate, list(identity.chain), identity.private_key


def new_connection(
    settings: ConnectionSettings,
    *,
    is_client: bool,
    original_destination_connection_id: bytes | None = None,
    retry_source_connection_id: bytes | None = None,
) -> FlowControlledConnection:
    """An aioquic connection configured from ``settings``."""
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[settings.alpn],
        server_name=settings.server_name,
        idle_timeout=settings.idle_timeout,
        max_stream_data=settings.stream_window,
        max_data=settings.connection_window,
    )
    identity = settings.identity
    make_identity: Callable[[], tuple[x509.Certificate, list[x509.Certificate], Any]] | None
    make_identity = None
    if isinstance(identity, Identity):
        config.certificate, config.certificate_chain, config.private_key = _identity_triple(
            identity
        )
    elif identity is not None:
        make = identity
        make_identity = lambda: _identity_triple(make())  # noqa: E731
    trust = settings.trust
    if is_client and trust is None:
        config.verify_mode = ssl.CERT_NONE  # the role pins the peer's certificate instead
    elif trust is not None:
        config.cadata, config.cafile, config.capath = trust.cadata, trust.cafile, trust.capath
    return FlowControlledConnection(
        configuration=config,
        request_client_certificate=not is_client,
        stream_window=settings.stream_window,
        connection_window=settings.connection_window,
        max_streams=settings.max_streams,
        max_datagram_size=settings.max_datagram_size,
        identity=make_identity,
        reset_key=settings.reset_key,
        original_destination_connection_id=original_destination_connection_id,
        retry_source_connection_id=retry_source_connection_id,
    )
