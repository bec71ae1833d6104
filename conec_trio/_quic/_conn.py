"""One QUIC connection as roles see it: its state and events, the listener that hears
them, the endpoint interface it needs, and the stream operations roles call.

When and from where datagrams leave (the transmit policy, and the driver task that carries
it out) is ``_transmit.Transmitting``, which ``QuicConn`` inherits.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio
from aioquic.quic import events
from cryptography import x509

from ._aioquic import FlowControlledConnection
from ._transmit import Address, DatagramRoute, Datagrams, Transmitting

__all__ = [
    "Address",
    "ConnState",
    "ConnectionListener",
    "Datagrams",
    "QuicConn",
    "Transmitter",
]

log = logging.getLogger("conec_trio.quic")

# How long closing waits for the CONNECTION_CLOSE datagram to leave.
CLOSE_SEND_TIMEOUT = 1.0
# Probe timeouts in a row, with nothing acknowledged, from which on an established
# connection's owner hears ``path_stalled``: two, so that a lost tail packet alone does not
# count.
STALLED_PTOS = 2


class ConnState(enum.Enum):
    """Where a connection is in its life."""

    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"  # handshake complete; a client waits for confirmation
    CONFIRMED = "confirmed"  # the server accepted us too (client), or = established (server)
    CLOSED = "closed"


class Transmitter(DatagramRoute["QuicConn"], Protocol):
    """What a connection needs of its endpoint (the endpoint imports the connection, never
    the reverse): the transmit policy's part (``DatagramRoute``), and connection ids."""

    def register_cid(self, conn: QuicConn, cid: bytes) -> None: ...

    def unregister_cid(self, conn: QuicConn, cid: bytes) -> None: ...


class ConnectionListener:
    """What a connection's owner hears. All callbacks run synchronously in the endpoint."""

    def handshake_completed(self, conn: QuicConn) -> None:
        """The TLS handshake finished."""

    def stream_data(self, conn: QuicConn, stream_id: int, data: bytes, fin: bool) -> None:
        """Data (possibly empty, possibly with FIN) arrived on a stream."""

    def stream_reset(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        """The peer reset its send side of a stream."""

    def stop_sending(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        """The peer no longer reads a stream (STOP_SENDING)."""

    def send_progress(self, conn: QuicConn) -> None:
        """Acknowledgements or credit arrived: blocked writers may go on."""

    def terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        """The connection is closed (by either side, or by idle timeout)."""

    def path_stalled(self, conn: QuicConn) -> None:
        """Nothing sent was acknowledged for ``STALLED_PTOS`` probe timeouts in a row: the
        path may be gone (a NAT on it gave one side a new public port). Heard again at each
        further probe timeout (they back off exponentially) until an ACK comes, and only
        once the handshake is confirmed."""


class QuicConn(Transmitting):
    """One QUIC connection on an endpoint, with its driver task (``Transmitting.drive``)."""

    endpoint: Transmitter

    def __init__(
        self,
        endpoint: Transmitter,
        quic: FlowControlledConnection,
        peer_address: tuple[Any, ...],
        *,
        keepalive_interval: float | None,
    ) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.peer_address = peer_address
        self.listener: ConnectionListener = ConnectionListener()
        self.handshake_complete = trio.Event()
        # Client role: the server confirmed the handshake (HANDSHAKE_DONE), so it accepted
        # our certificate too. Server role: same moment as handshake_complete.
        self.handshake_confirmed = trio.Event()
        self.closed = trio.Event()
        # The handshake was confirmed, or the connection closed: one event to wait on.
        self.settled = trio.Event()
        self.close_error_code: int | None = None
        self.close_reason = ""
        self.cids: set[bytes] = set()  # connection ids the endpoint routes to us
        self.last_cid: bytes | None = None  # the one the peer's latest datagram carried
        self._probe_timeouts = 0  # aioquic's count when the listener last heard of it
        # resets and stop-sendings held back until the stream may exist (see _held_back)
        self._deferred: list[tuple[int, Callable[[int, int], None], int]] = []
        super().__init__(keepalive_interval)

    # -- what roles may read ----------------------------------------------------------------

    @property
    def state(self) -> ConnState:
        if self.closed.is_set():
            return ConnState.CLOSED
        if self.handshake_confirmed.is_set():
            return ConnState.CONFIRMED
        if self.handshake_complete.is_set():
            return ConnState.ESTABLISHED
        return ConnState.HANDSHAKING

    @property
    def reset_by_peer(self) -> bool:
        """The peer answered with a stateless reset: it is up and no longer knows us."""
        return self.quic.reset_by_peer

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self.quic.peer_certificate

    @property
    def peer_certificate_chain(self) -> list[x509.Certificate]:
        return self.quic.peer_certificate_chain

    @property
    def datagram_size(self) -> int:
        """The largest datagram this connection sends now (grows with path MTU probing)."""
        return self.quic.datagram_size

    @property
    def smoothed_rtt(self) -> float:
        """Seconds; 0.0 before the first measurement."""
        return self.quic.smoothed_rtt

    @property
    def bytes_sent(self) -> int:
        """Stream bytes written to this connection so far (QUIC's overhead not counted)."""
        return self.quic.written_total

    @property
    def bytes_received(self) -> int:
        """Stream bytes this connection delivered to its owner so far."""
        return self.quic.delivered_total

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to a stream and not yet acknowledged by the peer."""
        return self.quic.send_backlog(stream_id)

    def send_room(self, stream_id: int, budget: int) -> int:
        """Bytes that may be written to a stream now without waiting for credit the peer has
        not granted, with at most ``budget`` unsent on the connection."""
        return self.quic.send_room(stream_id, budget)

    def send_open(self, stream_id: int) -> bool:
        """Data may still be written to the stream (no FIN or reset on its send side yet)."""
        return self.quic.send_open(stream_id)

    def fin_acked(self, stream_id: int) -> bool:
        """The stream's send side is done (FIN or reset acknowledged, or gone)."""
        return self.quic.fin_acked(stream_id)

    def forget_stream(self, stream_id: int) -> None:
        self.quic.forget_stream(stream_id)

    # -- called by the stream layer --------------------------------------------------------

    @property
    def is_client(self) -> bool:
        return self.quic.is_client

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    def next_stream_id(self) -> int:
        return int(self.quic.get_next_available_stream_id())

    def send_stream_data(
        self, stream_id: int, data: bytes, end_stream: bool = False, *, wake: bool = True
    ) -> None:
        """Queue stream data; ``wake=False`` when the caller ends with ``send_now``."""
        self.quic.send_stream_data(stream_id, data, end_stream)
        self.quic.written_total += len(data)
        self._pending_bytes += len(data)
        if wake:
            self.mark_dirty()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self._held_back(stream_id, self.quic.reset_stream, error_code):
            return
        try:
            self.quic.reset_stream(stream_id, error_code)
        except ValueError:
            return  # already finished or never opened on our side: nothing to reset
        self.mark_dirty()

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        if self._held_back(stream_id, self.quic.stop_stream, error_code):
            return
        try:
            self.quic.stop_stream(stream_id, error_code)
        except ValueError:
            return
        self.mark_dirty()

    def _held_back(self, stream_id: int, action: Callable[[int, int], None], code: int) -> bool:
        """A stream still waiting for the peer's stream credit must not be reset yet: the
        peer would see a stream id over its limit and close the whole connection. The
        action runs once the stream may exist (see ``_run_deferred``)."""
        if not self.quic.stream_blocked(stream_id):
            return False
        self._deferred.append((stream_id, action, code))
        return True

    def _run_deferred(self) -> None:
        waiting = []
        for stream_id, action, code in self._deferred:
            if self.quic.stream_blocked(stream_id):
                waiting.append((stream_id, action, code))
                continue
            with contextlib.suppress(ValueError):
                action(stream_id, code)
        self._deferred = waiting

    def add_consumed(self, stream_id: int, nbytes: int) -> None:
        if self.quic.add_consumed(stream_id, nbytes):
            self.mark_dirty()

    def discard_received(self, nbytes: int) -> None:
        if self.quic.add_discarded(nbytes):
            self.mark_dirty()

    def ping(self) -> None:
        """Send a PING soon: the peer must acknowledge it, so a path that no longer carries
        anything back stalls (``ConnectionListener.path_stalled``)."""
        if not self.quic.is_closing:
            self.quic.send_ping(0)
            self.mark_dirty()

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Start closing (CONNECTION_CLOSE goes out with the next transmit); the owner
        hears ``terminated`` at once."""
        if not self.quic.is_closing:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.process_events()
        self.mark_dirty()

    def close_now(self, error_code: int, reason: str) -> None:
        """Close and send CONNECTION_CLOSE at once, without waiting (best effort): for when
        the driver is being cancelled and will not transmit again."""
        self.close(error_code, reason)
        with contextlib.suppress(Exception):
            self._send_built()

    def hold_confirmation(self, hold: bool) -> None:
        """Server role: hold back the confirmation of the completed handshake (HANDSHAKE_DONE:
        a client waits for it to know its certificate was accepted) until called with False,
        which sends it at once."""
        self.quic.hold_confirmation(hold)
        if not hold:
            self.expedite()

    def expedite(self) -> None:
        """Transmit what was written at the next opportunity, without waiting for more
        writes to join it: for a message the peer waits on before anything else (the
        registration hello and its welcome, a dial on a punch). Written while the endpoint
        handles received datagrams, it leaves from there, before any other task runs."""
        self._pending_bytes = 0
        self.endpoint.urgent[self] = None
        self.mark_dirty()

    def process_events(self) -> None:
        """Hand aioquic's events to the listener (synchronously)."""
        quic = self.quic
        listener = self.listener
        event = quic.next_event()
        while event is not None:
            if isinstance(event, events.StreamDataReceived):
                quic.delivered_total += len(event.data)
                self._delivered = True
                listener.stream_data(self, event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.ConnectionIdIssued):
                self.endpoint.register_cid(self, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self.endpoint.unregister_cid(self, event.connection_id)
            elif isinstance(event, events.StreamReset):
                listener.stream_reset(self, event.stream_id, event.error_code)
                quic.forget_stream(event.stream_id)
            elif isinstance(event, events.StopSendingReceived):
                listener.stop_sending(self, event.stream_id, event.error_code)
            elif isinstance(event, events.HandshakeCompleted):
                self.handshake_complete.set()
                listener.handshake_completed(self)
            event = quic.next_event()
        if quic.handshake_confirmed and not self.handshake_confirmed.is_set():
            self.handshake_confirmed.set()
            self.settled.set()
        # aioquic reports a close only after its closing period (3 PTO); the owner must know
        # at once, so peers see broken streams promptly.
        close_event = quic.close_event
        if close_event is not None:
            self._mark_closed(close_event.error_code, close_event.reason_phrase)
        else:
            listener.send_progress(self)
            probes = quic.probe_timeouts
            if probes != self._probe_timeouts:
                self._probe_timeouts = probes
                if probes >= STALLED_PTOS and quic.handshake_confirmed:
                    listener.path_stalled(self)

    def _mark_closed(self, error_code: int, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_error_code = error_code
        self.close_reason = reason
        self.closed.set()
        self.settled.set()
        self.listener.terminated(self, error_code, reason)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        quic = self.quic
        idle_deadline = quic.idle_deadline
        quic.receive_datagram(data, addr, now)
        # Only what aioquic authenticated counts: a datagram that merely carries one of our
        # connection ids (anyone can send one) moves neither the address nor the activity.
        if quic.idle_deadline != idle_deadline:
            self._last_received = now
        self.peer_address = quic.peer_address

    async def aclose(self, error_code: int = 0, reason: str = "") -> None:
        """Close and wait (bounded) until CONNECTION_CLOSE has gone out."""
        self.close(error_code, reason)
        self.process_events()
        with trio.move_on_after(CLOSE_SEND_TIMEOUT) as scope:
            scope.shield = True
            await self.transmit()
