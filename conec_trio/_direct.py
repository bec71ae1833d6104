"""Direct client-to-client channels: brokering, certificate pinning and hole punching.

The coordinator hands each side the other's certificate, candidate addresses (the address
it observed, which is the NAT's public mapping, plus the peer's own local addresses when both
sit behind the same public IP) and a random token for this channel. Both sides then punch:
they send small non-QUIC datagrams from their one UDP socket to the candidates, so each NAT
learns the other side as a known destination (``_punch`` says which candidates, and how many
punches). A punch carries the token bound to the receiver's certificate (``punch_tag``); any
other punch is ignored. The opener dials QUIC to the first address such a punch arrived from
(or to every candidate, if none did yet); QUIC's own retransmission of the Initial is the
handshake retry. Each side accepts the connection only from exactly the certificate the
coordinator vouched for.

The coordinator grants the channel to the opener as it offers it to the peer, so the opener
may dial before the peer said yes. The peer's consent is its acceptance of the opener's
certificate: a peer that refuses, or does not listen, never knows that certificate, so the
handshake fails its pin check. The opener has its channel once the handshake is complete
on its side and the peer's punch said it took the offer naming the opener's certificate
(its pin check then passes; the peer registers the channel a moment later, and its first
direct stream or ping waits for that: ``wait_accepting``); without such a punch, once the
handshake is confirmed (HANDSHAKE_DONE), which the peer holds back while a certificate waits
for its offer (``UNVOUCHED_GRACE``: the offer can arrive after the handshake). A refusal
reaches the opener as a ChannelRefused and ends its attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import trio

from . import _tls
from ._config import canonical_id
from ._direct_open import CHANNEL_TIMEOUT, ChannelOpening, DirectChannel, DirectContext, _Expected
from ._exceptions import (
    ChannelError,
    ConecError,
    ProtocolError,
)
from ._messages import MessageReceiveChannel, MessageSendChannel, message_channels
from ._punch import FAST_PUNCHES, PUNCH_INTERVAL, punch_budget, punch_packet, usable_candidates
from ._quic import ConnectionSettings, QuicConn, QuicEndpoint
from ._stats import ChannelStatistics, channel_statistics
from ._streams import (
    StreamState,
    StreamTable,
    read_header,
    write_message,
)
from ._types import IncomingStream, StreamId
from ._util import wait_any
from ._wire import control
from ._wire.codes import CloseCode, StreamCode

log = logging.getLogger("conec_trio.direct")

__all__ = ["DirectChannel", "DirectContext", "DirectManager", "DirectTable"]

# A dialler whose certificate nobody vouched for yet (its offer may still be on its way: the
# coordinator grants and offers at once) waits this long, its handshake unconfirmed, at most
# MAX_UNVOUCHED of them at once; then it is refused.
UNVOUCHED_GRACE = 2.0
MAX_UNVOUCHED = 8
NOT_VOUCHED = "certificate is not the one the coordinator vouched for"
# How long a direct stream to a peer whose channel to this client is being accepted waits
# for it (see wait_accepting).
ACCEPTING_WAIT = 2.0


class DirectManager(ChannelOpening):
    """A client's direct channels (both the ones it opened and the ones it accepted)."""

    def __init__(self, ctx: DirectContext) -> None:
        self.ctx = ctx
        self.channels: dict[str, DirectChannel] = {}
        self._expected: dict[str, _Expected] = {}
        self._opening: dict[str, trio.Event] = {}  # set when that opening attempt ends
        self._channel_up = trio.lowlevel.ParkingLot()  # unparked by every registration
        # Every punch this client sends to an address not yet validated draws on it.
        self._punch_budget = punch_budget()
        # Channels whose peer moved, being punched at its new address (see peer_address).
        self._following: set[QuicConn] = set()
        # Accepted handshakes whose certificate (DER) waits for its offer (UNVOUCHED_GRACE).
        self._unvouched: dict[DirectTable, bytes] = {}
        # Hooks of the paths (``_paths``): told of every channel that opens, and handed the
        # direct streams whose header is one of these types, with the peer's id.
        self.on_channel_up: Callable[[DirectChannel], None] | None = None
        self.header_handlers: dict[type[Any], Callable[[str, StreamState, Any], None]] = {}

    # -- accepting (the peer dials) ---------------------------------------------------------------

    def offer(self, offer: control.ChannelOffer) -> None:
        """The coordinator says ``offer.peer`` wants a channel: agree (or not) and punch
        now, from the control stream's reader (the opener, granted the channel already,
        waits for the punch before it dials); a task keeps punching."""
        taken = self._take_offer(offer)
        if taken is not None:
            self.ctx.nursery.start_soon(self._accepting, *taken)

    async def on_offer(self, offer: control.ChannelOffer) -> None:
        """``offer``, the punching included."""
        taken = self._take_offer(offer)
        if taken is not None:
            await self._accepting(*taken)

    def _take_offer(
        self, offer: control.ChannelOffer
    ) -> tuple[_Expected, control.ChannelOfferReply] | None:
        ctx = self.ctx
        offer = dataclasses.replace(offer, peer=canonical_id(offer.peer))
        reply: control.ChannelOfferReply
        if not ctx.config.listen:
            reply = control.ChannelOfferReply(offer.oid, False, "this client does not listen")
        else:
            try:
                self._check_peer_ca(offer.peer, offer.cert_der)
            except ChannelError as exc:
                reply = control.ChannelOfferReply(offer.oid, False, str(exc)[:1000])
            else:
                reply = control.ChannelOfferReply(offer.oid, True, "")
        if not reply.accept:
            ctx.send_control(reply)
            for table, der in list(self._unvouched.items()):
                if der == offer.cert_der:
                    self._refuse(table, f"channel refused: {reply.message}")
            return None
        old = self.channels.pop(offer.peer, None)
        if old is not None:
            # The peer dials again: it no longer has the old channel.
            old.conn.close(int(CloseCode.CHANNEL_CLOSED), "replaced by a new channel")
        earlier = self._expected.get(offer.peer)
        if earlier is not None and earlier.accepting:
            earlier.done.set()  # the peer gave that attempt up: stop punching for it
        expected = _Expected(offer.peer, offer.cert_der, list(offer.addrs), offer.token)
        expected.bind(offer.token, ctx.cert_der())
        expected.accepting = True
        self._expected[offer.peer] = expected
        for table, der in list(self._unvouched.items()):
            if der == offer.cert_der:  # it dialled before the offer got here
                del self._unvouched[table]
                table.conn.hold_confirmation(False)
                self._vouch(table, der)
        if ctx.config.holepunch:
            # Punch first (the opener dials once a punch came), then say yes.
            self._punch_now(expected)
        ctx.send_control(reply)
        return expected, reply

    async def _accepting(self, expected: _Expected, reply: control.ChannelOfferReply) -> None:
        """Keep punching for an accepted offer until its channel is up or times out."""
        try:
            async with trio.open_nursery() as nursery:
                if self.ctx.config.holepunch:
                    nursery.start_soon(self._punch, expected, True)
                with trio.move_on_after(CHANNEL_TIMEOUT):
                    await expected.done.wait()
                expected.done.set()
        finally:
            if self._expected.get(expected.peer) is expected:
                del self._expected[expected.peer]

    def server_settings(self) -> ConnectionSettings:
        return self.ctx.settings()

    def accepted(self, conn: QuicConn) -> None:
        """A peer dials us; who it is shows when its certificate arrives."""
        self._make_table(None, conn)

    def _make_table(self, peer: str | None, conn: QuicConn) -> DirectTable:
        return DirectTable(self, peer, conn)

    def handshake_done(self, table: DirectTable) -> None:
        if table.peer is not None:
            return  # we dialled: _dial checks the pin
        conn = table.conn
        cert = conn.peer_certificate
        der = _tls.cert_der(cert) if cert is not None else b""
        if der and self._vouch(table, der):
            return
        if not der or len(self._unvouched) >= MAX_UNVOUCHED:
            self._refuse(table, NOT_VOUCHED)
            return
        # Its offer may still be on the way: no confirmation (the dialler waits for it)
        # until it comes, if it comes in time.
        conn.hold_confirmation(True)
        self._unvouched[table] = der
        self.ctx.nursery.start_soon(self._await_offer, table)

    def _vouch(self, table: DirectTable, der: bytes) -> bool:
        """Register the channel if ``der`` is the certificate of a channel we expect."""
        for expected in self._expected.values():
            if der == expected.cert_der:
                table.peer = expected.peer
                self._register(expected.peer, table.conn)
                expected.done.set()
                return True
        return False

    async def _await_offer(self, table: DirectTable) -> None:
        with trio.move_on_after(UNVOUCHED_GRACE):
            await wait_any(table.vouched, table.conn.closed)
        if self._unvouched.pop(table, None) is not None and table.conn.is_open:
            self._refuse(table, NOT_VOUCHED)

    def _refuse(self, table: DirectTable, reason: str) -> None:
        self._unvouched.pop(table, None)
        conn = table.conn
        log.warning("refusing a direct connection from %s: %s", conn.peer_address, reason)
        conn.close(int(CloseCode.CERTIFICATE), reason)

    def _register(self, peer: str, conn: QuicConn) -> DirectChannel:
        table = conn.listener
        assert isinstance(table, DirectTable)
        channel = DirectChannel(peer, conn, table)
        table.vouched.set()
        self.channels[peer] = channel
        self._channel_up.unpark_all()
        log.info("direct channel to %r open via %s", peer, conn.peer_address)
        if self.on_channel_up is not None:
            self.on_channel_up(channel)
        return channel

    def channel_gone(self, table: DirectTable) -> None:
        peer = table.peer
        if peer is not None:
            channel = self.channels.get(peer)
            if channel is not None and channel.conn is table.conn:
                del self.channels[peer]

    # -- streams -----------------------------------------------------------------------------------

    async def wait_accepting(self, peer: str) -> None:
        """A channel ``peer`` is opening to this client may be a moment from open here: its
        opener has it once its side of the handshake is complete and this side's punch
        said yes. Wait for it (bounded) so that either side may use a channel as soon as
        ``new_channel`` returned."""
        peer = canonical_id(peer)
        expected = self._expected.get(peer)
        if peer in self.channels or expected is None or not expected.accepting:
            return
        with trio.move_on_after(ACCEPTING_WAIT):
            await expected.done.wait()

    def new_stream(
        self, peer: str, stream_id: StreamId | None = None
    ) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        peer = canonical_id(peer)
        channel = self.channels.get(peer)
        if channel is None or not channel.conn.is_open:
            raise ChannelError(f"no direct channel to {peer!r} is open (call new_channel first)")
        ids = self.ctx.direct_ids
        if stream_id is not None:
            if stream_id.n in ids:
                raise self.ctx.id_in_use(stream_id)
            n = stream_id.n
        else:
            while channel.next_sid in ids:
                channel.next_sid += 1
            n = channel.next_sid
            channel.next_sid += 1
        ids.add(n)
        st = channel.table.open_stream()
        st.on_done = lambda: ids.discard(n)
        write_message(st, control.encode(control.OpenDirect(n)))
        return message_channels(st, peer, StreamId.direct(n))

    async def accept_stream(self, table: DirectTable, st: StreamState) -> None:
        # Nothing the peer sends counts before its certificate matched the one vouched for
        # (a dialler checks it only after the handshake, and may dial before the grant).
        await wait_any(table.vouched, table.conn.closed)
        if not table.vouched.is_set():
            st.fail(ChannelError("the direct connection closed"), StreamCode.ABORTED)
            return
        try:
            msg = control.decode(await read_header(st))
        except ConecError as exc:
            st.fail(ProtocolError(f"bad stream header: {exc}"), StreamCode.PROTOCOL)
            return
        peer = table.peer
        if isinstance(msg, control.DirectClose):
            st.finish_send()
            st.stop_receiving(StreamCode.STOPPED)
            self.channel_gone(table)
            table.conn.close(int(CloseCode.CHANNEL_CLOSED), "channel closed by the peer")
            return
        handler = self.header_handlers.get(type(msg))
        if handler is not None and peer is not None:
            handler(peer, st, msg)
            return
        if not isinstance(msg, control.OpenDirect) or peer is None:
            st.fail(ProtocolError("unexpected stream header"), StreamCode.PROTOCOL)
            return
        sid = StreamId.direct(msg.sid)
        send, recv = message_channels(st, peer, sid)
        self.ctx.deliver_incoming(IncomingStream(peer, sid, send, recv), st)

    # -- closing -----------------------------------------------------------------------------------

    async def close(self, peer: str) -> None:
        peer = canonical_id(peer)
        channel = self.channels.pop(peer, None)
        if channel is None:
            raise ChannelError(f"no direct channel to {peer!r} is open")
        conn = channel.conn
        if conn.is_open:
            st = channel.table.open_stream()
            write_message(st, control.encode(control.DirectClose()))
            st.finish_send()
            # The peer forgets the channel, then closes the connection: once we see that,
            # either side may open a new channel at once.
            with trio.move_on_after(2.0):
                await conn.closed.wait()
        await conn.aclose(int(CloseCode.CHANNEL_CLOSED), "channel closed")

    def peer_certificate_changed(self, peer: str, cert_sha256: bytes) -> None:
        """The coordinator says ``peer`` came back with the certificate of that hash: a
        channel pinned to another one leads to a process that is gone; close it at once."""
        channel = self.channels.get(peer)
        if channel is None:
            return
        cert = channel.conn.peer_certificate
        pinned = _tls.cert_der(cert) if cert is not None else b""
        if hashlib.sha256(pinned).digest() == cert_sha256:
            return
        log.info("closing the direct channel to %r: it came back with another certificate", peer)
        del self.channels[peer]
        channel.conn.close(
            int(CloseCode.CHANNEL_CLOSED), "the peer came back with another certificate"
        )

    # -- staying reachable when a NAT gives a side a new port (see control.ReachMe) ----------

    def channel_stalled(self, table: DirectTable) -> None:
        """Nothing this client sends on a channel is acknowledged. If its NAT gave it a new
        public port, the peer's NAT drops whatever comes from there until the peer sends to
        it: have the coordinator tell the peer where this client is now."""
        peer = table.peer
        channel = self.channels.get(peer) if peer is not None else None
        if channel is not None and channel.conn is table.conn:
            log.debug("the direct channel to %r gets no answer: asking it to punch", peer)
            self.ctx.send_control(control.ReachMe(channel.peer))

    def peer_address(self, peer: str, addr: tuple[str, int]) -> None:
        """The coordinator says ``peer``'s channel to this client gets no answer and sees
        ``peer`` at ``addr`` now: punch there if the channel goes elsewhere (QUIC follows
        the peer once one of its packets gets through this client's NAT), else ping the
        channel (this client's NAT may have moved it: then the ping stalls, and this
        client asks in turn)."""
        channel = self.channels.get(canonical_id(peer))
        endpoint = self.ctx.endpoint()
        if channel is None or not channel.conn.is_open or endpoint is None:
            return
        targets = usable_candidates([addr], endpoint.sock.family)
        if not targets or targets[0] == channel.conn.peer_address:
            channel.conn.ping()
        elif channel.conn not in self._following:
            log.info("peer %r is at %s:%s now: punching there", channel.peer, *addr)
            self._following.add(channel.conn)
            self.ctx.nursery.start_soon(self._follow, endpoint, channel.conn, targets[0])

    async def _follow(
        self, endpoint: QuicEndpoint, conn: QuicConn, target: tuple[Any, ...]
    ) -> None:
        """Punch ``target`` until the channel's connection goes there, within the punch
        budget and one second. The punch carries no channel's token: it only opens this
        client's NAT."""
        packet = punch_packet(secrets.token_bytes(control.PUNCH_TOKEN_SIZE))
        try:
            for _ in range(FAST_PUNCHES):
                if not conn.is_open or conn.peer_address == target:
                    return
                if self._punch_budget.take():
                    await endpoint.send_raw(packet, target)
                await trio.sleep(PUNCH_INTERVAL)
        finally:
            self._following.discard(conn)

    def coordinator_lost(self) -> None:
        """With reconnecting off, losing the coordinator ends every channel too."""
        for channel in list(self.channels.values()):
            channel.conn.close_now(int(CloseCode.CHANNEL_CLOSED), "peer lost its coordinator")
        self.channels.clear()

    async def aclose_all(self) -> None:
        for channel in list(self.channels.values()):
            await channel.conn.aclose(int(CloseCode.NORMAL), "client leaving")
        self.channels.clear()

    def statistics(self) -> dict[str, ChannelStatistics]:
        """Snapshots of the open channels, by peer id."""
        return {
            peer: channel_statistics(peer, channel.conn)
            for peer, channel in sorted(self.channels.items())
            if channel.conn.is_open
        }


class DirectTable(StreamTable):
    """The stream table of a direct connection; knows its peer once the cert is checked."""

    direct = True

    def __init__(self, manager: DirectManager, peer: str | None, conn: QuicConn) -> None:
        ctx = manager.ctx
        self.manager = manager
        self.peer = peer
        self.vouched = trio.Event()  # the peer's certificate is the one vouched for
        super().__init__(
            conn,
            window=ctx.config.stream_window,
            max_message_size=ctx.config.max_message_size,
            on_new_stream=self._new_stream,
            on_terminated=self._gone,
            describe_loss=self._loss,
        )

    def _loss(self) -> ConecError:
        return ChannelError(f"the direct channel to {self.peer!r} was closed")

    def _new_stream(self, st: StreamState) -> None:
        self.manager.ctx.nursery.start_soon(self.manager.accept_stream, self, st)

    def _gone(self, conn: QuicConn, error_code: int, reason: str) -> None:
        self.manager.channel_gone(self)

    def handshake_completed(self, conn: QuicConn) -> None:
        self.manager.handshake_done(self)

    def path_stalled(self, conn: QuicConn) -> None:
        self.manager.channel_stalled(self)
