"""Opening a direct channel (this side dials): asking the coordinator, punching, dialling
the first candidate that answers, and pinning the peer's certificate. ``DirectManager``
(``_direct``) is built on it; the accepting side is there.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import _tls
from ._config import ClientConfig, canonical_id
from ._exceptions import (
    CertificateError,
    ChannelError,
    PeerNotFoundError,
    ProtocolError,
)
from ._punch import punch, punch_packet, punch_round, punch_tag, punch_targets, punch_token
from ._quic import ConnectionSettings, PreparedDial, QuicConn, QuicEndpoint
from ._streams import (
    StreamState,
    StreamTable,
)
from ._types import IncomingStream, StreamId
from ._util import wait_any
from ._wire import control
from ._wire.codes import CloseCode, Reason

log = logging.getLogger("conec_trio.direct")

# How long the opener waits for a punch from the peer before dialling every candidate.
PUNCH_HEAD_START = 0.3
CHANNEL_TIMEOUT = 10.0
# Punches an opener keeps while it waits for its grant (which brings the token that tells
# the peer's from forgeries): a flood of forgeries can fill them, and then the opener takes
# the peer's next punch instead.
MAX_UNVERIFIED_PUNCHES = 8
# Refusals an opener keeps while it waits for its grant (the refusal of the offer can be
# read before the opener has taken in the grant that came just before it).
MAX_EARLY_REFUSALS = 4
# Scheduling rounds an opener lets pass after sending its request before it makes the dial's
# first flight (a few milliseconds of CPU that must not hold the request back).
PREPARE_AFTER_ROUNDS = 4


class DirectChannel:
    """An open direct channel: one QUIC connection to ``peer``."""

    def __init__(self, peer: str, conn: QuicConn, table: StreamTable) -> None:
        self.peer = peer
        self.conn = conn
        self.table = table
        self.next_sid = 0


class _Expected:
    """A channel the coordinator announced: the pinned certificate, where to punch, and the
    token of its punches (each side's bound to the certificate of the side it goes to:
    ``punch_tag``)."""

    def __init__(
        self, peer: str, cert_der: bytes, addrs: list[tuple[str, int]], token: bytes
    ) -> None:
        self.peer = peer
        self.cert_der = cert_der
        self.addrs = addrs
        self.token = token
        self.tag_out = b""  # what our punches carry (bound to the peer's certificate)
        self.tag_in = b""  # what the peer's carry (bound to ours)
        self.punched_from: tuple[Any, ...] | None = None
        # A punch carrying tag_in came: the peer took the offer naming our certificate.
        self.punch_seen = trio.Event()
        self.done = trio.Event()
        self.accepting = False  # from the peer's offer (not our own opening)
        # Our own opening, waiting for the coordinator's grant; the punches that came
        # meanwhile (tag -> where from), checked once the grant brings the token.
        self.awaiting_grant = False
        self.unverified: dict[bytes, tuple[Any, ...]] = {}
        # The peer refused the offer of our opening (the coordinator says why): token ->
        # message while awaiting the grant, then the refusal of this attempt.
        self.early_refusals: dict[bytes, str] = {}
        self.refusal: str | None = None
        self.attempt = trio.CancelScope()  # cancelled by a refusal
        # Our own opening: the dial's costly part, made while the request is out.
        self.prepared: PreparedDial | None = None

    def bind(self, token: bytes, own_cert_der: bytes) -> None:
        """The channel's token is known: the tags of both sides' punches."""
        self.token = token
        self.tag_out = punch_tag(token, self.cert_der)
        self.tag_in = punch_tag(token, own_cert_der)


@dataclass(frozen=True)
class DirectContext:
    """What direct channels need of their client, and nothing more."""

    id: str
    config: ClientConfig
    client_ca: bytes | None  # peers' certificates must chain to it, when set
    nursery: trio.Nursery
    endpoint: Callable[[], QuicEndpoint | None]  # the client's one socket, once connected
    settings: Callable[..., ConnectionSettings]  # settings(server_name=...) for a channel
    request: Callable[[Callable[[int], Any]], Awaitable[Any]]  # a request to the coordinator
    send_control: Callable[[Any], None]  # a message on the control stream
    deliver_incoming: Callable[[IncomingStream, StreamState], None]
    direct_ids: set[int]  # direct stream ids in use, shared with new_stream_with_id
    id_in_use: Callable[[StreamId], Exception]
    cert_der: Callable[[], bytes]  # this client's own certificate


class ChannelOpening:
    """The dialling half of ``DirectManager`` (see the module docstring)."""

    ctx: DirectContext
    channels: dict[str, DirectChannel]
    _expected: dict[str, _Expected]
    _opening: dict[str, trio.Event]
    _channel_up: trio.lowlevel.ParkingLot  # unparked by every registration
    _punch_budget: Any

    def _register(self, peer: str, conn: QuicConn) -> DirectChannel:
        raise NotImplementedError  # DirectManager

    def _make_table(self, peer: str | None, conn: QuicConn) -> StreamTable:
        raise NotImplementedError  # DirectManager

    # -- candidates and punching -----------------------------------------------------------

    def _targets(self, addrs: list[tuple[str, int]]) -> list[tuple[Any, ...]]:
        """Where to punch and dial, of the candidates the coordinator gave."""
        endpoint = self.ctx.endpoint()
        assert endpoint is not None
        return punch_targets(addrs, endpoint.sock.family)

    async def _punch(self, expected: _Expected, first_sent: bool = False) -> None:
        """Punch the targets until the channel is up or the time is over (``first_sent``:
        ``_punch_now`` sent the first round)."""
        endpoint = self.ctx.endpoint()
        assert endpoint is not None
        targets = self._targets(expected.addrs)
        packet = punch_packet(expected.tag_out)
        with trio.move_on_after(CHANNEL_TIMEOUT):
            await punch(
                endpoint, packet, targets, expected.done, self._punch_budget, first_sent=first_sent
            )

    def _punch_now(self, expected: _Expected) -> None:
        """The first round of punches, at once (from a synchronous caller)."""
        endpoint = self.ctx.endpoint()
        if endpoint is not None:
            targets = self._targets(expected.addrs)
            punch_round(endpoint, punch_packet(expected.tag_out), targets, self._punch_budget)

    def raw_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """A non-QUIC datagram arrived on the client's socket: maybe a punch."""
        token = punch_token(data)
        if token is None:
            return
        for expected in self._expected.values():
            if expected.awaiting_grant:
                if len(expected.unverified) < MAX_UNVERIFIED_PUNCHES:
                    expected.unverified.setdefault(token, addr)
            elif hmac.compare_digest(token, expected.tag_in):
                self._punched(expected, addr)
                return

    def refused(self, peer: str, token: bytes, message: str) -> None:
        """The coordinator says ``peer`` refused (or did not answer) the offer of the channel
        granted with ``token``: the opening attempt it belongs to ends with ``message``."""
        expected = self._expected.get(canonical_id(peer))
        if expected is None or expected.accepting:
            return
        if expected.awaiting_grant:
            if len(expected.early_refusals) < MAX_EARLY_REFUSALS:
                expected.early_refusals.setdefault(token, message)
        elif hmac.compare_digest(token, expected.token) and expected.refusal is None:
            expected.refusal = message
            expected.attempt.cancel()

    def _punched(self, expected: _Expected, addr: tuple[Any, ...]) -> None:
        """The peer's punch (its tag verified: ``tag_in``) came from ``addr``."""
        if expected.punch_seen.is_set():
            return
        expected.punched_from = addr
        expected.punch_seen.set()
        # Answer at once from this socket: the sender's NAT may only now have a mapping.
        endpoint = self.ctx.endpoint()
        if endpoint is not None and self._punch_budget.take():
            endpoint.send_raw_nowait(punch_packet(expected.tag_out), addr)

    # -- opening (this side dials) ---------------------------------------------------------------

    async def open(self, peer: str) -> DirectChannel:
        ctx = self.ctx
        peer = canonical_id(peer)
        if peer == ctx.id:
            raise ChannelError("cannot open a direct channel to this client itself")
        if peer in self.channels:
            raise ChannelError(f"a direct channel to {peer!r} is already open")
        if peer in self._opening:
            raise ChannelError(f"a direct channel to {peer!r} is already being opened")
        done = self._opening[peer] = trio.Event()
        try:
            return await self._open(peer)
        finally:
            del self._opening[peer]
            done.set()

    def opening(self, peer: str) -> trio.Event | None:
        """The event set when the attempt under way to open a channel to ``peer`` ends."""
        return self._opening.get(canonical_id(peer))

    async def _open(self, peer: str) -> DirectChannel:
        ctx = self.ctx
        pending = self._expected.get(peer)
        if pending is not None and pending.accepting:
            # The peer is opening a channel to this client right now: share it.
            return await self._join(peer)
        # The peer punches before it accepts, so its first punch usually arrives before the
        # grant: keep what comes from now on, and once the grant brings the token, the dial
        # needs no punch round trip of its own (the certificate and the addresses come with
        # the grant too).
        expected = _Expected(peer, b"", [], b"")
        expected.awaiting_grant = True
        self._expected[peer] = expected
        channel: DirectChannel | None = None
        failure: ChannelError | None = None
        ctx.nursery.start_soon(self._prepare_dial, expected)
        try:
            reply = await ctx.request(lambda rid: control.ChannelRequest(rid, peer))
            if isinstance(reply, control.ErrorReply) and reply.reason == Reason.PEER_OPENING:
                return await self._join(peer)
            if isinstance(reply, control.ErrorReply):
                if reply.reason == Reason.NO_PEER:
                    raise PeerNotFoundError(reply.message)
                raise ChannelError(reply.message)
            if not isinstance(reply, control.ChannelGrant):
                raise ProtocolError(f"unexpected reply {type(reply).__name__} to a channel request")
            self._check_peer_ca(peer, reply.cert_der)
            expected.cert_der = reply.cert_der
            expected.addrs = list(reply.addrs)
            expected.bind(reply.token, ctx.cert_der())
            expected.awaiting_grant = False
            refusal = expected.early_refusals.get(reply.token)
            if refusal is not None:
                raise ChannelError(refusal)
            punched_from = expected.unverified.get(expected.tag_in)
            expected.unverified.clear()
            if punched_from is not None:
                self._punched(expected, punched_from)
            with expected.attempt:
                async with trio.open_nursery() as nursery:
                    if ctx.config.holepunch:
                        nursery.start_soon(self._punch, expected)
                    with trio.move_on_after(CHANNEL_TIMEOUT):
                        try:
                            channel = await self._dial(expected)
                        except ChannelError as exc:
                            failure = exc  # raised below, outside the nursery (no group)
                    expected.done.set()
        finally:
            expected.done.set()
            if self._expected.get(peer) is expected:
                del self._expected[peer]
        if channel is not None:
            return channel  # the peer accepted our certificate: its consent, whatever came
        if expected.refusal is not None:
            raise ChannelError(expected.refusal)
        if failure is not None:
            raise failure
        tried = ", ".join(f"{h}:{p}" for h, p, *_ in self._targets(expected.addrs))
        raise ChannelError(
            f"could not reach peer {peer!r} directly within {CHANNEL_TIMEOUT:g} s (tried "
            f"{tried or 'no address'}; "
            "a symmetric NAT or a firewall may be in the way)"
        )

    async def _prepare_dial(self, expected: _Expected) -> None:
        """Make the dial's first flight while the grant is on its way (the CPU is idle then),
        once the request has left: its connection's driver gets the rounds it may wait for
        more writes first (``_quic._transmit``)."""
        for _ in range(PREPARE_AFTER_ROUNDS):
            await trio.lowlevel.checkpoint()
        endpoint = self.ctx.endpoint()
        if expected.awaiting_grant and endpoint is not None:
            settings = self.ctx.settings(server_name=expected.peer)
            expected.prepared = endpoint.prepare_dial(settings)

    async def _join(self, peer: str) -> DirectChannel:
        """Wait for the channel the peer is opening to this client at the same time."""
        with trio.move_on_after(CHANNEL_TIMEOUT):
            while True:
                channel = self.channels.get(peer)
                if channel is not None and channel.conn.is_open:
                    return channel
                await self._channel_up.park()
        raise ChannelError(
            f"peer {peer!r} was opening a direct channel to this client at the same time, "
            f"and it did not open within {CHANNEL_TIMEOUT:g} s"
        )

    async def _dial(self, expected: _Expected) -> DirectChannel:
        """Connect to the first address that works; keeps trying until cancelled."""
        winner: list[QuicConn] = []
        conns: list[QuicConn] = []
        if self.ctx.config.holepunch:
            with trio.move_on_after(PUNCH_HEAD_START):
                await expected.punch_seen.wait()
        if expected.punched_from is not None:
            targets = [expected.punched_from]
        else:
            targets = self._targets(expected.addrs)
        if not targets:
            raise ChannelError(f"peer {expected.peer!r} has no address this client can reach")
        try:
            async with trio.open_nursery() as attempts:
                conns.extend(self._connect(expected, addr) for addr in targets)
                for conn in conns:
                    attempts.start_soon(
                        self._await_handshake,
                        conn,
                        winner,
                        attempts.cancel_scope,
                        expected.punch_seen,
                    )
        finally:
            for conn in conns:
                if not winner or conn is not winner[0]:
                    conn.close(int(CloseCode.NORMAL), "another address answered first")
        if not winner:
            reasons = "; ".join(c.close_reason for c in conns if c.close_reason)
            raise ChannelError(
                f"direct connection to {expected.peer!r} failed: {reasons or 'no answer'}"
            )
        conn = winner[0]
        cert = conn.peer_certificate
        try:
            if cert is None:
                raise CertificateError(f"peer {expected.peer!r} presented no certificate")
            _tls.verify_pinned(cert, expected.cert_der, expected.peer)
        except CertificateError as exc:
            conn.close(int(CloseCode.CERTIFICATE), str(exc))
            raise ChannelError(str(exc)) from exc
        return self._register(expected.peer, conn)

    @staticmethod
    async def _await_handshake(
        conn: QuicConn, winner: list[QuicConn], done: trio.CancelScope, consent: trio.Event
    ) -> None:
        """Until the peer accepted our certificate: the handshake is confirmed, or it is
        complete and the peer's punch said it took the offer naming our certificate (then
        its pin check passes, and the confirmation is a round trip away)."""
        await wait_any(conn.settled, conn.handshake_complete)
        if not conn.settled.is_set():
            await wait_any(conn.settled, consent)
        accepted = conn.handshake_confirmed.is_set() or consent.is_set()
        if accepted and conn.handshake_complete.is_set() and conn.is_open and not winner:
            winner.append(conn)
            done.cancel()

    def _connect(self, expected: _Expected, addr: tuple[Any, ...]) -> QuicConn:
        ctx = self.ctx
        endpoint = ctx.endpoint()
        assert endpoint is not None
        # No trust store: the pin check after the handshake replaces it.
        prepared, expected.prepared = expected.prepared, None
        try:
            conn = endpoint.connect(addr, prepared or ctx.settings(server_name=expected.peer))
        except trio.ClosedResourceError:
            raise ChannelError("this client's socket has closed") from None
        # A listener first, so nothing the peer sends is lost before registration.
        self._make_table(expected.peer, conn)
        return conn

    def _check_peer_ca(self, peer: str, cert_der: bytes) -> None:
        ca = self.ctx.client_ca
        if ca is None:
            return
        try:
            _tls.verify_client_cert(_tls.load_cert(cert_der), [], peer, ca)
        except CertificateError as exc:
            raise ChannelError(
                f"peer {peer!r}'s certificate fails this client's client_ca check: {exc}"
            ) from exc
