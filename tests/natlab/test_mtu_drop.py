"""A path whose MTU drops mid-transfer, on the lab's real network stack.

Client a sends a bulk transfer to b, over a direct channel or proxied through the
coordinator; both paths cross nat-a's public link. Once path MTU probing has raised a's
datagrams above 1400 bytes, that link starts dropping every UDP packet above 1400 bytes,
silently, both ways (a VPN or tunnel coming up). The connection must notice the black hole,
fall back to a size that passes and carry on; once the limit is lifted its datagrams must
grow back. At the end b's sha256 of what arrived must match a's of what was sent.

The lab's links are Ethernet veths (1500-byte MTU), so the largest size probing finds is
1452 bytes of UDP payload (an IP packet of 1480): the limit catches exactly that, and the
fallback is to the 1200 bytes every QUIC path carries.

Times come from ``time.monotonic()`` in every process (one clock for the whole machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from .nodes import Event, Scene, SceneFactory

LIMIT = 1400  # the largest IP packet the link carries while limited
IP_UDP_HEADERS = 28
LARGEST_PASSING = LIMIT - IP_UDP_HEADERS  # UDP payload
# The promise: the transfer goes on within this long of the drop starting.
RESUME_BOUND = 2.0
# Bounds on waits that are not what the test measures.
PROBED_UP_BOUND = 10.0  # a's datagrams first grow above the limit
FALLBACK_BOUND = 5.0
PROGRESS_AT_SMALL_SIZE = 1024 * 1024  # carried at the fallback size before the lift
# Sizes that failed are probed again 1 s after the fallback, then at growing intervals;
# the limit is lifted once one such probe was dropped, and the next one gets through.
REPROBE_BOUND = 5.0
CLIMB_BACK_BOUND = 10.0


def size_above(limit: int, after: float) -> Callable[[Event], bool]:
    return lambda e: e["size"] is not None and e["size"] > limit and e["t"] > after


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"no {what} within {timeout:g} s")
        time.sleep(0.02)


def longest_stall_after(start: float, received: Event) -> float:
    """The longest time without data arriving at the receiver from ``start`` on (gaps
    under the node's 50 ms threshold count as none)."""
    assert received["last"] > start, received
    return max(
        (end - max(begin, start) for begin, end in received["stalls"] if end > start),
        default=0.0,
    )


def drop_mid_transfer(s: Scene, path: str) -> dict[str, float]:
    """a sends to b over ``path`` while nat-a's link drops and then carries large datagrams
    again; checks what arrived and returns the times measured."""
    started = s.a.command(f"bulk b {path}")
    assert "error" not in started, (started, s.logs())
    assert started["is_direct"] is (path == "direct"), started
    s.a.expect_where("size", PROBED_UP_BOUND, size_above(LIMIT, 0.0), f"above {LIMIT}")

    drop = time.monotonic()
    s.lab.limit_udp_size("a", LIMIT)
    fell = s.a.expect_where(
        "size",
        FALLBACK_BOUND,
        lambda e: e["size"] is not None and e["size"] <= LARGEST_PASSING and e["t"] > drop,
        f"at most {LARGEST_PASSING} after the drop",
    )
    # The transfer goes on at the small size (well past what was in flight at the drop).
    seen = s.b.expect_where("progress", RESUME_BOUND, lambda e: e["t"] > fell["t"], "resumed")
    s.b.expect_where(
        "progress",
        RESUME_BOUND + 5.0,
        lambda e: e["bytes"] >= seen["bytes"] + PROGRESS_AT_SMALL_SIZE,
        "a megabyte more",
    )
    # Everything a sends now passes, but for its probes of larger sizes: wait for one to
    # be dropped, so the transfer lives through a failed re-probe while limited.
    oversize = s.lab.counters("pub")["oversize outbound nat-a"]
    assert oversize > 0  # a's large datagrams did hit the limit
    wait_for(
        lambda: s.lab.counters("pub")["oversize outbound nat-a"] > oversize,
        REPROBE_BOUND,
        "probe of a larger size dropped",
    )

    dropped = s.lab.counters("pub")["oversize outbound nat-a"]
    lift = time.monotonic()
    s.lab.lift_udp_limit("a")
    climbed = s.a.expect_where("size", CLIMB_BACK_BOUND, size_above(LIMIT, lift), "climbed back")
    # ... and data flows at that size.
    s.b.expect_where("progress", RESUME_BOUND, lambda e: e["t"] > climbed["t"], "after climbing")
    # While limited, a never went back above the limit.
    early = [e for e in s.a.pending("size") if fell["t"] < e["t"] < lift and e["size"] > LIMIT]
    assert not early, early

    finished = s.a.command("finish")
    assert "error" not in finished, (finished, s.logs())
    received = s.b.expect("bulk-received", 10.0, peer="a")
    assert "error" not in received, (received, s.logs())
    assert received["is_direct"] is (path == "direct"), received
    assert received["bytes"] == finished["bytes"], (received, finished)
    assert received["sha256"] == finished["sha256"], (received, finished)
    assert finished["receiver"]["sha256"] == finished["sha256"], finished

    stall = longest_stall_after(drop, received)
    assert stall < RESUME_BOUND, received["stalls"]
    seconds = received["last"] - received["first"]
    return {
        "stall": stall,
        "fallback": fell["t"] - drop,
        "limited": lift - drop,
        "climb": climbed["t"] - lift,
        "megabytes": received["bytes"] / 1e6,
        "seconds": seconds,
        "dropped": dropped,
    }


def describe(times: dict[str, float]) -> str:
    return (
        f"longest stall {times['stall']:.2f} s after the drop; fell back after "
        f"{times['fallback']:.2f} s; limit lifted after {times['limited']:.2f} s, size above "
        f"{LIMIT} again {times['climb']:.2f} s later; {times['megabytes']:.0f} MB in "
        f"{times['seconds']:.1f} s; {times['dropped']:.0f} datagrams dropped"
    )


@pytest.mark.parametrize("path", ["direct", "proxied"])
def test_transfer_survives_an_mtu_drop_and_grows_back(
    scene: SceneFactory, record_property: Callable[[str, object], None], path: str
) -> None:
    times = drop_mid_transfer(scene(), path)
    record_property("timing", f"{path}: {describe(times)}")
