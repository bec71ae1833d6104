"""UDP hole punching for direct channels: the punch datagram, which candidate addresses a
socket can send to, and the punching loop. No knowledge of clients or channels.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import trio

from ._quic import QuicEndpoint

# A punch packet: cannot be mistaken for QUIC (no registered connection id) and names its
# sender, so the receiver knows which pending channel it belongs to.
PUNCH_MAGIC = b"\x00conec-punch\x00"
PUNCH_INTERVAL = 0.05


def punch_packet(sender: str) -> bytes:
    return PUNCH_MAGIC + sender.encode()


def punch_sender(data: bytes) -> str | None:
    """The sender a punch names, or None if ``data`` is no punch."""
    if not data.startswith(PUNCH_MAGIC):
        return None
    return data[len(PUNCH_MAGIC) :].decode(errors="replace")


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


async def punch(
    endpoint: QuicEndpoint,
    packet: bytes,
    targets: list[tuple[Any, ...]],
    done: trio.Event,
) -> None:
    """Send ``packet`` to every target each ``PUNCH_INTERVAL`` until ``done`` (the caller
    bounds it in time)."""
    while not done.is_set():
        for addr in targets:
            await endpoint.send_raw(packet, addr)
        with trio.move_on_after(PUNCH_INTERVAL):
            await done.wait()
