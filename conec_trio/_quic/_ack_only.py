"""When ACKs leave, and a packet that carries nothing but an ACK, built without aioquic's
full send pass.

aioquic sends the ACK of an ack-eliciting packet 1 ms after it arrived. A reply usually
takes longer than that in a loaded process, so the ACK went alone and the reply a moment
later, and the peer received two packets. ``hold_ack`` holds the ACK of a single packet for
``REPLY_ACK_DELAY`` where a reply (or a relayed answer) is expected to carry it; a second
ack-eliciting packet is acknowledged as aioquic does (RFC 9000 section 13.2.2).

An idle connection's commonest send is the ACK of a keepalive PING. aioquic's
``datagrams_to_send`` asks every frame writer (connection ids, credit of every stream, the
stream queue ...) for each packet it starts, and after the ACK's packet starts and discards
a second, empty one: about half of its cost. ``LeanAcks.ack_only_datagrams`` builds the same
packet through aioquic's own pieces (its packet builder, ACK frame writer and packet
registration) once it has checked that every other writer would write nothing now; where any
of them might, it gives way to the full pass.
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic.quic.connection import END_STATES, QuicConnection, QuicNetworkPath
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicPacketBuilderStop
from aioquic.quic.recovery import QuicPacketSpace

# Within the 25 ms max_ack_delay we announce (aioquic's default), with room for a late timer.
REPLY_ACK_DELAY = 0.010


class LeanAcks(QuicConnection):
    """``hold_ack`` and ``ack_only_datagrams``; the connection class says, with
    ``_limits_quiet``, whether its credit writers have anything to announce."""

    eliciting_unacked = 0  # ack-eliciting 1-RTT packets received since our last ACK frame
    # The 1-RTT packet space, looked up once: an ``Epoch`` key costs a Python-level hash.
    one_rtt_space: QuicPacketSpace | None = None

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.one_rtt_space = self._spaces[tls.Epoch.ONE_RTT]
        self._one_rtt_crypto_sender = self._crypto_streams[tls.Epoch.ONE_RTT].sender

    def _payload_received(
        self, context: Any, plain: bytes, crypto_frame_required: bool = False
    ) -> tuple[bool, bool]:
        result: tuple[bool, bool] = super()._payload_received(context, plain, crypto_frame_required)
        if result[0] and context.epoch is tls.Epoch.ONE_RTT:
            self.eliciting_unacked += 1
            space = self.one_rtt_space
            if self.eliciting_unacked > 1 and space is not None and space.ack_at is not None:
                # a held ACK now covers two packets: back to aioquic's schedule
                space.ack_at = min(space.ack_at, context.time + self._ack_delay)
        return result

    def _write_ack_frame(self, builder: Any, space: Any, now: float) -> None:
        super()._write_ack_frame(builder, space, now)
        if space is self.one_rtt_space:
            self.eliciting_unacked = 0

    def ack_due_now(self, now: float) -> bool:
        """An ACK of ours is due (its timer has run out)."""
        space = self.one_rtt_space
        return space is not None and space.ack_at is not None and space.ack_at <= now

    def hold_ack(self) -> bool:
        """Hold the pending ACK until ``REPLY_ACK_DELAY`` after its packet arrived, so that
        the answer to that packet carries it. False where it covers more than one
        ack-eliciting packet: it leaves as aioquic schedules it."""
        space = self.one_rtt_space
        if space is None or space.ack_at is None:
            return True  # nothing to acknowledge
        received = space.largest_received_time
        if received is None or self.eliciting_unacked > 1 or space.ack_at <= received:
            return False  # more than one packet, or an ACK asked for at once (a PING's)
        held = received + REPLY_ACK_DELAY
        if space.ack_at < held:
            space.ack_at = held
        return True

    def held_ack_due(self, received_by: float) -> bool:
        """An ACK is pending for packets that all arrived by ``received_by``."""
        space = self.one_rtt_space
        if space is None or space.ack_at is None or space.largest_received_time is None:
            return False
        return space.largest_received_time <= received_by

    def _limits_quiet(self) -> bool:
        """No MAX_DATA, MAX_STREAMS or MAX_STREAM_DATA would be written now (and writing
        them would change no state). The safe default: not known."""
        return False

    def nothing_but_acks_to_send(self) -> bool:
        """aioquic's send pass would write no frame but an ACK now: no stream data, credit,
        connection id, path response, PING, probe or close. True says nothing of whether
        an ACK is due."""
        if self._state in END_STATES or self._close_pending or not self._handshake_confirmed:
            return False
        paths = self._network_paths
        return not (
            len(paths) != 1
            or not _quiet_path(paths[0])
            or self._ping_pending
            or self._probe_pending
            or self._handshake_done_pending
            or self._datagrams_pending
            or self._retire_connection_ids
            or self._streams_blocked_pending
            or (self._is_client and self._remote_preferred_address is not None)
            or not self._one_rtt_crypto_sender.buffer_is_empty
            or not all(cid.was_sent for cid in self._host_cids)
            or not all(_quiet_stream(stream) for stream in self._streams_queue)
            or not self._limits_quiet()
        )

    def ack_only_datagrams(self, now: float) -> list[tuple[bytes, Any]] | None:
        """What ``datagrams_to_send(now)`` would return when all it would send is a 1-RTT
        ACK, with the same effects on the connection (packet number, sent packets, pacer
        and pacing time); None, having changed nothing, where that is not certain."""
        space = self.one_rtt_space
        if space is None or space.ack_at is None or space.ack_at > now:
            return None
        if not self.nothing_but_acks_to_send():
            return None
        paths = self._network_paths
        crypto = self._cryptos[tls.Epoch.ONE_RTT]
        if not crypto.send.is_valid():
            return None
        pacer = self._loss._pacer
        # aioquic paces a packet whose ACK is due exactly now (ack_at == now) like any other
        if space.ack_at >= now and pacer.next_send_time(now=now) is not None:
            return None  # the full pass sets the pacing time and sends nothing
        # From here on, the same steps as aioquic's datagrams_to_send and _write_application
        # for a pass that writes one packet with an ACK frame in it.
        self._pacing_at = None
        assert self._version is not None  # known once the handshake is confirmed
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=self._max_datagram_size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            peer_token=self._peer_token,
            quic_logger=self._quic_logger,
            spin_bit=self._spin_bit,
            version=self._version,
        )
        builder.max_flight_bytes = self._loss.congestion_window - self._loss.bytes_in_flight
        try:
            builder.start_packet(QuicPacketType.ONE_RTT, crypto)
            self._write_ack_frame(builder=builder, space=space, now=now)
            if not builder.packet_is_empty:
                pacer.update_after_send(now=now)
            # The pass goes on to a next packet: its pacer check updates the bucket and
            # arms the pacing timer, which the connection drops at once when nothing but
            # ACKs is left to send (``_drop_idle_pacing_timer``), as is the case here.
            pacer.next_send_time(now=now)
            self._pacing_at = None
        except QuicPacketBuilderStop:
            pass
        datagrams: list[tuple[bytes, Any]] = self._flush_builder(
            builder=builder, network_path=paths[0], peer_cid=self._peer_cid.cid, now=now
        )
        return datagrams


def _quiet_path(path: QuicNetworkPath) -> bool:
    """A validated path with no PATH_RESPONSE to send."""
    return path.is_validated and not path.remote_challenges


def _quiet_stream(stream: Any) -> bool:
    """aioquic's stream queue would write nothing for this stream, nor drop it."""
    return not (
        stream.is_finished
        or stream.receiver.stop_pending
        or stream.sender.reset_pending
        or (not stream.is_blocked and not stream.sender.buffer_is_empty)
    )
