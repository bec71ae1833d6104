"""UDP hole punching for direct channels: the punch datagram, which candidate addresses are
punched, and the punching loop. No knowledge of clients or channels.

What a peer sends to addresses it has not validated, and why it is bounded (a punch goes to
an address a third party could have named, so it must not make peers a flood):

- Where: the address the coordinator observed for the other side (a QUIC path it validated)
  and, only when both sides sit behind the same public IP (same NAT or LAN), at most
  ``MAX_LOCAL_CANDIDATES`` of the other side's own addresses, and only private-range ones
  (``is_local_candidate``): nowhere else can a local address help, and a public one there
  could name anyone. The coordinator filters the offer and the grant so; each peer checks
  again what it is given.
- How many, per channel attempt: each target ``FAST_PUNCHES`` times at ``PUNCH_INTERVAL``
  (the first second), then once per ``SLOW_PUNCH_INTERVAL`` until the channel is up or
  times out: at most ``MAX_PUNCHES_PER_ATTEMPT`` punches in all, plus one answer to the
  peer's first punch.
- How many a second, across all attempts: ``PUNCH_RATE`` on average and ``PUNCH_BURST`` at
  once (a ``TokenBucket`` each client has), whatever the number of offers.
- Only punches carrying the token of a channel the coordinator brokered count (and are
  answered); any other datagram that looks like a punch is ignored and costs nothing.
- A channel that is up: when the peer's packets go unanswered (its NAT gave it a new public
  port, which this side's NAT filters), the coordinator tells this side where it sees the
  peer now (``control.PeerAddress``), and this side punches there, at most ``FAST_PUNCHES``
  times at ``PUNCH_INTERVAL``, one run per channel at a time, within the same budget. Such
  a punch carries no channel's token: it only opens this side's NAT, and the peer ignores it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from typing import Any

import trio

from ._quic import QuicEndpoint
from ._util import TokenBucket
from ._wire.control import PUNCH_TOKEN_SIZE

# A punch packet: cannot be mistaken for QUIC (the fixed bit of its first byte is clear) and
# carries the channel's token, so the receiver knows which pending channel it belongs to.
PUNCH_MAGIC = b"\x00conec-punch\x00"
PUNCH_SIZE = len(PUNCH_MAGIC) + PUNCH_TOKEN_SIZE

PUNCH_INTERVAL = 0.05
FAST_PUNCHES = 20  # rounds at PUNCH_INTERVAL: most holes open within the first of them
SLOW_PUNCH_INTERVAL = 0.5  # then enough to outlast loss and keep the NAT mappings
PUNCH_TIMEOUT = 10.0  # the caller's bound: a direct channel's timeout

MAX_LOCAL_CANDIDATES = 3
MAX_TARGETS = 1 + MAX_LOCAL_CANDIDATES
MAX_PUNCHES_PER_ATTEMPT = MAX_TARGETS * (
    FAST_PUNCHES + int((PUNCH_TIMEOUT - FAST_PUNCHES * PUNCH_INTERVAL) / SLOW_PUNCH_INTERVAL)
)  # 4 * (20 + 18) = 152

PUNCH_RATE = 50.0  # punches a second a client sends, across all its channel attempts
PUNCH_BURST = 100

# Where a host's own address helps a peer behind the same public IP: private (RFC 1918),
# shared (RFC 6598: carrier-grade NAT), loopback and link-local; unique local for IPv6.
_LOCAL_NETWORKS = [
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
]


def punch_budget() -> TokenBucket:
    """A client's budget of punches, shared by all its channel attempts."""
    return TokenBucket(PUNCH_RATE, PUNCH_BURST)


def punch_packet(token: bytes) -> bytes:
    assert len(token) == PUNCH_TOKEN_SIZE
    return PUNCH_MAGIC + token


def punch_tag(token: bytes, receiver_cert_der: bytes) -> bytes:
    """What a punch for a channel carries: its token bound to the certificate of the side
    the punch goes to. A side punches only once it took the offer (or grant) naming that
    certificate, so a punch that verifies tells its receiver that the sender will accept
    the receiver's handshake (its pin check compares with that same certificate)."""
    return hmac.new(token, receiver_cert_der, hashlib.sha256).digest()[:PUNCH_TOKEN_SIZE]


def punch_token(data: bytes) -> bytes | None:
    """The token a punch carries, or None if ``data`` is no punch."""
    if len(data) != PUNCH_SIZE or not data.startswith(PUNCH_MAGIC):
        return None
    return data[len(PUNCH_MAGIC) :]


def is_local_candidate(host: str) -> bool:
    """Whether ``host`` is an address only a peer behind the same public IP could use."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _LOCAL_NETWORKS)


def candidates_for(
    observed: tuple[str, int], local_addrs: list[tuple[str, int]], viewer_ip: str
) -> list[tuple[str, int]]:
    """Where a peer whose public IP is ``viewer_ip`` may punch and dial a client that the
    coordinator observed at ``observed`` and that gave ``local_addrs`` as its own view."""
    out = [observed]
    if viewer_ip == observed[0]:  # behind the same NAT, or on the same LAN
        local = [a for a in local_addrs if a != observed and is_local_candidate(a[0])]
        out.extend(local[:MAX_LOCAL_CANDIDATES])
    return out


def punch_targets(addrs: list[tuple[str, int]], family: int) -> list[tuple[Any, ...]]:
    """Of the candidates the coordinator gave (the observed address first), those this
    client punches and dials, in a form its socket can send to."""
    chosen = addrs[:1] + [a for a in addrs[1:] if is_local_candidate(a[0])][:MAX_LOCAL_CANDIDATES]
    return usable_candidates(chosen, family)


def usable_candidates(addrs: list[tuple[str, int]], family: int) -> list[tuple[Any, ...]]:
    """Candidates a socket of ``family`` can send to, deduplicated, in the given order."""
    out: list[tuple[Any, ...]] = []
    for host, port in addrs:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.version == 4 and family == socket.AF_INET6:
            host = f"::ffff:{ip}"
        elif ip.version == 6 and family == socket.AF_INET:
            if ip.ipv4_mapped is None:
                continue
            host = str(ip.ipv4_mapped)
        if ip.is_unspecified:
            continue
        # An AF_INET6 socket names senders (host, port, flowinfo, scope_id).
        addr: tuple[Any, ...] = (host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
        if addr not in out:
            out.append(addr)
    return out


def punch_round(
    endpoint: QuicEndpoint, packet: bytes, targets: list[tuple[Any, ...]], budget: TokenBucket
) -> None:
    """The first round of ``punch``, sent at once without waiting (a full socket drops it)."""
    for addr in targets[:MAX_TARGETS]:
        if budget.take():
            endpoint.send_raw_nowait(packet, addr)


async def punch(
    endpoint: QuicEndpoint,
    packet: bytes,
    targets: list[tuple[Any, ...]],
    done: trio.Event,
    budget: TokenBucket,
    *,
    first_sent: bool = False,
) -> None:
    """Send ``packet`` to every target, on the schedule above and within ``budget``, until
    ``done`` (the caller bounds it in time: ``PUNCH_TIMEOUT``); with ``first_sent``, the
    caller sent the first round (``punch_round``)."""
    rounds = 0
    while not done.is_set():
        if rounds or not first_sent:
            for addr in targets[:MAX_TARGETS]:
                if budget.take():
                    await endpoint.send_raw(packet, addr)
        rounds += 1
        with trio.move_on_after(PUNCH_INTERVAL if rounds < FAST_PUNCHES else SLOW_PUNCH_INTERVAL):
            await done.wait()
