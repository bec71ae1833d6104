"""Presence on the client: the running set of connected peers, its watchers and waiters.

The set follows the coordinator only while someone uses it (a ``watch_peers()`` block or a
``wait_for_peer`` call): the first user subscribes, the last one unsubscribes, so clients
that do not ask are sent nothing. A subscription starts with a snapshot; every event after
it on the control stream is relative to it. A new snapshot (after a reconnect, or when the
coordinator dropped a subscriber that fell behind) is reconciled with the running set: the
watchers get the leaves and joins that make their set equal to the coordinator's again.

Messages from the coordinator are handled synchronously, in the order they arrive
(:meth:`Presence.on_message`), so no event can slip between a snapshot and the next one.

A watcher that does not read keeps its unread events; once more than ``COMPACT_AT`` wait,
they are merged per peer (see :class:`PeerWatch`), so its memory is bounded by the number
of peers, not by how long it has not read.

The coordinator's side, :class:`PresenceFeed`, is at the end.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Set
from contextlib import asynccontextmanager
from typing import NamedTuple, Protocol

import trio

from ._exceptions import ConecError, DisconnectedError
from ._quic import QuicConn
from ._streams import StreamState, write_message
from ._wire import control

log = logging.getLogger("conec_trio.client")
coord_log = logging.getLogger("conec_trio.coordinator")

# Unread events a watcher holds before they are merged per peer.
COMPACT_AT = 1024


class PeerEvent(NamedTuple):
    """``peer`` connected to the coordinator (``joined``) or left it."""

    peer: str
    joined: bool


def reconcile(running: Set[str], snapshot: Set[str]) -> list[PeerEvent]:
    """The events that turn ``running`` into ``snapshot``: leaves, then joins, each sorted."""
    leaves = [PeerEvent(peer, False) for peer in sorted(running - snapshot)]
    joins = [PeerEvent(peer, True) for peer in sorted(snapshot - running)]
    return leaves + joins


def compact(events: Iterable[PeerEvent]) -> list[PeerEvent]:
    """Merge unread events per peer: keep a peer's last event, and only if it changes what
    the reader knew of that peer before the first (a join and a leave cancel out). Order
    follows each peer's last event."""
    events = list(events)
    known_before: dict[str, bool] = {}
    last: dict[str, int] = {}
    for i, event in enumerate(events):
        known_before.setdefault(event.peer, not event.joined)
        last[event.peer] = i
    return [
        event
        for i, event in enumerate(events)
        if last[event.peer] == i and event.joined != known_before[event.peer]
    ]


class PeerWatch(trio.abc.ReceiveChannel[PeerEvent]):
    """The receive end of ``watch_peers()``.

    Its unread events are held here; past ``COMPACT_AT`` of them they are merged per peer
    (:func:`compact`), so a reader that falls behind loses the steps in between (a peer that
    joined and left unseen is never shown) but its running set is right when it reads on.
    """

    def __init__(self, current: Iterable[str]) -> None:
        self._pending: deque[PeerEvent] = deque(PeerEvent(p, True) for p in sorted(current))
        self._compact_at = COMPACT_AT
        self._readers = trio.lowlevel.ParkingLot()
        self._closed = False  # this end was closed: receive raises ClosedResourceError
        self._ended = False  # no more events will come
        self._cause: ConecError | None = None  # why they stopped, if not a clean end

    def push(self, event: PeerEvent) -> None:
        if self._closed or self._ended:
            return
        self._pending.append(event)
        if len(self._pending) > self._compact_at:
            self._pending = deque(compact(self._pending))
            # Compact again only once as many more have come: linear work overall.
            self._compact_at = max(COMPACT_AT, 2 * len(self._pending))
        self._readers.unpark_all()

    def end(self, cause: ConecError | None) -> None:
        """No more events: after the unread ones, EndOfChannel (``cause`` None) or
        BrokenResourceError."""
        if not self._ended:
            self._ended, self._cause = True, cause
            self._readers.unpark_all()

    @property
    def pending(self) -> int:
        """Unread events held now."""
        return len(self._pending)

    async def receive(self) -> PeerEvent:
        """The next join or leave. Raises ``trio.BrokenResourceError`` once the coordinator
        connection is lost for good and no event is left, ``trio.EndOfChannel`` after the
        client block ended."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this watch_peers() channel was closed")
            if self._pending:
                event = self._pending.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return event
            if self._ended:
                if self._cause is not None:
                    raise trio.BrokenResourceError(str(self._cause)) from self._cause
                raise trio.EndOfChannel
            await self._readers.park()

    async def aclose(self) -> None:
        self._closed = True
        self._pending.clear()
        self._readers.unpark_all()
        await trio.lowlevel.checkpoint()


class Presence:
    """The running set of peers as the coordinator reports it, and who uses it.

    ``send`` writes one control message to the coordinator without waiting (and drops it
    when the coordinator connection is down: :meth:`link_up` subscribes again).
    """

    def __init__(self, send: Callable[[control.Message], None]) -> None:
        self._send = send
        self.peers: set[str] = set()
        self._users = 0
        self._rids = itertools.count(1)
        self._awaited_rid: int | None = None  # the snapshot the subscription waits for
        self._synced = False  # the set follows the coordinator now
        self._changed = trio.lowlevel.ParkingLot()  # unparked on sync and on close
        self._watches: set[PeerWatch] = set()
        self._waiters: dict[str, set[trio.Event]] = {}
        self._closed = False
        self._cause: ConecError | None = None

    @property
    def synced(self) -> bool:
        return self._synced

    @property
    def subscribed(self) -> bool:
        """Someone uses the set, so it is (or is being) subscribed."""
        return self._users > 0 and not self._closed

    # -- users ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            if self._cause is not None:
                raise DisconnectedError(str(self._cause)) from self._cause
            raise DisconnectedError("the client has left")

    def _acquire(self) -> None:
        self._check_open()
        self._users += 1
        if self._users == 1:
            self._subscribe()

    def _release(self) -> None:
        self._users -= 1
        if self._users == 0 and not self._closed:
            self._send(control.PresenceUnsubscribe())
            self._awaited_rid = None
            self._synced = False
            self.peers.clear()

    def _subscribe(self) -> None:
        self._synced = False
        self._awaited_rid = next(self._rids)
        self._send(control.PresenceSubscribe(self._awaited_rid))

    async def _wait_synced(self) -> None:
        while not self._synced:
            self._check_open()
            await self._changed.park()

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[PeerWatch]:
        """A watcher of joins and leaves, starting with a join for every peer connected now.
        Entering waits for the subscription's snapshot."""
        self._acquire()
        # It starts from the running set; the snapshot's reconciliation reaches it too.
        watch = PeerWatch(self.peers)
        self._watches.add(watch)
        try:
            await self._wait_synced()
            yield watch
        finally:
            self._watches.discard(watch)
            watch.end(None)
            self._release()

    async def wait_for(self, peer: str) -> None:
        """Return once ``peer`` is connected (at once if the running set, in sync, has it)."""
        if self._synced and peer in self.peers:
            await trio.lowlevel.checkpoint()
            return
        self._acquire()
        arrived = trio.Event()
        self._waiters.setdefault(peer, set()).add(arrived)
        try:
            # Set by its join, by a snapshot that holds it, or by close().
            await arrived.wait()
            self._check_open()
        finally:
            waiting = self._waiters.get(peer)
            if waiting is not None:
                waiting.discard(arrived)
                if not waiting:
                    del self._waiters[peer]
            self._release()

    # -- the coordinator connection -----------------------------------------------------------

    def link_up(self) -> None:
        """A new coordinator connection (after the welcome): subscribe on it if anyone uses
        the set; its snapshot is reconciled with the set kept from before."""
        self._awaited_rid = None
        self._synced = False
        if self.subscribed:
            self._subscribe()

    def link_down(self) -> None:
        """The coordinator connection is lost for now: the set stops following it (and is
        kept, to be reconciled with the next snapshot)."""
        self._awaited_rid = None
        self._synced = False

    def close(self, cause: ConecError | None) -> None:
        """For good: watchers end after their unread events (EndOfChannel if ``cause`` is
        None, else BrokenResourceError), waiters raise DisconnectedError."""
        if self._closed:
            return
        self._closed, self._cause = True, cause
        self._synced = False
        for watch in self._watches:
            watch.end(cause)
        for waiting in self._waiters.values():
            for arrived in waiting:
                arrived.set()
        self._changed.unpark_all()

    def on_message(self, msg: control.Message) -> None:
        """A presence message from the coordinator, in the order they arrive."""
        if self._closed:
            return
        if isinstance(msg, control.PresenceSnapshot):
            if msg.rid == self._awaited_rid:
                self._sync(set(msg.peers))
            # else: the answer to a subscription given up since (ignored, as are the
            # events that follow it until the awaited snapshot).
        elif isinstance(msg, control.PresenceEvent):
            self._event(PeerEvent(msg.peer, msg.joined))
        elif isinstance(msg, control.PresenceDropped):
            log.info("the coordinator dropped the presence subscription: %s", msg.message)
            if self.subscribed and self._synced:
                self._subscribe()

    def _sync(self, snapshot: set[str]) -> None:
        self._awaited_rid = None
        for event in reconcile(self.peers, snapshot):
            self._apply(event)
        self._synced = True
        for peer in [p for p in self._waiters if p in self.peers]:
            for arrived in self._waiters[peer]:
                arrived.set()
        self._changed.unpark_all()

    def _event(self, event: PeerEvent) -> None:
        if not self._synced:
            return  # before the awaited snapshot: the snapshot includes it
        if event.joined == (event.peer in self.peers):
            # A join of a peer we have, or a leave of one we do not: the coordinator breaks
            # the protocol; the set stays as it is rather than going wrong.
            log.warning("ignoring an inconsistent presence event from the coordinator: %r", event)
            return
        self._apply(event)

    def _apply(self, event: PeerEvent) -> None:
        if event.joined:
            self.peers.add(event.peer)
            for arrived in self._waiters.get(event.peer, ()):
                arrived.set()
        else:
            self.peers.discard(event.peer)
        for watch in self._watches:
            watch.push(event)


# --- the coordinator's side -------------------------------------------------------------------


class Subscriber(Protocol):
    """What the feed needs of a coordinator's client session."""

    @property
    def id(self) -> str | None: ...
    @property
    def conn(self) -> QuicConn: ...
    @property
    def control(self) -> StreamState | None: ...


class PresenceFeed:
    """Joins and leaves for the clients that subscribed to them, on their control streams.

    A pushed event is written at once, without waiting. A subscriber whose control stream
    holds a stream window more unacknowledged bytes than it did right after its snapshot
    (which is written only once the stream has room: ``_requests._writable``) has fallen
    behind (a stalled process, a bad link): rather than let its backlog grow, its
    subscription is dropped and it is told so (PresenceDropped); the client subscribes
    again, and the new snapshot brings it up to date. One subscriber's events cost at most
    a window on top of its snapshot, however many joins and leaves it misses.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._subscribers: dict[Subscriber, int] = {}  # -> the backlog it may reach

    def subscribe(self, session: Subscriber, rid: int, ids: list[str]) -> None:
        st = session.control
        assert st is not None
        snapshot = control.encode(control.PresenceSnapshot(rid, ids))
        write_message(st, snapshot)
        self._subscribers[session] = st.conn.send_backlog(st.stream_id) + self._window

    def unsubscribe(self, session: Subscriber) -> None:
        self._subscribers.pop(session, None)

    def clear(self) -> None:
        """Everyone is leaving: tell no one of each departure."""
        self._subscribers.clear()

    def publish(self, peer: str, joined: bool) -> None:
        event = control.encode(control.PresenceEvent(peer, joined))
        for session, allowance in list(self._subscribers.items()):
            st = session.control
            if st is None or not session.conn.is_open or st.send_error is not None:
                del self._subscribers[session]
                continue
            if st.conn.send_backlog(st.stream_id) > allowance:
                del self._subscribers[session]
                coord_log.info("client %r falls behind on presence events: dropped", session.id)
                dropped = control.PresenceDropped(
                    "presence events were coming faster than this client took them: "
                    "subscribe again for a new snapshot"
                )
                write_message(st, control.encode(dropped))
                continue
            write_message(st, event)
