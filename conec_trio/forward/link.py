"""Staying connected to the coordinator: both programs keep one client for their whole run and
let the library reconnect it (from the same socket, so direct channels and the TCP connections
over them go on while the coordinator is away). Only the first connection is retried here,
with backoff (0.2 s doubling to 5 s, with jitter); a refusal that retrying cannot cure (the
certificate is not accepted, the id is held by another certificate, another protocol version)
ends the program with the reason.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
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
from .._backoff import BACKOFF_INITIAL, BACKOFF_MAX, Backoff
from .._client_link import INCURABLE
from .._util import unwrap_single_exception
from .console import format_address, say

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "COORD_CONNECT_TIMEOUT",
    "Backoff",
    "CoordinatorLink",
    "Session",
]

log = logging.getLogger(__name__)

# How long one attempt to reach the coordinator may take before the next one, after a pause.
COORD_CONNECT_TIMEOUT = 5.0
# How long a first connection refused for its id is retried: longer than a coordinator takes
# to time out an earlier run of the program (its default idle timeout is 10 s).
ID_TAKEN_PATIENCE = 30.0
# How often the programs look whether the client is connected, to log its losses and returns.
WATCH_INTERVAL = 0.1

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


@asynccontextmanager
async def probing_the_port(config: ClientConfig) -> AsyncIterator[Callable[[], None]]:
    """Run the body (connecting to the coordinator) while a probe of the coordinator's port
    turns an ICMP "port unreachable" into a ``ConnectError`` at once, instead of a wait of
    ``connect_timeout`` (the library's socket is unconnected, so it never sees the ICMP). The
    body calls what it gets once connected, which ends the probe. A failure of the body
    leaves as itself, not in an exception group."""
    refused: list[str] = []
    attempt, probe = trio.CancelScope(), trio.CancelScope()

    async def watch() -> None:
        with probe:
            where = await unreachable_udp(config.coord_host, config.coord_port)
            if where is not None:
                refused.append(where)
                attempt.cancel()

    with unwrap_single_exception():
        async with trio.open_nursery() as probes:
            probes.start_soon(watch)
            with attempt:
                yield probe.cancel
            probe.cancel()
    if refused:
        raise ConnectError(
            f"nothing listens on UDP {refused[0]} (ICMP port unreachable): is the port right, "
            "and is the coordinator running?",
        )


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
    """Keeps a client connected to the coordinator for the program's whole run.

    ``current`` is the session once the first connection succeeded (it stays while the
    library reconnects), None before. ``on_incoming`` is called (synchronously) with each
    stream another party opens to the client. ``run`` raises the ``ConecError`` of an
    incurable refusal.
    """

    def __init__(
        self, config: ClientConfig, on_incoming: Callable[[Session, IncomingStream], None]
    ) -> None:
        self.config = config
        self.current: Session | None = None
        self._served = False  # connected once: a refusal now is about a reconnect
        self._on_incoming = on_incoming
        self._numbers = itertools.count(1)
        self.backoff = Backoff()

    @property
    def where(self) -> str:
        return format_address(self.config.coord_host, self.config.coord_port)

    async def run(self) -> None:
        """Connect (retrying until the coordinator answers), then serve until cancelled."""
        id_taken_since: float | None = None
        while True:
            try:
                await self._connect_and_serve()
            except IdInUseError as exc:
                # At the start, most likely an earlier run of this program (with another
                # ephemeral certificate) that the coordinator has not timed out yet.
                now = trio.current_time()
                if id_taken_since is None:
                    id_taken_since = now
                if self._served or now - id_taken_since > ID_TAKEN_PATIENCE:
                    raise self._incurable(exc) from exc
                await self._retry_later(
                    f"the coordinator still has a client named {self.config.id!r} (an earlier "
                    "run of this program, until it times out?)"
                )
            except INCURABLE as exc:
                raise self._incurable(exc) from exc
            except (ConecError, OSError) as exc:
                await self._retry_later(str(exc))

    async def _retry_later(self, why: str) -> None:
        delay = self.backoff.next_delay()
        say(f"cannot connect to the coordinator at {self.where}: {why}; retrying in {delay:.1f} s")
        await trio.sleep(delay)

    def _incurable(self, exc: ConecError) -> ConecError:
        why = str(exc)
        if isinstance(exc, IdInUseError):
            why += (
                f" (another program holds the id {self.config.id!r}; if it is an earlier run of"
                " this one, wait for the coordinator to time it out, or use a fixed certificate)"
            )
        return type(exc)(f"the coordinator at {self.where} refused this client: {why}")

    async def _connect_and_serve(self) -> None:
        """Connect and serve (see ``probing_the_port``)."""
        async with (
            probing_the_port(self.config) as connected,
            open_client(self.config) as client,
            trio.open_nursery() as nursery,
        ):
            connected()
            await self._serve(Session(next(self._numbers), client, nursery))

    async def _serve(self, session: Session) -> None:
        client = session.client
        self.current = session
        say(f"connected to the coordinator at {self.where} as {client.id!r}")
        session.nursery.start_soon(self._watch, client)
        try:
            async for incoming in client.incoming_streams:
                self._on_incoming(session, incoming)
        except trio.BrokenResourceError:
            pass  # the library stopped reconnecting: wait_connected says why
        finally:
            self.current = None
            self._served = True
        try:
            await client.wait_connected()
        except INCURABLE as exc:
            raise self._incurable(exc) from exc
        raise ConecError(f"lost the coordinator at {self.where} for good")  # pragma: no cover

    async def _watch(self, client: Client) -> None:
        """Say when the client loses the coordinator and when it is back."""
        was_connected = True
        while True:
            if client.connected != was_connected:
                was_connected = client.connected
                if was_connected:
                    say(f"reconnected to the coordinator at {self.where}")
                else:
                    say(
                        "lost the coordinator; reconnecting (direct channels and the "
                        "connections over them go on)"
                    )
            await trio.sleep(WATCH_INTERVAL)
