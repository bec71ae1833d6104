"""Path MTU discovery for aioquic connections (RFC 8899, RFC 9000 section 14), with no trio.

Probing: once a connection has carried some bulk data, padded PING datagrams of growing
sizes go out; each size becomes the sending size when its probe is acknowledged. Loopback
and LAN paths end up with large datagrams, internet paths stay at what works.

Black holes: a path's MTU can drop mid-session (a VPN comes up, a route moves to a tunnel).
Every full-size datagram is then lost while small ones (the peer's ACKs, a PTO probe) still
pass. Two signs of that make the connection fall back at once, before the next PTO probe is
built: a PTO that fires with nothing but large packets in flight, or several large packets
in a row declared lost with no large one acknowledged. The fallback goes to the largest
size confirmed below the failing one, and to the base size if that fails too. It is taken
back as soon as a packet of the old size is acknowledged after all (a plain loss burst, not
a black hole). Sizes that failed are probed again later, at growing intervals, so a path
whose MTU comes back gets its large datagrams back.

aioquic's congestion controller and pacer take the datagram size once, at construction;
``_set_datagram_size`` keeps them in step both ways.
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic.quic.congestion.base import K_MINIMUM_WINDOW
from aioquic.quic.connection import END_STATES, QuicConnection
from aioquic.quic.packet import QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder, QuicSentPacket
from aioquic.quic.recovery import QuicPacketRecovery, QuicPacketSpace

# Datagram sizes tried in turn once the handshake is confirmed.
PMTU_LADDER = (1452, 4096, 8952, 16384)
PMTU_PROBE_TIMEOUT = 1.0  # a probe not acknowledged by then is taken as too large
# Probing starts once this much stream data was written: large datagrams pay off for bulk
# transfers only, so idle and chatty connections (most of a coordinator's) never probe.
PMTU_AFTER_BYTES = 64 * 1024
# Large packets lost in a row, none acknowledged, that mean a black hole.
BLACK_HOLE_LOSSES = 4
# After a size failed (a probe unanswered, a black hole), larger sizes are probed again
# after this long, doubling each time they fail again, up to RFC 8899's PMTU_RAISE_TIMER.
PMTU_RAISE_FIRST = 1.0
PMTU_RAISE_MAX = 600.0
# The longest wait between PTO probes, unless the path's own PTO is longer.
MAX_PTO_INTERVAL = 1.0


class _SizeWatchingRecovery(QuicPacketRecovery):
    """aioquic's loss recovery, telling the connection what acknowledgements, losses and
    PTOs say about the datagram size (its class is swapped in by ``_init_pmtu``), with the
    PTO's exponential back-off capped at ``MAX_PTO_INTERVAL``."""

    pmtu: PathMtuProbing

    def on_ack_received(
        self, *, ack_rangeset: Any, ack_delay: float, now: float, space: Any
    ) -> None:
        # The largest packet acknowledged is enough to tell large from small getting
        # through, and costs one lookup per ACK.
        largest = space.sent_packets.get(ack_rangeset.bounds().stop - 1)
        if largest is not None and largest.in_flight:
            self.pmtu._pmtu_acked(largest.sent_bytes)
        super().on_ack_received(
            ack_rangeset=ack_rangeset, ack_delay=ack_delay, now=now, space=space
        )

    def on_loss_detection_timeout(self, *, now: float) -> None:
        if self._get_loss_space() is None:  # a PTO, not a loss timer
            self.pmtu._pmtu_on_pto(now)
        super().on_loss_detection_timeout(now=now)
        # Doubling without end leaves a lossy but live path silent for 20-60 s (a probe and
        # its ACK both get through only half the time at 30% loss), past the idle and setup
        # timeouts. Probes stay at most one (two datagrams) per interval, and loss still
        # shrinks the congestion window as before.
        base = self.get_probe_timeout(include_max_ack_delay=self.handshake_confirmed)
        while self._pto_count and base * 2**self._pto_count > MAX_PTO_INTERVAL:
            self._pto_count -= 1

    def _on_packets_lost(
        self,
        *,
        congestion_event: bool = True,
        now: float,
        packets: Any,
        persistent_congestion: bool = False,
        space: QuicPacketSpace,
    ) -> None:
        packets = list(packets)
        if packets and congestion_event and space.is_application_data:
            self.pmtu._pmtu_lost(packets, now)
        super()._on_packets_lost(
            congestion_event=congestion_event,
            now=now,
            packets=packets,
            persistent_congestion=persistent_congestion,
            space=space,
        )


class PathMtuProbing(QuicConnection):
    """The path MTU half of the library's aioquic connection (see ``_aioquic``)."""

    written_total: int  # stream bytes the application wrote (kept by the subclass)

    def _init_pmtu(self, max_datagram_size: int) -> None:
        self._pmtu_base = int(self._max_datagram_size)  # aioquic's safe start (1200)
        # sizes probing will try, in order
        self._pmtu_ladder = [size for size in PMTU_LADDER if size <= max_datagram_size]
        self._pmtu_next = 0  # index into the ladder of the next size to try
        self._pmtu_probe_deadline: float | None = None  # a probe is in flight until then
        self._pmtu_confirmed = [self._pmtu_base]  # sizes the path carried, ascending
        # The size fallen back from, until a packet of the new size is acknowledged.
        self._pmtu_suspect: int | None = None
        self._pmtu_large_losses = 0  # large packets lost in a row (BLACK_HOLE_LOSSES)
        self._pmtu_raise_at: float | None = None  # when failed sizes are probed again
        self._pmtu_raise_interval = PMTU_RAISE_FIRST
        self._pmtu_raise_written = 0  # ... once this much more stream data was written
        self.black_holes = 0  # fallbacks taken (and not taken back)
        self._loss.__class__ = _SizeWatchingRecovery
        assert isinstance(self._loss, _SizeWatchingRecovery)
        self._loss.pmtu = self

    # -- the sending size --------------------------------------------------------------------

    def _set_datagram_size(self, size: int) -> None:
        """Send datagrams of up to ``size`` bytes from now on, with the congestion window
        and pacer counting in the same unit (both ways: up after a probe, down on a black
        hole). The window keeps its bytes, but never below RFC 9002's two datagrams."""
        self._max_datagram_size = size
        loss = self._loss
        cc = loss._cc
        if hasattr(cc, "_max_datagram_size"):
            cc._max_datagram_size = size
        if hasattr(cc, "additive_increase_factor"):  # cubic
            cc.additive_increase_factor = size
        cc.congestion_window = max(cc.congestion_window, K_MINIMUM_WINDOW * size)
        loss._pacer._max_datagram_size = size
        if loss._rtt_initialized:
            loss._pacer.update_rate(
                congestion_window=cc.congestion_window, smoothed_rtt=loss._rtt_smoothed
            )

    def _pmtu_floor(self) -> int:
        """The size a black hole at the current size falls back to: the largest confirmed
        below it, or the base size if the last fallback has not been confirmed yet."""
        if self._pmtu_suspect is not None:
            return self._pmtu_base
        size = self._max_datagram_size
        return max((s for s in self._pmtu_confirmed if s < size), default=self._pmtu_base)

    def _pmtu_fall_back(self, now: float) -> None:
        size = self._max_datagram_size
        floor = self._pmtu_floor()
        if floor >= size:
            return
        # Sizes at and above the failing one are no longer confirmed; the one fallen from
        # comes back if a packet of it is acknowledged after all (_pmtu_acked).
        self._pmtu_confirmed = [s for s in self._pmtu_confirmed if s <= floor]
        self._pmtu_suspect = size
        self._pmtu_large_losses = 0
        self.black_holes += 1
        self._set_datagram_size(floor)
        # The path changed: its old MTU may come back soon, so the back-off starts over.
        # (One kept from earlier failed probes of larger sizes would leave a long session at
        # the fallback size for up to PMTU_RAISE_MAX after the path had recovered.)
        self._pmtu_raise_at = None
        self._pmtu_raise_interval = PMTU_RAISE_FIRST
        self._pmtu_schedule_raise(now)

    def _pmtu_schedule_raise(self, now: float) -> None:
        """Probe the sizes above the current one again later, at growing intervals."""
        if self._pmtu_raise_at is not None:
            return
        if not any(s > self._max_datagram_size for s in self._pmtu_ladder):
            return
        self._pmtu_raise_at = now + self._pmtu_raise_interval
        self._pmtu_raise_interval = min(self._pmtu_raise_interval * 2, PMTU_RAISE_MAX)
        # Only worth it for a connection that still carries bulk data.
        self._pmtu_raise_written = self.written_total + PMTU_AFTER_BYTES

    # -- what the loss recovery reports ---------------------------------------------------------

    def _pmtu_acked(self, sent_bytes: int) -> None:
        size = self._max_datagram_size
        suspect = self._pmtu_suspect
        if suspect is not None and sent_bytes > size:
            # A packet of the size fallen from got through after all: a loss burst, not a
            # black hole. Take the fallback back.
            self._pmtu_suspect = None
            self.black_holes -= 1
            if suspect not in self._pmtu_confirmed:
                self._pmtu_confirmed = sorted({*self._pmtu_confirmed, size, suspect})
            self._set_datagram_size(suspect)
            return
        if sent_bytes > self._pmtu_floor() or size == self._pmtu_base:
            # The current size gets through.
            self._pmtu_large_losses = 0
            if suspect is not None:
                self._pmtu_suspect = None
                if size not in self._pmtu_confirmed:
                    self._pmtu_confirmed = sorted({*self._pmtu_confirmed, size})

    def _pmtu_lost(self, packets: list[QuicSentPacket], now: float) -> None:
        size = self._max_datagram_size
        if size <= self._pmtu_base or not self._handshake_confirmed:
            return
        base = self._pmtu_base
        for packet in packets:
            # Packets larger than the size now sent date from before a fallback: they say
            # nothing about the current size.
            if packet.in_flight and base < packet.sent_bytes <= size:
                self._pmtu_large_losses += 1
        if self._pmtu_large_losses >= BLACK_HOLE_LOSSES:
            self._pmtu_fall_back(now)

    def _pmtu_on_pto(self, now: float) -> None:
        """A PTO is about to send its probe: if only large packets are in flight, the probe
        (and what follows) goes out at the fallback size."""
        if self._max_datagram_size <= self._pmtu_base or not self._handshake_confirmed:
            return
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is None:
            return
        base = self._pmtu_base
        large = False
        for packet in space.sent_packets.values():
            if packet.in_flight and packet.is_ack_eliciting:
                if packet.sent_bytes <= base:
                    return  # a small one is outstanding too: a plain loss or an outage
                large = True
        if large:
            self._pmtu_fall_back(now)

    # -- probing ------------------------------------------------------------------------------

    def pmtu_timer(self) -> float | None:
        """When the driver must call ``pmtu_probe``: a probe's deadline, or the time to
        probe failed sizes again (only while bulk data is being written)."""
        deadline = self._pmtu_probe_deadline
        raise_at = self._pmtu_raise_at
        if (
            raise_at is not None
            and self.written_total >= self._pmtu_raise_written
            and (deadline is None or raise_at < deadline)
        ):
            return raise_at
        return deadline

    def pmtu_probe(self, now: float) -> tuple[bytes, Any] | None:
        """A padded PING datagram of the next size to try, if one is due now."""
        if self._pmtu_probe_deadline is not None:
            if now < self._pmtu_probe_deadline:
                return None
            self._pmtu_probe_deadline = None  # no answer: too large for this path
            self._pmtu_next = len(self._pmtu_ladder)
            self._pmtu_schedule_raise(now)
            return None
        raise_at = self._pmtu_raise_at
        if (
            raise_at is not None
            and now >= raise_at
            and self.written_total >= self._pmtu_raise_written
        ):
            self._pmtu_raise_at = None
            size = self._max_datagram_size
            self._pmtu_next = next(
                (i for i, s in enumerate(self._pmtu_ladder) if s > size), len(self._pmtu_ladder)
            )
        if (
            self._pmtu_next >= len(self._pmtu_ladder)
            or self.written_total < PMTU_AFTER_BYTES
            or not self._handshake_confirmed
            or self._state in END_STATES
        ):
            return None
        size = self._pmtu_ladder[self._pmtu_next]
        while size <= self._max_datagram_size:
            self._pmtu_next += 1
            if self._pmtu_next >= len(self._pmtu_ladder):
                return None
            size = self._pmtu_ladder[self._pmtu_next]
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
        deadline = self._pmtu_probe_deadline
        if deadline is None:
            return  # answered after we gave up on it
        self._pmtu_probe_deadline = None
        if delivery == QuicDeliveryState.ACKED:
            self._pmtu_confirmed = sorted({*self._pmtu_confirmed, size})
            if size > self._max_datagram_size:
                self._set_datagram_size(size)
            self._pmtu_suspect = None
            self._pmtu_large_losses = 0
            self._pmtu_raise_interval = PMTU_RAISE_FIRST  # the path grew: start over
            self._pmtu_next += 1
        else:
            self._pmtu_next = len(self._pmtu_ladder)
            # (declared lost before its deadline: later than it was sent, at least)
            self._pmtu_schedule_raise(deadline - PMTU_PROBE_TIMEOUT)
