"""Staying connected to the coordinator: both programs keep one client connected and, whenever
it is lost (or not there yet), connect again with backoff (0.2 s doubling to 5 s, with jitter).

Each connection of a client is a *session*; TCP connections belong to the session that carried
them, and a lost session lets its connections run to their end (those over a direct channel do
not need the coordinator) while the next session takes new ones.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import (
    Client,
    ClientConfig,
    ConecError,
    ConnectError,
    IdInUseError,
    IncomingStream,
    open_client,
)
from .console import format_address, say

__all__ = ["COORD_CONNECT_TIMEOUT", "Backoff", "CoordinatorLink", "Session"]

log = logging.getLogger(__name__)

# How long one attempt to reach the coordinator may take before the next one, after a pause.
COORD_CONNECT_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0


# How long the probe of the coordinator's port waits for an ICMP error to come back.
PROBE_WAIT = 1.0


async def unreachable_udp(host: str, port: int) -> str | None:
    """``host:port`` if every address of ``host`` answers a UDP datagram to ``port`` with an
    ICMP "port unreachable"; None if any may be listening (or ``host`` does not resolve: the
    connection attempt says so).

    The probe is one empty datagram per address: not QUIC, so a coordinator drops it.
    """
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
    except OSError:
        return None
    refused: list[str] = []
    for family, type_, proto, _, addr in infos:
        with trio.socket.socket(family, type_, proto) as sock:
            try:
                await sock.connect(addr)
                await sock.send(b"")
                with trio.move_on_after(PROBE_WAIT):
                    await sock.recv(1)
                return None  # an answer, or silence: something may be there
            except ConnectionRefusedError:
                refused.append(format_address(str(addr[0]), int(addr[1])))
            except OSError:
                return None
    return refused[0] if refused else None


class Backoff:
    """Pauses between attempts: ``initial`` doubling up to ``maximum``, each with jitter (a
    random half to all of it), so that many clients of a restarted coordinator spread out."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        maximum: float = BACKOFF_MAX,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        base = self._next
        self._next = min(self.maximum, base * 2)
        return base * (0.5 + 0.5 * self._rng.random())


@dataclass(eq=False)
class Session:
    """One connection of the client to the coordinator, and the TCP connections it carries."""

    number: int
    client: Client
    nursery: trio.Nursery  # the connections' tasks: the session ends after the last one
    _locks: dict[str, trio.Lock] = field(default_factory=dict)

    def lock(self, peer: str) -> trio.Lock:
        """Held while opening a stream to ``peer``: the first one may open a direct channel,
        and the others should wait for it rather than go through the coordinator."""
        return self._locks.setdefault(peer, trio.Lock())


class CoordinatorLink:
    """Keeps a client connected to the coordinator, reconnecting with backoff, forever.

    ``current`` is the live session, or None while there is none. ``on_incoming`` is called
    (synchronously) with each stream another party opens to the client.
    """

    def __init__(
        self, config: ClientConfig, on_incoming: Callable[[Session, IncomingStream], None]
    ) -> None:
        self.config = config
        self.current: Session | None = None
        self._on_incoming = on_incoming
        self._numbers = itertools.count(1)
        self.backoff = Backoff()

    @property
    def where(self) -> str:
        return format_address(self.config.coord_host, self.config.coord_port)

    async def run(self) -> None:
        """Connect, and connect again whenever the connection is lost (never returns)."""
        async with trio.open_nursery() as sessions:
            while True:
                lost = trio.Event()
                try:
                    await self._attempt(sessions, lost)
                except (ConecError, OSError) as exc:
                    delay = self.backoff.next_delay()
                    if isinstance(exc, IdInUseError):
                        why = (
                            f"the coordinator still has a client named {self.config.id!r} "
                            "(an earlier run of this program, until it times out?)"
                        )
                    else:
                        why = str(exc)
                    say(
                        f"cannot connect to the coordinator at {self.where}: {why}; "
                        f"retrying in {delay:.1f} s"
                    )
                    await trio.sleep(delay)
                    continue
                self.backoff.reset()
                await lost.wait()
                await trio.sleep(self.backoff.next_delay())

    async def _attempt(self, sessions: trio.Nursery, lost: trio.Event) -> None:
        """Start a session in ``sessions``; meanwhile a probe of the coordinator's port turns
        an ICMP "port unreachable" into an error at once, instead of a wait of
        ``connect_timeout`` (the library's socket is unconnected, so it never sees the ICMP)."""
        refused: list[str] = []
        attempt = trio.CancelScope()
        probe = trio.CancelScope()

        async def watch() -> None:
            with probe:
                where = await unreachable_udp(self.config.coord_host, self.config.coord_port)
                if where is not None:
                    refused.append(where)
                    attempt.cancel()

        # The probe runs beside the attempt, not around it: errors of the attempt stay bare.
        sessions.start_soon(watch)
        with attempt:
            try:
                await sessions.start(self._session, lost)
            finally:
                probe.cancel()
        if refused:
            raise ConnectError(
                f"nothing listens on UDP {refused[0]} (ICMP port unreachable): is the port "
                "right, and is the coordinator running?",
            )

    async def _session(
        self, lost: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        number = next(self._numbers)
        started = False
        try:
            async with open_client(self.config) as client, trio.open_nursery() as nursery:
                session = Session(number, client, nursery)
                self.current = session
                started = True
                task_status.started()
                say(f"connected to the coordinator at {self.where} as {client.id!r}")
                reason = "the client closed"
                try:
                    async for incoming in client.incoming_streams:
                        self._on_incoming(session, incoming)
                except trio.BrokenResourceError as exc:
                    reason = str(exc) or "connection lost"
                finally:
                    if self.current is session:
                        self.current = None
                    lost.set()
                say(f"lost the coordinator ({reason}); reconnecting")
                if nursery.child_tasks:
                    say(
                        f"{len(nursery.child_tasks)} connection(s) of the lost session go on "
                        "until they end"
                    )
                # Leaving the nursery waits for this session's connections: those over a
                # direct channel go on without the coordinator.
        except Exception:
            if not started:
                raise
            # Leaving a lost client's block raises nothing by contract; anything else is a
            # bug, and must not take the program (and every other connection) down.
            log.exception("session %d ended with an unexpected error", number)
        finally:
            lost.set()
