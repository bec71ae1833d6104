"""Path MTU probing for aioquic connections (RFC 8899 style), with no trio.

Once a connection has carried some bulk data, padded PING datagrams of growing sizes go out;
each size becomes the sending size when its probe is acknowledged. Loopback and LAN paths end
up with large datagrams, internet paths stay at what works.
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic.quic.connection import END_STATES, QuicConnection
from aioquic.quic.packet import QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder

# Datagram sizes tried in turn once the handshake is confirmed.
PMTU_LADDER = (1452, 4096, 8952, 16384)
PMTU_PROBE_TIMEOUT = 1.0  # a probe not acknowledged by then is taken as too large
# Probing starts once this much stream data was written: large datagrams pay off for bulk
# transfers only, so idle and chatty connections (most of a coordinator's) never probe.
PMTU_AFTER_BYTES = 64 * 1024


class PathMtuProbing(QuicConnection):
    """The probing half of the library's aioquic connection (see ``_aioquic``)."""

    written_total: int  # stream bytes the application wrote (kept by the subclass)

    def _init_pmtu(self, max_datagram_size: int) -> None:
        # sizes probing will try, in order
        self._pmtu_ladder = [size for size in PMTU_LADDER if size <= max_datagram_size]
        self._pmtu_next = 0  # index into the ladder of the next size to try
        self._pmtu_probe_deadline: float | None = None  # a probe is in flight until then

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
