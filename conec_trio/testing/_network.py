"""The fake network itself: hosts, their sockets, and the task that moves datagrams.

See the package docstring (``conec_trio.testing``) for the model and how to use it.
"""

from __future__ import annotations

import contextvars
import errno
import heapq
import itertools
import math
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from .._quic import set_socket_factory
from .._util import unwrap_single_exception
from ._hosts import FakeSocket, Host
from ._nat import (
    BLOCKED,
    LOST,
    NO_SOCKET,
    QUEUE_FULL,
    SOCKET_CLOSED,
    TOO_BIG,
    UNROUTED,
    Address,
    Datagram,
    Filtering,
    Nat,
    NatKind,
)
from ._spin import spin_guard


@dataclass
class _Path:
    rng: random.Random
    last_delivery: float = -math.inf


class FakeNetwork:
    """Hosts, NATs and the datagrams between them (see the ``conec_trio.testing`` docstring).

    ``loss`` and ``duplicate`` are probabilities per datagram; ``delay`` is (min, max) in
    seconds, drawn uniformly per datagram; delivery on a path (sender address, destination)
    stays in order unless ``reorder`` (a probability) holds a datagram back by an extra
    ``delay[1]`` (at least 1 ms) so later ones overtake it. Datagrams of more than ``mtu``
    bytes (UDP payload; 1472 is what a 1500-byte Ethernet MTU carries over IPv4) are dropped,
    as a path drops what it cannot carry (None: no limit). A socket holds at most
    ``queue_limit`` unread datagrams; more are dropped.

    Use it through ``open_fake_network``, which runs its delivery task and makes conec_trio
    use it; ``socket_factory`` is the hook it installs.
    """

    def __init__(
        self,
        seed: int | str = 0,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        reorder: float = 0.0,
        mtu: int | None = 1472,
        queue_limit: int = 1024,
    ) -> None:
        for name, p in (("loss", loss), ("duplicate", duplicate), ("reorder", reorder)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability between 0 and 1, not {p!r}")
        if len(delay) != 2 or not 0 <= delay[0] <= delay[1]:
            raise ValueError(f"delay must be (min, max) with 0 <= min <= max, not {delay!r}")
        self._check_mtu(mtu)
        self.seed = seed
        self.loss = loss
        self.duplicate = duplicate
        self.delay = delay
        self.reorder = reorder
        self.mtu = mtu
        self.queue_limit = queue_limit
        self.hosts: dict[str, Host] = {}
        self.nats: dict[str, Nat] = {}
        self.stats: Counter[str] = Counter()  # "sent", "delivered", "duplicated"
        self.dropped: Counter[str] = Counter()  # by reason (LOST, FILTERED, ...)
        self.sent_log: list[Datagram] = []  # every datagram sent, in order
        self._filters: list[Callable[[Datagram], bool]] = []
        self._paths: dict[tuple[Address, Address], _Path] = {}
        self._in_flight: list[tuple[float, int, Datagram, Host | Nat]] = []
        self._seq = itertools.count()
        self._wakeup = trio.lowlevel.ParkingLot()
        self._current_host: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"fakenet_host_{id(self)}", default=None
        )

    @staticmethod
    def _check_mtu(mtu: int | None) -> None:
        if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or mtu < 0):
            raise ValueError(f"mtu must be a number of bytes or None, not {mtu!r}")

    def set_mtu(self, mtu: int | None) -> None:
        """Change the largest datagram the network carries, mid-run (None: no limit), as
        when a route moves to a tunnel or a VPN comes up. Datagrams sent from now on over
        ``mtu`` bytes are dropped ("too-big"); those already in flight still arrive."""
        self._check_mtu(mtu)
        self.mtu = mtu

    # -- building the network ---------------------------------------------------------------

    def _check_new_ip(self, ip: str) -> None:
        try:
            socket.inet_aton(ip)
        except OSError:
            raise ValueError(f"{ip!r} is not an IPv4 address") from None
        if ip in self.hosts or ip in self.nats:
            raise ValueError(f"{ip} is already on the network")

    def add_nat(
        self,
        public_ip: str,
        *,
        kind: NatKind = "cone",
        filtering: Filtering = "port-restricted",
    ) -> Nat:
        """A NAT with public address ``public_ip``; put hosts behind it with ``add_host``.

        ``kind``: "cone" or "symmetric"; ``filtering``: "open", "address-restricted" or
        "port-restricted" (see ``Nat``). ``ValueError`` for another kind or filtering, or
        an address already on the network.
        """
        self._check_new_ip(public_ip)
        nat = Nat(public_ip, kind, filtering, random.Random(f"{self.seed}|nat|{public_ip}"))
        self.nats[public_ip] = nat
        return nat

    def add_host(self, ip: str, *, behind: Nat | None = None) -> Host:
        """A host with address ``ip`` behind NAT ``behind`` (None: on the public side).

        Hosts behind one NAT reach each other directly; other traffic of theirs goes out
        through it. ``ValueError`` if ``ip`` is already on the network.
        """
        if behind is not None and self.nats.get(behind.public_ip) is not behind:
            raise ValueError(f"{behind!r} is not a NAT of this network")
        self._check_new_ip(ip)
        host = Host(ip, behind, self)
        self.hosts[ip] = host
        return host

    @contextmanager
    def on_host(self, ip: str) -> Iterator[Host]:
        """Sockets bound to "0.0.0.0" in this context (and tasks spawned from it) land on
        host ``ip``: a client opened in it lives on that host. ``KeyError`` if there is no
        such host."""
        host = self.host(ip)
        token = self._current_host.set(ip)
        try:
            yield host
        finally:
            self._current_host.reset(token)

    def add_filter(self, drop: Callable[[Datagram], bool]) -> Callable[[], None]:
        """Drop every datagram for which ``drop(datagram)`` is true when it arrives (counted
        as "blocked"). Returns a function that removes the filter."""
        self._filters.append(drop)

        def remove() -> None:
            if drop in self._filters:
                self._filters.remove(drop)

        return remove

    def block(self, a: str, b: str | None = None) -> Callable[[], None]:
        """Drop every datagram between IP ``a`` and IP ``b`` (or anyone, if ``b`` is None),
        either way, matching addresses on both sides of any NAT, datagrams already in flight
        included. Returns a function that lifts the block."""

        def ends(d: Datagram) -> tuple[set[str], set[str]]:
            srcs = {d.sender[0], d.src[0]}
            dsts = {d.dst[0]} | ({d.final_dst[0]} if d.final_dst else set())
            return srcs, dsts

        def drop(d: Datagram) -> bool:
            srcs, dsts = ends(d)
            if b is None:
                return a in srcs or a in dsts
            return (a in srcs and b in dsts) or (b in srcs and a in dsts)

        return self.add_filter(drop)

    # -- queries -----------------------------------------------------------------------------

    def host(self, ip: str) -> Host:
        """The host with address ``ip``; ``KeyError`` if there is none."""
        try:
            return self.hosts[ip]
        except KeyError:
            raise KeyError(f"no host {ip} on the fake network (add it with add_host)") from None

    def open_sockets(self) -> list[FakeSocket]:
        """Every socket still bound, on any host."""
        return [s for h in self.hosts.values() for s in h.sockets.values()]

    def sent(
        self,
        *,
        by: str | None = None,
        to: str | None = None,
        min_size: int = 0,
        where: Callable[[Datagram], bool] | None = None,
    ) -> int:
        """How many datagrams were sent by host IP ``by``, to destination IP ``to``, of at
        least ``min_size`` bytes, for which ``where`` holds."""
        return len(self._select(by, to, min_size, where))

    def sent_bytes(
        self,
        *,
        by: str | None = None,
        to: str | None = None,
        where: Callable[[Datagram], bool] | None = None,
    ) -> int:
        """How many bytes of UDP payload ``sent()`` with the same filters counts."""
        return sum(len(d.data) for d in self._select(by, to, 0, where))

    def _select(
        self,
        by: str | None,
        to: str | None,
        min_size: int,
        where: Callable[[Datagram], bool] | None,
    ) -> list[Datagram]:
        return [
            d
            for d in self.sent_log
            if (by is None or d.sender[0] == by)
            and (to is None or d.dst[0] == to)
            and len(d.data) >= min_size
            and (where is None or where(d))
        ]

    # -- sockets -------------------------------------------------------------------------------

    def socket_factory(self, family: int, host: str, port: int) -> FakeSocket:
        """Bind a socket on the fake network: the socket factory ``open_fake_network``
        installs. A specific ``host`` picks that host; "0.0.0.0" the one ``on_host`` chose.
        ``OSError`` for IPv6, an unknown host, or "0.0.0.0" outside ``on_host``."""
        if family != socket.AF_INET:
            raise OSError(errno.EAFNOSUPPORT, "the fake network is IPv4 only")
        if host in ("0.0.0.0", ""):
            current = self._current_host.get()
            if current is None:
                raise OSError(
                    errno.EADDRNOTAVAIL,
                    "binding 0.0.0.0 on the fake network needs a host: use net.on_host(ip)",
                )
            host = current
        if host not in self.hosts:
            raise OSError(errno.EADDRNOTAVAIL, f"no host {host} on the fake network")
        return self.hosts[host].bind(port)

    # -- moving datagrams ----------------------------------------------------------------------

    def _path(self, sender: Address, dst: Address) -> _Path:
        path = self._paths.get((sender, dst))
        if path is None:
            path = _Path(random.Random(f"{self.seed}|{sender}|{dst}"))
            self._paths[(sender, dst)] = path
        return path

    def _drop(self, host: Host, reason: str) -> None:
        self.dropped[reason] += 1
        host.dropped[reason] += 1

    def send(self, sock: FakeSocket, data: bytes, addr: tuple[Any, ...]) -> None:
        """Take a datagram from ``sock`` to ``addr`` (what ``FakeSocket.sendto_nowait`` calls)."""
        host = sock.host
        if sock.closed:
            self._drop(host, SOCKET_CLOSED)
            return
        dst_ip = str(addr[0])
        if dst_ip.startswith("::ffff:"):
            dst_ip = dst_ip[len("::ffff:") :]
        dst = (dst_ip, int(addr[1]))
        now = trio.current_time()
        self.stats["sent"] += 1
        host.stats["sent"] += 1
        sock.stats["sent"] += 1
        src = sock.address
        target: Host | Nat | None = None
        dst_host = self.hosts.get(dst_ip)
        if dst_host is not None and dst_host.nat is host.nat:
            target = dst_host  # same realm: no translation
        else:
            if host.nat is not None:
                src = host.nat.outbound(src, dst)
            if dst_host is not None and dst_host.nat is None:
                target = dst_host
            elif dst_ip in self.nats:
                target = self.nats[dst_ip]
        datagram = Datagram(data, sock.address, src, dst, now)
        self.sent_log.append(datagram)
        if target is None:
            self._drop(host, UNROUTED)
            return
        if self.mtu is not None and len(data) > self.mtu:
            self._drop(host, TOO_BIG)
            return
        path = self._path(sock.address, dst)
        rng = path.rng
        if rng.random() < self.loss:
            self._drop(host, LOST)
            return
        copies = 1
        if rng.random() < self.duplicate:
            copies = 2
            self.stats["duplicated"] += 1
        for _ in range(copies):
            at = now + rng.uniform(*self.delay)
            if rng.random() < self.reorder:
                at += max(self.delay[1], 0.001)  # held back: later datagrams overtake it
            else:
                at = max(at, path.last_delivery)  # first in, first out on this path
                path.last_delivery = at
            heapq.heappush(self._in_flight, (at, next(self._seq), datagram, target))
        self._wakeup.unpark_all()

    def _arrive(self, datagram: Datagram, target: Host | Nat) -> None:
        sender = self.hosts[datagram.sender[0]]
        if isinstance(target, Nat):
            where = target.inbound(datagram.src, datagram.dst[1])
            if isinstance(where, str):
                self._drop(sender, where)
                return
            final = where
        else:
            final = datagram.dst
        arrived = Datagram(
            datagram.data, datagram.sender, datagram.src, datagram.dst, datagram.sent_at, final
        )
        if any(drop(arrived) for drop in self._filters):
            self._drop(sender, BLOCKED)
            return
        host = self.hosts[final[0]]
        sock = host.sockets.get(final[1])
        if sock is None:
            self._drop(sender, NO_SOCKET)
            return
        if not sock._deliver(datagram.data, datagram.src):
            self._drop(sender, QUEUE_FULL)
            return
        self.stats["delivered"] += 1
        host.stats["received"] += 1
        host.received_from[datagram.src[0]] += 1

    async def _route(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver every datagram when its time comes (one task for the whole network)."""
        task_status.started()
        in_flight = self._in_flight
        while True:
            deadline = in_flight[0][0] if in_flight else math.inf
            with trio.move_on_at(deadline):
                await self._wakeup.park()
            now = trio.current_time()
            while in_flight and in_flight[0][0] <= now:
                _, _, datagram, target = heapq.heappop(in_flight)
                self._arrive(datagram, target)


@asynccontextmanager
async def open_fake_network(
    seed: int | str = 0,
    *,
    loss: float = 0.0,
    duplicate: float = 0.0,
    delay: tuple[float, float] = (0.0, 0.0),
    reorder: float = 0.0,
    mtu: int | None = 1472,
    queue_limit: int = 1024,
    spin_limit: float = 0.5,
) -> AsyncIterator[FakeNetwork]:
    """A running ``FakeNetwork`` that every conec_trio endpoint opened in the block uses.

    The arguments are ``FakeNetwork``'s; the same seed gives the same losses, delays and
    NAT ports. The socket factory in place before (normally real sockets) is back when the
    block exits, and the delivery task ends with it. An exception from the block comes out
    as it is, not in an exception group. Under ``trio.testing.MockClock``, tasks that
    busy-loop while the clock stands still for ``spin_limit`` seconds of wall time fail the
    block with ``SpinError`` naming them, instead of hanging the test.

    Not for concurrent use: one fake network at a time per process.
    """
    net = FakeNetwork(
        seed,
        loss=loss,
        duplicate=duplicate,
        delay=delay,
        reorder=reorder,
        mtu=mtu,
        queue_limit=queue_limit,
    )
    with unwrap_single_exception():
        async with trio.open_nursery() as nursery:
            await nursery.start(net._route)
            old = set_socket_factory(net.socket_factory)
            try:
                async with spin_guard(spin_limit):
                    yield net
            finally:
                set_socket_factory(old)
                nursery.cancel_scope.cancel()
