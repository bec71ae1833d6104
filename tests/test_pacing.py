"""The pacer lets a burst out at once at any rate (``_quic._pacing``).

aioquic's own pacer keeps its burst as time, which falls under its one-microsecond floor per
packet once the window over the RTT passes about 1.2 GB/s (an unbounded slow start on loopback
gets there): then every send pass let out two datagrams, and bulk ran at half speed in the
runs that got there.
"""

from __future__ import annotations

import pytest
from aioquic.quic.recovery import QuicPacketPacer
from quic_pair import Pair

from conec_trio._quic._pacing import MAX_BURST, BurstPacer

RTT = 0.001


def _one_pass_at_window(window: int) -> int:
    """Datagrams one send pass of the client builds, with ``window`` bytes of congestion
    window at a 1 ms RTT, 1 MB of stream data waiting and the pacer's bucket full."""
    pair = Pair()
    client = pair.client
    client._loss._cc.congestion_window = window
    client._loss._pacer.update_rate(congestion_window=window, smoothed_rtt=RTT)
    client.send_stream_data(client.get_next_available_stream_id(), bytes(1_000_000))
    pair.now += 1.0  # a full bucket
    return len(client.datagrams_to_send(pair.now))


@pytest.mark.parametrize("window", [80_000_000, 2_000_000])
def test_a_send_pass_lets_a_whole_burst_out_at_a_high_rate(window: int) -> None:
    sent = _one_pass_at_window(window)
    # a burst (and what the driver's slack adds), not the whole window
    assert MAX_BURST <= sent <= 2 * MAX_BURST + 2


def test_a_slow_rate_is_still_paced() -> None:
    # 30 datagrams of window at 1 ms: one every 33 us, a burst of 7 (a quarter window)
    sent = _one_pass_at_window(30 * 1200)
    assert 7 <= sent < 30


@pytest.mark.parametrize("window", [80_000_000, 2_000_000, 30 * 1200])
def test_the_burst_is_aioquics_where_its_floor_does_not_bite(window: int) -> None:
    ours = BurstPacer(max_datagram_size=1200)
    theirs = QuicPacketPacer(max_datagram_size=1200)
    for pacer in (ours, theirs):
        pacer.update_rate(congestion_window=window, smoothed_rtt=RTT)
    assert ours.packet_time == theirs.packet_time
    burst_bytes = min(window // 4, MAX_BURST * 1200)
    if 1200 / (window / RTT) >= 1e-6:  # the floor does not bite
        assert ours.bucket_max == pytest.approx(theirs.bucket_max)
    else:
        assert ours.bucket_max == pytest.approx(burst_bytes / 1200 * 1e-6)


def test_a_rate_update_keeps_a_full_bucket() -> None:
    # every ACK updates the rate: a full bucket must still let a whole burst out after it
    pacer = BurstPacer(max_datagram_size=1200)
    pacer.update_rate(congestion_window=80_000_000, smoothed_rtt=RTT)
    pacer.update_bucket(now=1.0)
    full = pacer.bucket_time
    assert full == pytest.approx(MAX_BURST * 1e-6)
    pacer.update_rate(congestion_window=80_000_000, smoothed_rtt=RTT)
    assert pacer.bucket_time == full
    # ... and a smaller burst still cuts it down (4 datagrams of window: a burst of 2, at the
    # floor of 1 us each with a 1 us RTT)
    pacer.update_rate(congestion_window=4 * 1200, smoothed_rtt=1e-6)
    assert pacer.bucket_time == pytest.approx(2e-6)
