"""Hosts of the fake network and their UDP sockets."""

from __future__ import annotations

import errno
import socket
from collections import Counter, deque
from typing import Any, Protocol

import trio

from ._nat import Address, Nat


class Network(Protocol):
    """What hosts and sockets need of the network they are on."""

    queue_limit: int  # unread datagrams a socket holds at most

    def send(self, sock: FakeSocket, data: bytes, addr: tuple[Any, ...]) -> None:
        """Take a datagram from ``sock`` to ``addr``."""


class Host:
    """A machine with one IP address, maybe behind a NAT (made by ``FakeNetwork.add_host``).

    ``sockets`` holds its bound sockets by port; ``stats`` counts datagrams "sent" and
    "received"; ``received_from`` counts arrivals by source IP, as this host sees it;
    ``dropped`` counts the datagrams this host sent that were dropped, by reason.
    """

    def __init__(self, ip: str, nat: Nat | None, network: Network) -> None:
        self.ip = ip
        self.nat = nat
        self.sockets: dict[int, FakeSocket] = {}
        self.stats: Counter[str] = Counter()  # "sent", "received"
        self.received_from: Counter[str] = Counter()  # by source IP, as this host sees it
        self.dropped: Counter[str] = Counter()  # datagrams this host sent, by drop reason
        self._network = network
        self._next_port = 50_000

    def __repr__(self) -> str:
        return f"<Host {self.ip}{f' behind {self.nat.public_ip}' if self.nat else ''}>"

    def bind(self, port: int) -> FakeSocket:
        """A socket on this host at ``port`` (0: the next free one from 50000 up); ``OSError``
        (EADDRINUSE) if that port is taken."""
        if port == 0:
            while self._next_port in self.sockets:
                self._next_port += 1
            port = self._next_port
            self._next_port += 1
        elif port in self.sockets:
            raise OSError(errno.EADDRINUSE, f"{self.ip}:{port} is already bound")
        sock = FakeSocket(self, port)
        self.sockets[port] = sock
        return sock


class FakeSocket:
    """A bound UDP socket on the fake network, what conec_trio's endpoints use in its place.

    Sending never blocks and never fails: a datagram the network cannot deliver is counted
    in ``dropped``, as a real network loses it silently. ``stats`` counts "sent" and
    "received" datagrams of this socket.
    """

    family: int = socket.AF_INET

    def __init__(self, host: Host, port: int) -> None:
        self.host = host
        self.port = port
        self.closed = False
        self.stats: Counter[str] = Counter()  # "sent", "received"
        self._queue: deque[tuple[bytes, Address]] = deque()
        self._readable = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        return f"<FakeSocket {self.host.ip}:{self.port}{' closed' if self.closed else ''}>"

    @property
    def address(self) -> Address:
        return (self.host.ip, self.port)

    def getsockname(self) -> tuple[Any, ...]:
        return self.address

    async def wait_readable(self) -> None:
        """Wait until a datagram is queued. ``trio.ClosedResourceError`` if the socket is or
        gets closed; ``trio.BusyResourceError`` if another task is already waiting."""
        if self.closed:
            raise trio.ClosedResourceError("the socket was closed")
        if self._readable.statistics().tasks_waiting:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        if self._queue:
            await trio.lowlevel.checkpoint()
            return
        await self._readable.park()
        if self.closed:
            raise trio.ClosedResourceError("the socket was closed while waiting")

    def recvfrom_nowait(self) -> tuple[bytes, tuple[Any, ...]] | None:
        """The next queued ``(data, source address)``, or None."""
        if self._queue:
            return self._queue.popleft()
        return None

    def sendto_nowait(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """Send one datagram to ``addr`` (an IPv4 ``(ip, port)``); always True."""
        self.host._network.send(self, bytes(data), addr)
        return True

    def send_batch_nowait(self, datagrams: list[tuple[bytes, tuple[Any, ...]]], start: int) -> int:
        """Send ``datagrams[start:]``; returns how many (all of them)."""
        for data, addr in datagrams[start:]:
            self.sendto_nowait(data, addr)
        return len(datagrams) - start

    async def wait_writable(self) -> None:
        # Sending never blocks on this network.
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Unbind; a task waiting in ``wait_readable`` gets ``trio.ClosedResourceError``."""
        if self.closed:
            return
        self.closed = True
        if self.host.sockets.get(self.port) is self:
            del self.host.sockets[self.port]
        self._queue.clear()
        self._readable.unpark_all()

    def _deliver(self, data: bytes, src: Address) -> bool:
        if len(self._queue) >= self.host._network.queue_limit:
            return False
        self._queue.append((data, src))
        self.stats["received"] += 1
        self._readable.unpark_all()
        return True
