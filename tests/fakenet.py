"""A deterministic simulated UDP network for Trio tests, with NATs, loss, delay and reordering.

In the spirit of the fake network in trio's own ``test_dtls.py``: datagrams never touch the
operating system. Each one is routed (through simulated NATs), maybe lost or duplicated, and
delivered after a delay measured on trio's clock, so with ``MockClock(autojump_threshold=0)``
(pytest-trio's ``autojump_clock`` fixture) seconds of network time pass in no wall time.

Usage::

    async with fake_network(seed=1, loss=0.2, delay=(0.005, 0.05), reorder=0.1) as net:
        net.add_host("192.0.2.1")                      # a public host
        nat = net.add_nat("198.51.100.1", kind="cone")  # a NAT's public address
        net.add_host("10.0.1.2", behind=nat)            # a host behind it
        # Every endpoint conec_trio makes now uses a FakeSocket. A specific bind address
        # picks its host; "0.0.0.0" picks the host selected with net.on_host():
        with net.on_host("10.0.1.2"):
            async with conec_trio.open_client(config) as client: ...

``fake_network`` installs the fake socket factory for the duration of the block and restores
the previous one afterwards; the delivery task lives in a nursery the block owns.

Routing model: a host's IP is unique in the whole network. A datagram goes straight to a host
in the same realm (the public internet, or behind the same NAT). Otherwise a host behind a
NAT has its source translated by that NAT and the datagram goes on in the public realm, where
it can reach a public host or a NAT's public address. Anything else is dropped as
"unrouted". Arriving at a NAT's public address, a datagram needs a mapping for its port and
must pass the NAT's filtering, else it is dropped.

NAT kinds: ``"cone"`` maps a private address to one public port for every destination
(endpoint-independent mapping; the private port is kept if free); ``"symmetric"`` uses a
fresh public port for every destination. Filtering: ``"port-restricted"`` (only from an
(ip, port) the mapping sent to), ``"address-restricted"`` (only from an ip it sent to),
``"open"`` (anyone; a full cone with ``kind="cone"``).

Randomness (loss, duplication, delay, reordering, symmetric NAT ports) is drawn from one
seeded generator per path (sender address, destination), so what happens on one path does
not depend on how trio interleaves tasks sending on other paths.

For assertions: ``net.stats`` ("sent", "delivered", "duplicated") and ``net.dropped`` (by
reason: LOST, UNROUTED, TOO_BIG, NO_MAPPING, FILTERED, BLOCKED, NO_SOCKET, QUEUE_FULL,
SOCKET_CLOSED);
per host ``stats``, ``dropped`` (datagrams it sent) and ``received_from`` (by source IP);
``net.sent_log`` holds every datagram sent; ``net.sent(by=, to=, min_size=, where=)`` counts
them and ``net.sent_bytes(...)`` adds up their sizes. ``net.block(a, b)`` and
``net.add_filter(fn)`` drop traffic on purpose.

Under the autojump clock a busy loop (a task that keeps passing checkpoints without ever
waiting) would freeze simulated time and hang the test; ``fake_network`` (and
``spin_guard``) turn that into a ``SpinError`` naming the busiest task.
"""

from __future__ import annotations

import contextvars
import errno
import heapq
import itertools
import math
import random
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from conec_trio import _quic
from conec_trio._util import unwrap_single_exception

Address = tuple[str, int]
NatKind = Literal["cone", "symmetric"]
Filtering = Literal["port-restricted", "address-restricted", "open"]

# Drop reasons, as counted in ``FakeNetwork.dropped`` and ``Host.dropped``.
LOST = "lost"  # random loss on the wire
UNROUTED = "unrouted"  # no route to the destination address
NO_MAPPING = "no-mapping"  # arrived at a NAT port with no mapping
FILTERED = "filtered"  # the NAT's filtering refused it
BLOCKED = "blocked"  # a block() rule or a drop filter matched
NO_SOCKET = "no-socket"  # nothing bound at the destination port
QUEUE_FULL = "queue-full"  # the receiving socket's queue was full
TOO_BIG = "too-big"  # larger than the network's MTU
SOCKET_CLOSED = "socket-closed"  # sent from a socket that was already closed


@dataclass(frozen=True)
class Datagram:
    """One datagram in flight (or arrived)."""

    data: bytes
    sender: Address  # the sending socket's own address (private, if behind a NAT)
    src: Address  # the source as the receiver sees it (after NAT translation)
    dst: Address  # the destination the sender addressed
    sent_at: float
    final_dst: Address | None = None  # after the receiving NAT's translation, once known


@dataclass
class NatMapping:
    private: Address
    public_port: int
    contacted: set[Address] = field(default_factory=set)


class Nat:
    """A NAT with one public address (see the module docstring for kinds and filtering)."""

    def __init__(self, public_ip: str, kind: NatKind, filtering: Filtering, rng: random.Random):
        if kind not in ("cone", "symmetric"):
            raise ValueError(f"unknown NAT kind {kind!r}")
        if filtering not in ("port-restricted", "address-restricted", "open"):
            raise ValueError(f"unknown NAT filtering {filtering!r}")
        self.public_ip = public_ip
        self.kind = kind
        self.filtering = filtering
        self._rng = rng
        self._by_key: dict[Any, NatMapping] = {}
        self.mappings: dict[int, NatMapping] = {}  # by public port

    def __repr__(self) -> str:
        return f"<Nat {self.public_ip} {self.kind} {self.filtering}>"

    def _free_port(self, preferred: int | None) -> int:
        if preferred is not None and preferred not in self.mappings:
            return preferred
        while True:
            port = self._rng.randrange(20_000, 61_000)
            if port not in self.mappings:
                return port

    def outbound(self, private: Address, dst: Address) -> Address:
        """Translate the source of a datagram leaving through this NAT (makes a mapping)."""
        key: Any = private if self.kind == "cone" else (private, dst)
        mapping = self._by_key.get(key)
        if mapping is None:
            preferred = private[1] if self.kind == "cone" else None
            mapping = NatMapping(private, self._free_port(preferred))
            self._by_key[key] = mapping
            self.mappings[mapping.public_port] = mapping
        mapping.contacted.add(dst)
        return (self.public_ip, mapping.public_port)

    def inbound(self, src: Address, public_port: int) -> Address | str:
        """Where a datagram from ``src`` to ``public_port`` goes, or why it is dropped."""
        mapping = self.mappings.get(public_port)
        if mapping is None:
            return NO_MAPPING
        if self.filtering == "port-restricted":
            allowed = src in mapping.contacted
        elif self.filtering == "address-restricted":
            allowed = any(ip == src[0] for ip, _ in mapping.contacted)
        else:
            allowed = True
        return mapping.private if allowed else FILTERED


class Host:
    """A machine with one IP address, maybe behind a NAT."""

    def __init__(self, net: FakeNetwork, ip: str, nat: Nat | None) -> None:
        self.net = net
        self.ip = ip
        self.nat = nat
        self.sockets: dict[int, FakeSocket] = {}
        self.stats: Counter[str] = Counter()  # "sent", "received"
        self.received_from: Counter[str] = Counter()  # by source IP, as this host sees it
        self.dropped: Counter[str] = Counter()  # datagrams this host sent, by drop reason
        self._next_port = 50_000

    def __repr__(self) -> str:
        return f"<Host {self.ip}{f' behind {self.nat.public_ip}' if self.nat else ''}>"

    def bind(self, port: int) -> FakeSocket:
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
    """A bound UDP socket on the fake network: the ``DatagramSocket`` protocol of ``_quic``."""

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
        if self._queue:
            return self._queue.popleft()
        return None

    def sendto_nowait(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        self.host.net._send(self, bytes(data), addr)
        return True

    def send_batch_nowait(self, datagrams: list[tuple[bytes, tuple[Any, ...]]], start: int) -> int:
        for data, addr in datagrams[start:]:
            self.sendto_nowait(data, addr)
        return len(datagrams) - start

    async def wait_writable(self) -> None:
        # Sending never blocks on this network.
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.host.sockets.get(self.port) is self:
            del self.host.sockets[self.port]
        self._queue.clear()
        self._readable.unpark_all()

    def _deliver(self, data: bytes, src: Address) -> bool:
        if len(self._queue) >= self.host.net.queue_limit:
            return False
        self._queue.append((data, src))
        self.stats["received"] += 1
        self._readable.unpark_all()
        return True


class SpinError(AssertionError):
    """Tasks kept running while the mock clock stood still: a busy loop (see SpinGuard)."""


class SpinGuard(trio.abc.Instrument):
    """Notices a busy loop under ``MockClock(autojump_threshold=0)``.

    The autojump clock only moves when every task is blocked, so a task that loops through
    checkpoints without ever waiting freezes simulated time: ``trio.fail_after`` never fires
    and the test would hang. This instrument counts task steps while ``trio.current_time()``
    stays the same; past ``step_limit`` steps and ``wall_limit`` seconds of real time it
    calls ``on_spin`` once, with a description naming the busiest tasks.
    """

    def __init__(
        self, on_spin: Callable[[str], None], *, wall_limit: float, step_limit: int = 10_000
    ) -> None:
        self._on_spin = on_spin
        self._wall_limit = wall_limit
        self._step_limit = step_limit
        self._frozen_at = -math.inf
        self._since = time.monotonic()
        self._tasks: Counter[str] = Counter()
        self._steps = 0
        self.most_steps = 0  # the longest run of steps at one instant so far
        self.fired = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        now = trio.current_time()
        if now != self._frozen_at:
            self._frozen_at = now
            self._since = time.monotonic()
            self._steps = 0
            self._tasks.clear()
            return
        self._steps += 1
        self.most_steps = max(self.most_steps, self._steps)
        self._tasks[task.name] += 1
        if (
            not self.fired
            and self._steps >= self._step_limit
            and self._steps % 1000 == 0
            and time.monotonic() - self._since > self._wall_limit
        ):
            self.fired = True
            busiest = ", ".join(f"{name} ({n} steps)" for name, n in self._tasks.most_common(3))
            self._on_spin(
                f"busy loop: {self._steps} task steps in {time.monotonic() - self._since:.1f} s "
                f"of wall time while trio's clock stood still at {now:.6f}; busiest: {busiest}"
            )


@dataclass
class _Path:
    rng: random.Random
    last_delivery: float = -math.inf


class FakeNetwork:
    """Hosts, NATs and the datagrams between them (see the module docstring).

    ``loss`` and ``duplicate`` are probabilities per datagram; ``delay`` is (min, max) in
    seconds, drawn uniformly per datagram; delivery on a path (sender address, destination)
    stays in order unless ``reorder`` (a probability) holds a datagram back by an extra
    ``delay[1]`` (at least 1 ms) so later ones overtake it. Datagrams of more than ``mtu``
    bytes (UDP payload; 1472 is what a 1500-byte Ethernet MTU carries over IPv4) are dropped,
    as a path drops what it cannot carry (None: no limit).
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
        if not 0 <= delay[0] <= delay[1]:
            raise ValueError(f"delay must be (min, max) with 0 <= min <= max, not {delay!r}")
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

    # -- building the network ---------------------------------------------------------------

    def _check_new_ip(self, ip: str) -> None:
        if ip in self.hosts or ip in self.nats:
            raise ValueError(f"{ip} is already on the network")

    def add_nat(
        self,
        public_ip: str,
        *,
        kind: NatKind = "cone",
        filtering: Filtering = "port-restricted",
    ) -> Nat:
        self._check_new_ip(public_ip)
        nat = Nat(public_ip, kind, filtering, random.Random(f"{self.seed}|nat|{public_ip}"))
        self.nats[public_ip] = nat
        return nat

    def add_host(self, ip: str, *, behind: Nat | None = None) -> Host:
        self._check_new_ip(ip)
        host = Host(self, ip, behind)
        self.hosts[ip] = host
        return host

    @contextmanager
    def on_host(self, ip: str) -> Iterator[Host]:
        """Sockets bound to "0.0.0.0" in this context (and tasks spawned from it) land on
        host ``ip``."""
        host = self.hosts[ip]
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
        return self.hosts[ip]

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
        """A ``_quic.SocketFactory``: bind on the fake network."""
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

    def _send(self, sock: FakeSocket, data: bytes, addr: tuple[Any, ...]) -> None:
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
async def spin_guard(wall_limit: float = 0.5) -> AsyncIterator[SpinGuard]:
    """Cancel the block and raise ``SpinError`` if tasks busy-loop while trio's clock stands
    still for ``wall_limit`` seconds of wall time (see ``SpinGuard``), instead of hanging."""
    spins: list[str] = []
    token = trio.lowlevel.current_trio_token()
    try:
        with trio.CancelScope() as scope:

            def on_spin(description: str) -> None:
                spins.append(description)
                token.run_sync_soon(scope.cancel)

            guard = SpinGuard(on_spin, wall_limit=wall_limit)
            trio.lowlevel.add_instrument(guard)
            try:
                yield guard
            finally:
                trio.lowlevel.remove_instrument(guard)
    except BaseException as exc:
        # Whatever the cancellation turned into on its way out, the spin is the cause.
        if spins:
            raise SpinError(spins[0]) from exc
        raise
    if spins:
        raise SpinError(spins[0])


@asynccontextmanager
async def fake_network(
    seed: int | str = 0, *, spin_limit: float = 0.5, **options: Any
) -> AsyncIterator[FakeNetwork]:
    """A running ``FakeNetwork`` that every new conec_trio endpoint uses, for the block.

    The previous socket factory (normally real sockets) is restored on the way out. A busy
    loop under the mock clock fails the block with ``SpinError`` (see ``spin_guard``).
    """
    net = FakeNetwork(seed, **options)
    with unwrap_single_exception():  # the block's own error, not an exception group
        async with trio.open_nursery() as nursery:
            await nursery.start(net._route)
            old = _quic.set_socket_factory(net.socket_factory)
            try:
                async with spin_guard(spin_limit):
                    yield net
            finally:
                _quic.set_socket_factory(old)
                nursery.cancel_scope.cancel()
