"""The coordinator's side of clients' control streams: reading requests (bounded by what the
client leaves unread of the replies), answering them, and brokering direct channels (offer
to the target and grant to the requester at once, then the target's answer: a refusal is
passed on to the requester)."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import trio

from ._config import canonical_id
from ._exceptions import ConecError, ProtocolError
from ._hub import BroadcastHub
from ._peer_memory import PeerMemory
from ._presence import PresenceFeed
from ._session import (
    CHANNEL_REQUEST_BURST,
    CHANNEL_REQUEST_RATE,
    ClientSession,
    _clip,
    _shown,
)
from ._streams import StreamState, read_header, write_message
from ._wire import control
from ._wire.codes import CloseCode, Reason

# How long the target of a channel offer has to answer it.
OFFER_TIMEOUT = 5.0

# Requests answered with a list that may be long (ids, names).
_ListRequest: TypeAlias = (
    control.PeerListRequest | control.BroadcastMembersRequest | control.BroadcastListRequest
)

# A client's control requests are not read while this many bytes of replies to it are
# unacknowledged (a client that grants no credit on its control stream stops being served,
# and its unread requests then hold back its own sending).
CONTROL_REPLY_BACKLOG = 64 * 1024

# The coordinator's handler of one control message (``Coordinator._control_message``).
MessageHandler = Callable[[ClientSession, StreamState, Any], Awaitable[None]]
# Runs a task on behalf of a client in the coordinator's nursery (see ``_serving``).
SpawnGuarded = Callable[..., None]


async def control_loop(session: ClientSession, st: StreamState, handle: MessageHandler) -> None:
    """Read ``session``'s control requests and hand each to ``handle``, in order."""
    conn = session.conn
    while True:
        while conn.send_backlog(st.stream_id) > CONTROL_REPLY_BACKLOG:
            if st.send_error is not None or not conn.is_open:
                return
            await st.wait_writable()
        try:
            payload = await read_header(st)
            msg = control.decode(payload)
        except ConecError as exc:
            if session.conn.is_open and not isinstance(exc, ProtocolError):
                return
            if session.conn.is_open:
                session.refuse(CloseCode.PROTOCOL, f"bad control message: {exc}")
            return
        await handle(session, st, msg)


async def _writable(st: StreamState) -> bool:
    """Wait until the control stream has room for a reply that may be large (a peer
    list); False if it broke. A client that asks and does not read its replies stops
    being read, rather than making the coordinator hold them all."""
    while st.send_error is None and not st.can_write():
        await st.wait_writable()
    return st.send_error is None and st.conn.is_open


class ControlRequests:
    """Answers control requests from the registered ``clients``, and brokers the direct
    channels they ask for (tasks go to ``spawn``; brokered pairs are noted in ``memory``)."""

    def __init__(
        self,
        *,
        clients: Mapping[str, ClientSession],
        broadcasts: BroadcastHub,
        presence: PresenceFeed,
        memory: PeerMemory,
        spawn: SpawnGuarded,
    ) -> None:
        self._clients = clients
        self._broadcasts = broadcasts
        self._presence = presence
        self._memory = memory
        self._spawn = spawn
        self._offer_ids = itertools.count(1)
        # Pairs of clients with a channel negotiation in progress -> the requester.
        self._negotiating: dict[frozenset[str], str] = {}

    def client_ids(self) -> list[str]:
        return sorted(self._clients)

    async def handle(self, session: ClientSession, st: StreamState, msg: Any) -> None:
        if isinstance(msg, control.BroadcastCountRequest):
            counts = self._broadcasts.counts(msg.name)
            reply: Any
            if counts is None:
                reply = control.ErrorReply(
                    msg.rid, Reason.NO_BROADCAST, f"no broadcast channel named {_shown(msg.name)}"
                )
            else:
                reply = control.BroadcastCountReply(msg.rid, *counts)
            write_message(st, control.encode(reply))
        elif isinstance(msg, control.ChannelRequest):
            assert session.id is not None
            if not session.channel_requests.take():
                limited = control.ErrorReply(
                    msg.rid,
                    Reason.LIMIT,
                    f"client {session.id!r} asks for direct channels faster than the "
                    f"coordinator allows ({CHANNEL_REQUEST_BURST} at once, then "
                    f"{CHANNEL_REQUEST_RATE:g} a second)",
                )
                write_message(st, control.encode(limited))
                return
            msg = control.ChannelRequest(msg.rid, canonical_id(msg.peer))
            pair = frozenset((session.id, msg.peer))
            if self._negotiating.get(pair) == msg.peer:
                # Both ends asked at once: the peer's opening goes on (this client got or
                # gets its offer) and gives this client its channel too: one per pair.
                busy = control.ErrorReply(
                    msg.rid,
                    Reason.PEER_OPENING,
                    f"peer {_shown(msg.peer)} is opening a channel to it",
                )
                write_message(st, control.encode(busy))
                return
            self._negotiating.setdefault(pair, session.id)
            self._broker_channel(session, msg)
        elif isinstance(msg, _ListRequest):
            if await _writable(st):
                write_message(st, control.encode(self._list_reply(msg)))
        elif isinstance(msg, control.PresenceSubscribe):
            if await _writable(st):
                self._presence.subscribe(session, msg.rid, self.client_ids())
        elif isinstance(msg, control.PresenceUnsubscribe):
            self._presence.unsubscribe(session)
        elif isinstance(msg, control.ReachMe):
            self._reach(session, canonical_id(msg.peer))
        elif isinstance(msg, control.ChannelOfferReply):
            waiter = session.offers.pop(msg.oid, None)
            if waiter is not None:
                waiter.send_nowait(msg)
        else:
            session.refuse(CloseCode.PROTOCOL, f"unexpected control message {type(msg).__name__}")

    def _reach(self, session: ClientSession, peer: str) -> None:
        """``session``'s direct channel to ``peer`` gets no answer: tell ``peer`` where this
        coordinator sees ``session`` now (see ``control.ReachMe``). It makes the peer punch,
        so it draws on the same budget as channel requests; over it, it is dropped."""
        target = self._clients.get(peer)
        if target is None or target is session or target.control is None:
            return
        if target.conn.is_open and session.id is not None and session.channel_requests.take():
            notice = control.PeerAddress(session.id, session.observed_addr)
            write_message(target.control, control.encode(notice))

    def _list_reply(self, msg: _ListRequest) -> control.Message:
        if isinstance(msg, control.PeerListRequest):
            return control.PeerListReply(msg.rid, self.client_ids())
        if isinstance(msg, control.BroadcastListRequest):
            return control.BroadcastListReply(msg.rid, self._broadcasts.names())
        members = self._broadcasts.members(msg.name)
        if members is None:
            return control.ErrorReply(
                msg.rid, Reason.NO_BROADCAST, f"no broadcast channel named {_shown(msg.name)}"
            )
        return control.BroadcastMembersReply(msg.rid, *members)

    def _broker_channel(self, session: ClientSession, msg: control.ChannelRequest) -> None:
        """Offer the target a channel from ``session`` and grant it to ``session`` at once:
        the target consents by punching and by accepting the handshake of the certificate it
        was offered, and its answer (awaited in a task) only matters if it is a refusal."""
        requester = session.id
        peer = _shown(msg.peer)
        assert requester is not None and session.control is not None
        target = self._clients.get(msg.peer)
        reply: Any
        if msg.peer == requester:
            reply = control.ErrorReply(
                msg.rid, Reason.SELF, "cannot open a direct channel to itself"
            )
        elif target is None or target.control is None:
            reply = control.ErrorReply(msg.rid, Reason.NO_PEER, f"peer {peer} is not connected")
        elif not target.listen:
            reply = control.ErrorReply(
                msg.rid,
                Reason.NOT_LISTENING,
                f"peer {peer} does not accept direct channels (it runs with listen=False)",
            )
        else:
            oid = next(self._offer_ids)
            answer_send, answer_recv = trio.open_memory_channel[control.ChannelOfferReply](1)
            target.offers[oid] = answer_send
            # Both sides' punches carry it: a punch from anyone else is ignored.
            token = secrets.token_bytes(control.PUNCH_TOKEN_SIZE)
            offer = control.ChannelOffer(
                oid, requester, session.cert_der, session.candidates_for(target), token
            )
            reply = control.ChannelGrant(
                msg.rid, msg.peer, target.cert_der, target.candidates_for(session), token
            )
            # Both are waited on (the requester dials once the target punched on the offer):
            # the grant, which answers the request, leaves from here at once (send_now),
            # before the offer wakes the target (where they share a CPU, the target's work
            # on the offer would hold it back); the offer with the next driver round.
            if session.conn.is_open:
                write_message(session.control, control.encode(reply))
                session.conn.send_now()
            write_message(target.control, control.encode(offer))
            target.conn.expedite()
            self._spawn(session, self._await_answer, msg.peer, target, oid, answer_recv, token)
            return
        if session.conn.is_open:
            write_message(session.control, control.encode(reply))
        self._negotiated(requester, msg.peer)

    async def _await_answer(
        self,
        session: ClientSession,
        peer_id: str,
        target: ClientSession,
        oid: int,
        answer_recv: trio.MemoryReceiveChannel[control.ChannelOfferReply],
        token: bytes,
    ) -> None:
        """The target's answer to offer ``oid``: a refusal, or none in time, is passed on to
        the requester (which gives its attempt up)."""
        requester = session.id
        assert requester is not None and session.control is not None
        peer = _shown(peer_id)
        answer = None
        try:
            with trio.move_on_after(OFFER_TIMEOUT):
                answer = await answer_recv.receive()
        finally:
            target.offers.pop(oid, None)
            self._negotiated(requester, peer_id)
        refusal: control.ChannelRefused | None = None
        if answer is None:
            message = f"peer {peer} did not answer the channel offer"
            refusal = control.ChannelRefused(peer_id, token, Reason.NO_ANSWER, message)
        elif not answer.accept:
            message = _clip(f"peer {peer} refused the channel: {answer.message}")
            refusal = control.ChannelRefused(peer_id, token, Reason.REFUSED, message)
        else:
            self._memory.brokered(requester, peer_id)
        if refusal is not None and session.conn.is_open:
            write_message(session.control, control.encode(refusal))

    def _negotiated(self, requester: str, peer: str) -> None:
        pair = frozenset((requester, peer))
        if self._negotiating.get(pair) == requester:
            del self._negotiating[pair]
