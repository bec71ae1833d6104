"""When and from where the datagrams of one QUIC connection leave: its Trio driver task,
and the transmit policy that ``QuicConn`` (``_conn``) inherits from ``Transmitting``.

Transmit policy, written down once. Datagrams leave by one of these routes:

1. The driver task (``drive``): woken by ``mark_dirty`` or by a deadline (aioquic's timer, a
   keepalive, a path MTU probe), it lets writers running in this scheduling round add to the
   flight (``_coalesce``), then builds and sends everything due. Streams of writes and bulk
   data always go this way, so small messages share packets.
2. The endpoint's receive loop, right after a batch of datagrams was handled:
   - a connection in ``endpoint.urgent`` transmits there and then: handshake flights and
     messages marked ``expedite`` (a hello, a dial on a punch), which the peer waits on;
   - a connection in ``endpoint.after_batch`` (``send_soon``) sends from there with its driver
     left parked (``flush``): what a relay passed on to it while the batch was handled, and
     the ACK of what it passed on from it, one packet build per connection per batch; in a
     quiet batch that ACK is held for the answer passed back to carry (``ack_relayed``),
     and a later batch sends it if the answer is late (``endpoint.held_acks``);
   - ``answer_ping``: the ACK of a keepalive leaves at once, with the driver left parked;
   - ``stay_parked``: what arrived asks nothing of us now (an ACK alone): the driver's wait
     only moves;
   - ``leave_to_reader``: when stream data went to readers and nothing of ours is in flight,
     the driver stays parked and the reader's answer leaves from the reader (route 3), the
     ACK held for it (``hold_ack``: 10 ms where aioquic waits 1 ms).
3. A writer's own task (``send_now``): a message that answers data that arrived since our
   last packet, while nothing of ours is unacknowledged (request/response), leaves at once
   with the ACK, as with Nagle's algorithm.
4. ``close_now``: a CONNECTION_CLOSE when the driver is being cancelled.

Whatever a non-driver route could not send (a full socket) waits in ``_backlog`` and the
driver sends it first.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

import trio

from .._config import KEEPALIVE_FRACTION
from ._ack_only import REPLY_ACK_DELAY
from ._aioquic import FlowControlledConnection

Address = tuple[Any, ...]
Datagrams = list[tuple[bytes, Address]]

# aioquic timers that do not move after being handled are retried this much later.
TIMER_GRANULARITY = 0.001
# Small writes wait up to this many scheduling rounds, or until this many bytes are pending,
# before the connection transmits (see Transmitting._coalesce).
COALESCE_ROUNDS = 256
COALESCE_BYTES = 16 * 1200

# A relay's held ACK leaves from the receive loop this long after its packet arrived, at
# the end of a batch; the driver's timer sends it after twice as long (REPLY_ACK_DELAY).
HELD_ACK_SWEEP = REPLY_ACK_DELAY / 2

ConnT = TypeVar("ConnT")


class DatagramRoute(Protocol[ConnT]):
    """What the transmit policy needs of the endpoint (``_conn.Transmitter`` adds the rest);
    ``ConnT`` is the connection class, since this module cannot name it."""

    # connections that transmit from the receive loop before anything else runs
    urgent: dict[ConnT, None]
    # ACKs a relay held, oldest first: (when the receive loop sends them, connection)
    held_acks: deque[tuple[float, ConnT]]
    quiet_batch: bool  # the batch being handled touched few connections
    # True while the receive loop handles a batch of datagrams; connections that send from
    # the receive loop once it is handled (see Transmitting.send_soon)
    handling_batch: bool
    after_batch: dict[ConnT, None]

    async def send_datagrams(self, datagrams: Datagrams) -> None: ...

    def send_nowait(self, datagrams: Datagrams) -> int:
        """Send as many as fit now; how many were sent."""

    def forget(self, conn: ConnT) -> None: ...


class Transmitting:
    """The transmit policy of ``QuicConn`` (see the module docstring): its driver task and
    the flags that say when and from where datagrams leave."""

    # ``drive`` and ``_build`` take ``self: Self``: the endpoint's ``urgent`` and ``forget``
    # speak of the connection class, which this module cannot import.
    if TYPE_CHECKING:
        # The connection's own (``_conn.QuicConn``), read and called by the policy.
        endpoint: DatagramRoute[Self]
        quic: FlowControlledConnection
        handshake_complete: trio.Event
        closed: trio.Event
        _deferred: list[tuple[int, Callable[[int, int], None], int]]

        def _run_deferred(self) -> None: ...

        def process_events(self) -> None: ...

        def close_now(self, error_code: int, reason: str) -> None: ...

    def __init__(self, keepalive_interval: float | None) -> None:
        self._keepalive_interval = keepalive_interval
        self._dirty = False
        self._pending_bytes = 0  # stream bytes written since the last transmit
        self._delivered = False  # stream data went to readers since the last transmit
        self._ack_soon = False  # what arrived is acknowledged with the next packet
        self._unsent = False  # something happened since the last transmit that may need one
        self._transmitting = False  # the driver is waiting for the socket in transmit()
        self._backlog: list[tuple[bytes, tuple[Any, ...]]] = []  # built, not yet sent
        self._wakeup = trio.lowlevel.ParkingLot()
        # A keepalive is due when either direction has been quiet for its interval: the
        # peer's idle timer runs from what we last sent, ours from what we last received
        # (a peer that answers late, as an overloaded one does, must not delay our PING).
        self._last_sent = self._last_received = trio.current_time()
        self._handled_timer = -math.inf  # when the driver last ran aioquic's timer
        self._parked: trio.CancelScope | None = None  # the idle driver's wait, if it waits

    def mark_dirty(self) -> None:
        """Ask the driver to transmit soon (coalesces with other writes this round)."""
        self._unsent = True
        if not self._dirty:
            self._dirty = True
            self._wakeup.unpark_all()

    # -- driver ------------------------------------------------------------------------------

    async def drive(self: Self) -> None:
        """Handle timers and transmit until aioquic says the connection is over.

        A closing connection lingers here for its closing period (answering late packets
        with CONNECTION_CLOSE) although its owner was told at once that it is closed.
        """
        quic = self.quic
        try:
            while not quic.is_terminated:
                if not self._dirty:
                    with trio.move_on_at(self._next_deadline()) as self._parked:
                        await self._wakeup.park()
                    if self._parked.cancelled_caught:
                        self._unsent = True
                    self._parked = None
                await self._coalesce()
                self._dirty = False
                now = trio.current_time()
                timer = quic.get_timer()
                if timer is not None and now >= timer and now > self._handled_timer:
                    self._handled_timer = now
                    quic.handle_timer(now)
                    self._unsent = True
                keepalive = self._keepalive_interval_now()
                if keepalive is not None and now >= self._quiet_since + keepalive:
                    quic.send_ping(0)
                    # Counted as sent even if congestion holds the PING back for now.
                    self._last_sent = self._last_received = now
                    self._unsent = True
                self.process_events()
                if self._unsent:  # else a writer has sent it all already (send_now)
                    await self.transmit()
        finally:
            # Cancelled (the owner's block ended abruptly): still say goodbye, so the peer
            # does not have to wait for its idle timeout.
            self.close_now(0, "endpoint shut down")
            self.endpoint.forget(self)

    def _next_deadline(self) -> float:
        """When the idle driver must wake: aioquic's timer, a keepalive, a path MTU probe."""
        quic = self.quic
        deadline = quic.get_timer()
        if deadline is None:
            deadline = math.inf
        elif deadline <= self._handled_timer:
            # aioquic can leave its loss timer at the instant just handled (float
            # rounding); waiting for the clock to move avoids a spin.
            deadline = self._handled_timer + TIMER_GRANULARITY
        keepalive = self._keepalive_interval_now()
        if keepalive is not None:
            deadline = min(deadline, self._quiet_since + keepalive)
        probe_deadline = quic.pmtu_timer()
        if probe_deadline is not None:
            deadline = min(deadline, probe_deadline)
        return deadline

    @property
    def _quiet_since(self) -> float:
        return min(self._last_sent, self._last_received)

    def answer_ping(self) -> bool:
        """Called by the endpoint after feeding a batch of datagrams. If they carried a PING
        (a keepalive, mostly) and the driver is idle with nothing else to send, the ACK goes
        out right here and the driver's wait is moved to the new deadline: one wakeup per
        keepalive instead of two. False: the driver must run (``mark_dirty``)."""
        quic = self.quic
        if not quic.ack_due:
            return False
        quic.ack_due = False
        parked = self._parked
        if parked is None or self._dirty or self._pending_bytes or self._deferred:
            return False
        return self._send_from_receive_loop()

    def leave_to_reader(self) -> bool:
        """Called by the endpoint after feeding a batch of datagrams. If they delivered stream
        data to readers while nothing of ours is in flight or waiting, the driver stays
        parked, its wait moved to aioquic's ACK timer: a reader that answers sends the
        answer, ACK included, from its own task (``send_now``); for one that does not, the
        timer sends the ACK. This saves a driver wakeup per request and per reply. False:
        the driver must run (``mark_dirty``)."""
        parked = self._parked
        quic = self.quic
        if (
            parked is None
            or not self._delivered
            or self._dirty
            or self._pending_bytes
            or self._deferred
            or self._backlog
            or self in self.endpoint.urgent
            or not quic.handshake_confirmed
            or quic.bytes_in_flight
            or self.closed.is_set()
            # an ACK in the batch may have declared data lost: its retransmission waits
            or not quic.nothing_but_acks_to_send()
        ):
            return False
        quic.hold_ack()  # the reader's answer is to carry it
        parked.deadline = self._next_deadline()
        return True

    def stay_parked(self) -> bool:
        """Called by the endpoint after feeding a batch of datagrams, where neither
        ``answer_ping`` nor ``leave_to_reader`` applies. If what arrived asks nothing of us
        now (an ACK alone, mostly: the commonest packet a sender receives), the driver
        stays parked, its wait moved to the new deadline (the loss timer an ACK moves,
        aioquic's ACK timer, a keepalive): one driver wakeup less for every such packet.
        False: the driver must run (``mark_dirty``)."""
        parked = self._parked
        if (
            parked is None
            or self._dirty
            or self._delivered
            or self in self.endpoint.urgent
            or self.closed.is_set()
            or not self._nothing_due()
        ):
            return False
        parked.deadline = self._next_deadline()
        return True

    def _nothing_due(self) -> bool:
        """Nothing of ours is to be sent now: no data written, nothing built or deferred,
        no ACK due, no frame aioquic would write."""
        if self._pending_bytes or self._ack_soon or self._deferred or self._backlog:
            return False
        quic = self.quic
        return not quic.ack_due_now(trio.current_time()) and quic.nothing_but_acks_to_send()

    def ack_relayed(self: Self) -> None:
        """For a relay: the ACK of what it took from this connection. Where it covers a
        single packet, it is held (``hold_ack``) for the answer the relay passes back to
        carry, while the endpoint is quiet (``QUIET_BATCH``). An answer that is late leaves
        it to the receive loop, which sends it after
        ``HELD_ACK_SWEEP`` at the end of a batch (``send_held_ack``), or, with no batch
        coming, to the driver's timer. More than one packet: the ACK leaves with the batch
        being handled (``send_soon``)."""
        endpoint = self.endpoint
        if endpoint.quiet_batch and self.quic.hold_ack():
            endpoint.held_acks.append((trio.current_time() + HELD_ACK_SWEEP, self))
            self.send_soon()  # only moves the parked driver's wait (flush)
        else:
            self.send_soon(ack=True)

    def send_held_ack(self, now: float) -> None:
        """Called by the receive loop once ``HELD_ACK_SWEEP`` has passed since a relay
        held an ACK (``ack_relayed``): send it now, unless it has left already."""
        if self.quic.held_ack_due(now - HELD_ACK_SWEEP):
            self._ack_soon = True
            self.flush()

    def send_soon(self: Self, *, ack: bool = False) -> None:
        """For a relay: what it wrote to this connection (or, with ``ack``, the ACK of what it
        took from this connection, which no reply of ours will carry) leaves at the end of
        the batch of datagrams the endpoint is handling, from the receive loop, without a
        driver wakeup: one packet build per connection however many messages the batch
        relayed (see ``flush``). Outside such a batch, the driver sends it."""
        if ack:
            self._ack_soon = True
        endpoint = self.endpoint
        if endpoint.handling_batch:
            endpoint.after_batch[self] = None
        else:
            self.mark_dirty()

    def flush(self) -> None:
        """Called by the endpoint for the connections in ``after_batch`` once the batch is
        handled: an idle driver stays parked and what is due leaves from here; a driver that
        runs anyway (or a connection still in its handshake, or closed) is left to send it."""
        parked = self._parked
        quic = self.quic
        if parked is None or self._dirty or not quic.handshake_confirmed or self.closed.is_set():
            self.mark_dirty()
            return
        self.quic.ack_due = False  # a PING's ACK goes with this packet
        if self._nothing_due():  # an ACK held for an answer (ack_relayed)
            parked.deadline = self._next_deadline()
        elif not self._send_from_receive_loop():
            self.mark_dirty()

    def _send_from_receive_loop(self) -> bool:
        """Build and send what is due with the driver left parked; False if that failed, and
        the driver must meet it (the endpoint's loop must go on)."""
        try:
            self._send_built()
        except Exception:
            return False
        return True

    def _keepalive_interval_now(self) -> float | None:
        """The configured keepalive interval, shortened to ``KEEPALIVE_FRACTION`` of the idle
        timeout negotiated with the peer (the lower of both sides' settings) once that is
        known. None before the handshake and after the close: nothing to keep alive then."""
        interval = self._keepalive_interval
        if interval is None or not self.handshake_complete.is_set() or self.closed.is_set():
            return None
        remote = self.quic.peer_idle_timeout
        if remote:  # None: not known yet; 0: the peer has no idle timeout
            interval = min(interval, remote * KEEPALIVE_FRACTION)
        return interval

    async def _coalesce(self) -> None:
        """Give writers that are running right now a few scheduling rounds to add to this
        flight, so many small messages share packets instead of one packet each. After
        data was handed to readers, they get the same rounds, so that a reply goes out in
        one packet with the ACK. Bulk data (a packet's worth already), an answer to what
        arrived while nothing of ours is in flight, and wakeups with nothing to wait for go
        out at once. Trio runs a round's tasks in random order, so only two quiet rounds in
        a row mean "no writer"."""
        quiet = 0
        quic = self.quic
        for _ in range(COALESCE_ROUNDS):
            pending = self._pending_bytes
            if pending >= COALESCE_BYTES:
                return
            if pending == 0:
                if not self._delivered:
                    return
            elif self._delivered and not quic.bytes_in_flight:
                # An answer to what just arrived, with nothing of ours unacknowledged (as
                # with Nagle's algorithm): it goes out at once; a stream of writes is
                # gathered.
                return
            await trio.lowlevel.cancel_shielded_checkpoint()
            quiet = quiet + 1 if self._pending_bytes == pending else 0
            if quiet == 2:
                return

    async def transmit(self, *, probe: bool = True) -> None:
        """Send what aioquic has to send now; with ``probe``, a path MTU probe if one is due
        (the receive loop's urgent sends leave probes to the driver: a probe right behind
        a handshake's last flight would only delay what the application waits for)."""
        now = trio.current_time()
        datagrams = self._build(now)
        if probe:
            pmtu_probe = self.quic.pmtu_probe(now)
            if pmtu_probe is not None:
                datagrams.append(pmtu_probe)
        if datagrams:
            self._transmitting = True
            try:
                await self.endpoint.send_datagrams(datagrams)
            finally:
                self._transmitting = False

    def _build(self: Self, now: float) -> list[tuple[bytes, tuple[Any, ...]]]:
        """The datagrams to send now (with any the socket refused last time first)."""
        if self._pending_bytes or self._ack_soon:
            self.quic.ack_with_next_packet(now)
        self._pending_bytes = 0
        self._ack_soon = False
        self._delivered = False
        self._unsent = False
        self.endpoint.urgent.pop(self, None)
        if self._deferred:
            self._run_deferred()
        datagrams = self.quic.datagrams_to_send(now)
        if self._backlog:
            datagrams[:0] = self._backlog
            self._backlog = []
        if datagrams:
            self._last_sent = now
        return datagrams

    def send_now(self) -> None:
        """After a writer's message: if it answers data that arrived since our last packet
        and nothing of ours is unacknowledged (request/response traffic), send it from the
        writer's task at once (the driver would only add task switches and rounds), else
        wake the driver to gather it with what follows. A stream of writes that answers
        nothing is always gathered: sent one by one, each would cost a packet."""
        if (
            not self._delivered
            or self._transmitting
            or self._pending_bytes >= COALESCE_BYTES
            or self.quic.bytes_in_flight
            or not self.handshake_complete.is_set()
        ):
            self.mark_dirty()
            return
        self._send_built()

    def _send_built(self) -> None:
        """Build and send what is due now without waiting: from a writer's task, or from
        the endpoint's receive loop."""
        datagrams = self._build(trio.current_time())
        sent = self.endpoint.send_nowait(datagrams)
        if sent < len(datagrams):  # the socket is full: the driver sends the rest
            self._backlog = datagrams[sent:]
            self.mark_dirty()
        elif self._parked is not None:
            # What was sent has a loss timer now: the idle driver must wake for it.
            self._parked.deadline = self._next_deadline()
