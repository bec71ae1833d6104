"""The benchmark cases: each conec_trio subject next to the raw-aioquic baseline it is judged by.

Subjects are looked up in ``subject_conec`` only when a case runs, so a missing or unfinished
library part makes that one case report "subject not available".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import baseline_aioquic
from .harness import Case, register


@dataclass(frozen=True)
class Sizes:
    bulk_bytes: int
    pingpong_seconds: float
    oneway_count: int
    handshakes: int
    channel_opens: int
    connect_many: int
    connect_batch: int = 100


QUICK = Sizes(
    bulk_bytes=20_000_000, pingpong_seconds=2.0, oneway_count=20_000, handshakes=20,
    channel_opens=10, connect_many=100,
)  # fmt: skip
FULL = Sizes(
    bulk_bytes=100_000_000, pingpong_seconds=5.0, oneway_count=100_000, handshakes=20,
    channel_opens=10, connect_many=1000,
)  # fmt: skip


def sizes(quick: bool) -> Sizes:
    return QUICK if quick else FULL


def _subject(name: str) -> Callable[..., float]:
    from . import subject_conec

    fn: Callable[..., float] = getattr(subject_conec, name)
    return fn


def _bulk_baseline(quick: bool) -> float:
    return baseline_aioquic.bulk(sizes(quick).bulk_bytes)


def _pingpong_baseline(quick: bool) -> float:
    return baseline_aioquic.pingpong(sizes(quick).pingpong_seconds)


def _handshake_baseline(quick: bool) -> float:
    return baseline_aioquic.handshake(sizes(quick).handshakes)


# A broadcast sends its payload to every receiver: the payload is the bulk size divided among
# the receivers (at least this much), so that the coordinator hands on about the bulk size in
# all and a run lasts about as long whatever the fan-out.
MIN_FANOUT_BYTES = 1_000_000


def fanout_bytes(quick: bool, receivers: int) -> int:
    return max(MIN_FANOUT_BYTES, sizes(quick).bulk_bytes // receivers)


def _bulk_case(
    name: str,
    description: str,
    target: float | None,
    receivers: int = 0,
    max_datagram: int | None = None,
) -> Case:
    def subject(quick: bool) -> float:
        with _datagram_cap(max_datagram):
            if receivers:
                return _subject("broadcast_fanout")(fanout_bytes(quick, receivers), receivers)
            return _subject(name)(sizes(quick).bulk_bytes)

    return register(
        Case(
            name=name if max_datagram is None else f"{name}_{max_datagram}",
            description=description,
            unit="MB/s",
            higher_is_better=True,
            baseline=_bulk_baseline,
            subject=subject,
            baseline_name="aioquic bulk",
            target=target,
        )
    )


@contextlib.contextmanager
def _datagram_cap(size: int | None) -> Iterator[None]:
    """Run a subject with path MTU probing capped at ``size`` (None: the library default)."""
    from .subject_conec import DATAGRAM_ENV

    if size is None:
        yield
        return
    os.environ[DATAGRAM_ENV] = str(size)
    try:
        yield
    finally:
        del os.environ[DATAGRAM_ENV]


# The same three at aioquic's default 1200-byte datagrams (no path MTU probing).
for _name, _target in (("trio_endpoint_bulk", 1.0), ("proxied_bulk", 0.45), ("direct_bulk", 0.9)):
    _bulk_case(_name, f"{_name} with 1200-byte datagrams", target=_target, max_datagram=1200)

_bulk_case(
    "trio_endpoint_bulk",
    "one QUIC stream point to point, conec_trio's Trio endpoint vs aioquic asyncio",
    target=1.0,
)
_bulk_case("proxied_bulk", "client -> coordinator -> client stream vs aioquic bulk", target=0.45)
_bulk_case("direct_bulk", "direct client-to-client stream vs aioquic bulk", target=0.9)

register(
    Case(
        name="pingpong_proxied",
        description="64-byte round trips on a proxied stream vs aioquic point to point",
        unit="round trips/s",
        higher_is_better=True,
        baseline=_pingpong_baseline,
        subject=lambda quick: _subject("pingpong_proxied")(sizes(quick).pingpong_seconds),
        baseline_name="aioquic pingpong",
    )
)

register(
    Case(
        name="oneway_small_proxied",
        description="64-byte messages one way on a proxied stream vs aioquic point to point",
        unit="msgs/s",
        higher_is_better=True,
        baseline=lambda quick: baseline_aioquic.oneway_small(sizes(quick).oneway_count),
        subject=lambda quick: _subject("oneway_small_proxied")(sizes(quick).oneway_count),
        baseline_name="aioquic oneway_small",
    )
)

register(
    Case(
        name="open_client",
        description="median time for open_client vs an aioquic connect() handshake",
        unit="ms",
        higher_is_better=False,
        baseline=_handshake_baseline,
        subject=lambda quick: _subject("open_client")(sizes(quick).handshakes),
        baseline_name="aioquic handshake",
        target=1 / 1.2,
    )
)

register(
    Case(
        name="channel_open",
        description="median time for new_channel (brokered direct channel, hole punching, "
        "pinned-certificate handshake) vs an aioquic connect() handshake",
        unit="ms",
        higher_is_better=False,
        baseline=_handshake_baseline,
        subject=lambda quick: _subject("channel_open")(sizes(quick).channel_opens),
        baseline_name="aioquic handshake",
        target=1 / 1.2,
    )
)

for _n in (1, 10, 50):
    _bulk_case(
        f"broadcast_fanout_{_n}",
        f"broadcast of 1/{_n} of the bulk payload to each of {_n} receiver(s), "
        "per-receiver MB/s vs aioquic bulk (one receiver)",
        target=None,
        receivers=_n,
    )

register(
    Case(
        name="connect_many",
        description="time to bring many clients up (batches of 100) vs aioquic connections",
        unit="s",
        higher_is_better=False,
        baseline=lambda quick: baseline_aioquic.connect_many(
            sizes(quick).connect_many, sizes(quick).connect_batch
        ),
        subject=lambda quick: _subject("connect_many")(
            sizes(quick).connect_many, sizes(quick).connect_batch
        ),
        baseline_name="aioquic connect_many",
    )
)


# TCP port forwarding (``tunnel.py``): a bulk TCP transfer through ``conec-trio forward`` and
# ``expose`` (separate processes), judged against the same transfer over plain loopback TCP.
def _tunnel_baseline(quick: bool) -> float:
    from . import tunnel

    return tunnel.loopback_tcp(sizes(quick).bulk_bytes)


def _tunnel_case(name: str, description: str) -> Case:
    def subject(quick: bool) -> float:
        from . import tunnel

        fn: Callable[[int], float] = getattr(tunnel, name)
        return fn(sizes(quick).bulk_bytes)

    return register(
        Case(
            name=name,
            description=description,
            unit="MB/s",
            higher_is_better=True,
            baseline=_tunnel_baseline,
            subject=subject,
            baseline_name="loopback TCP bulk",
        )
    )


_tunnel_case(
    "tunnel_direct",
    "bulk TCP through conec-trio forward -> direct channel -> expose vs plain loopback TCP",
)
_tunnel_case(
    "tunnel_proxied",
    "bulk TCP through conec-trio forward -> coordinator -> expose vs plain loopback TCP",
)
