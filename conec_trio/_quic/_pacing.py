"""aioquic's pacer, with bursts that survive its one-microsecond floor on the time per packet.

aioquic's pacer lets a burst of datagrams out at once (a quarter of the congestion window, two
to sixteen datagrams), then one every ``packet_time`` (the datagram size over the pacing
rate, the window over the RTT). It keeps the burst as time, ``bucket_max``: the burst's bytes
at the pacing rate. But ``packet_time`` never goes under 1 us, and ``bucket_max`` has no such
floor: once the rate passes one datagram a microsecond (1.2 GB/s at 1200 bytes; a slow start
on loopback that never sees a loss or an RTT rise gets there within a second, with a window of
tens of megabytes), the burst is worth less than one packet's time. Every send pass then lets
out one or two datagrams and asks for a 1 us wait: the connection's driver wakes for every
other datagram, and bulk runs at half speed or less. Whether a run gets there depends on
whether HyStart happened to end slow start first, so one-hop bulk was bimodal (about 19 or
about 40 MB/s at 1200-byte datagrams, in alternate runs).

Here the burst is counted in datagrams, each worth ``packet_time``: below the floor that is
what aioquic computes anyway, above it the burst keeps its sixteen datagrams.
"""

from __future__ import annotations

from aioquic.quic.recovery import QuicPacketPacer

# aioquic's burst: a quarter window, at least this many and at most MAX_BURST datagrams
MIN_BURST = 2
MAX_BURST = 16


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer with its burst in datagrams (see the module's docstring)."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        # aioquic's update clamps the bucket to its own burst time, which is what collapses:
        # the bucket is kept here and clamped to the burst counted in datagrams instead (else
        # every ACK, which updates the rate, would empty a full bucket).
        bucket_time = self.bucket_time
        super().update_rate(congestion_window, smoothed_rtt)
        size = self._max_datagram_size
        burst = max(MIN_BURST * size, min(congestion_window // 4, MAX_BURST * size)) / size
        assert self.packet_time is not None  # super() has just set it
        self.bucket_max = burst * self.packet_time
        self.bucket_time = min(bucket_time, self.bucket_max)
