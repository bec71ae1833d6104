"""Presence: list_peers, wait_for_peer, watch_peers, broadcast_members, coord.client_ids().

The reconciliation after a new snapshot (a reconnect, or a dropped subscription) and the
bounds on slow watchers and slow subscribers are tested as units with plain sets; the rest
on real sockets.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing
from helpers import ClientFactory, wait_for

import conec_trio
from conec_trio import BroadcastNotFoundError, DisconnectedError, PeerEvent
from conec_trio._presence import (
    COMPACT_AT,
    PeerWatch,
    Presence,
    PresenceFeed,
    compact,
    reconcile,
)
from conec_trio._wire import control
from conec_trio._wire.framing import FrameDecoder

DEADLINE = 5  # seconds: every wait on the network in these tests is bounded by this

# Where clients reconnect by themselves, the test of losing the coordinator turns it off.
NO_RECONNECT: dict[str, Any] = (
    {"reconnect": False} if "reconnect" in conec_trio.ClientConfig.__dataclass_fields__ else {}
)


def joined(*peers: str) -> list[PeerEvent]:
    return [PeerEvent(p, True) for p in peers]


def left(*peers: str) -> list[PeerEvent]:
    return [PeerEvent(p, False) for p in peers]


def applied(running: set[str], events: list[PeerEvent]) -> set[str]:
    out = set(running)
    for event in events:
        if event.joined:
            assert event.peer not in out, f"join of {event.peer!r}, which is there"
            out.add(event.peer)
        else:
            assert event.peer in out, f"leave of {event.peer!r}, which is not there"
            out.discard(event.peer)
    return out


def drain(watch: PeerWatch) -> list[PeerEvent]:
    events = []
    while watch.pending:
        events.append(watch._pending.popleft())
    return events


# --- reconciliation and compaction, with plain sets ----------------------------------------


def test_reconcile_gives_leaves_then_joins() -> None:
    running = {"alice", "bob", "carol"}
    snapshot = {"alice", "dave", "bert"}
    events = reconcile(running, snapshot)
    assert events == left("bob", "carol") + joined("bert", "dave")
    assert applied(running, events) == snapshot
    assert reconcile(snapshot, snapshot) == []
    assert reconcile(set(), {"b", "a"}) == joined("a", "b")
    assert reconcile({"b", "a"}, set()) == left("a", "b")


def test_compact_keeps_net_changes_per_peer() -> None:
    # Reader knows {alice, bob}. Unread: carol joins and leaves (never seen), bob leaves and
    # comes back (no net change), alice leaves, dave joins, leaves and joins.
    events = [
        *joined("carol"),
        *left("bob"),
        *left("carol"),
        *left("alice"),
        *joined("bob", "dave"),
        *left("dave"),
        *joined("dave"),
    ]
    kept = compact(events)
    assert kept == left("alice") + joined("dave")
    assert applied({"alice", "bob"}, kept) == applied({"alice", "bob"}, events)


@pytest.mark.parametrize("seed", range(20))
def test_compact_agrees_with_the_full_history(seed: int) -> None:
    import random

    rng = random.Random(seed)
    start = {f"p{i}" for i in range(0, 20, 2)}
    state, events = set(start), []
    for _ in range(300):
        peer = f"p{rng.randrange(20)}"
        event = PeerEvent(peer, peer not in state)
        state = applied(state, [event])
        events.append(event)
    kept = compact(events)
    assert applied(start, kept) == state
    assert len({e.peer for e in kept}) == len(kept)  # one event per peer at most


async def test_a_watcher_that_does_not_read_stays_bounded() -> None:
    watch = PeerWatch({"alice"})
    state = {"alice"}
    # Ten thousand short-lived peers and one that keeps leaving and coming back.
    for i in range(10_000):
        for event in (*joined(f"w{i}"), *left(f"w{i}"), *left("alice"), *joined("alice")):
            state = applied(state, [event])
            watch.push(event)
        assert watch.pending <= 2 * COMPACT_AT
    watch.push(PeerEvent("last", True))
    state.add("last")
    events = [await watch.receive() for _ in range(watch.pending)]
    assert applied(set(), events) == state == {"alice", "last"}


async def test_watch_ends_after_its_unread_events() -> None:
    watch = PeerWatch({"a"})
    watch.end(DisconnectedError("coordinator gone"))
    assert await watch.receive() == PeerEvent("a", True)
    with pytest.raises(trio.BrokenResourceError, match="coordinator gone"):
        await watch.receive()
    clean = PeerWatch(())
    clean.end(None)
    with pytest.raises(trio.EndOfChannel):
        await clean.receive()
    await clean.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await clean.receive()


class Wire:
    """What a Presence sends, for tests without a coordinator."""

    def __init__(self) -> None:
        self.sent: list[control.Message] = []

    def __call__(self, msg: control.Message) -> None:
        self.sent.append(msg)

    def last_subscribe(self) -> int:
        msg = self.sent[-1]
        assert isinstance(msg, control.PresenceSubscribe), self.sent
        return msg.rid


async def test_presence_catches_up_after_a_reconnect() -> None:
    wire = Wire()
    presence = Presence(wire)
    async with trio.open_nursery() as nursery:
        ready = trio.Event()
        seen: list[PeerEvent] = []
        finish = trio.Event()

        async def watcher() -> None:
            async with presence.watch() as events:
                ready.set()
                async for event in events:
                    seen.append(event)
                    if finish.is_set() and not events.pending:  # type: ignore[attr-defined]
                        return

        nursery.start_soon(watcher)
        await trio.testing.wait_all_tasks_blocked()
        assert not ready.is_set()  # entering waits for the snapshot
        presence.on_message(control.PresenceSnapshot(wire.last_subscribe(), ["me", "a", "b"]))
        presence.on_message(control.PresenceEvent("c", True))
        presence.on_message(control.PresenceEvent("a", False))
        await trio.testing.wait_all_tasks_blocked()
        assert ready.is_set()
        assert seen == joined("a", "b", "me", "c") + left("a")

        # The connection goes down; b leaves and d joins meanwhile; a new link comes up.
        presence.link_down()
        presence.on_message(control.PresenceEvent("x", True))  # late, from the old link
        presence.link_up()
        rid = wire.last_subscribe()
        presence.on_message(control.PresenceSnapshot(rid - 1, ["stale"]))  # an older answer
        presence.on_message(control.PresenceEvent("y", True))  # precedes our snapshot
        seen.clear()
        presence.on_message(control.PresenceSnapshot(rid, ["me", "c", "d"]))
        finish.set()
        presence.on_message(control.PresenceEvent("e", True))
        assert presence.peers == {"me", "c", "d", "e"}
    assert seen == left("b") + joined("d", "e")
    assert wire.sent[-1] == control.PresenceUnsubscribe()  # the last user left


async def collect(presence: Presence, into: list[PeerEvent]) -> None:
    async with presence.watch() as events:
        async for event in events:
            into.append(event)


async def test_presence_resubscribes_when_dropped() -> None:
    wire = Wire()
    presence = Presence(wire)
    got: list[PeerEvent] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, presence, got)
        await trio.testing.wait_all_tasks_blocked()
        presence.on_message(control.PresenceSnapshot(wire.last_subscribe(), ["me", "a"]))
        presence.on_message(control.PresenceDropped("too slow"))
        rid = wire.last_subscribe()  # it subscribed again at once
        presence.on_message(control.PresenceSnapshot(rid, ["me", "b"]))
        await trio.testing.wait_all_tasks_blocked()
        assert got == joined("a", "me") + left("a") + joined("b")
        nursery.cancel_scope.cancel()
    assert presence.peers == set()  # the last user left: the set no longer follows


async def test_wait_for_peer_unit() -> None:
    wire = Wire()
    presence = Presence(wire)
    async with trio.open_nursery() as nursery:
        done: list[str] = []

        async def wait(peer: str) -> None:
            await presence.wait_for(peer)
            done.append(peer)

        nursery.start_soon(wait, "bob")
        nursery.start_soon(wait, "me")
        await trio.testing.wait_all_tasks_blocked()
        subscribes = [m for m in wire.sent if isinstance(m, control.PresenceSubscribe)]
        assert len(subscribes) == 1  # one subscription serves every user
        presence.on_message(control.PresenceSnapshot(subscribes[0].rid, ["me"]))
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["me"]
        # bob joins and leaves before the waiting task runs: it still saw bob connected
        presence.on_message(control.PresenceEvent("bob", True))
        presence.on_message(control.PresenceEvent("bob", False))
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["me", "bob"]
    assert wire.sent[-1] == control.PresenceUnsubscribe()
    presence.close(DisconnectedError("coordinator gone"))
    with pytest.raises(DisconnectedError, match="coordinator gone"):
        await presence.wait_for("carol")


async def test_inconsistent_events_are_ignored() -> None:
    wire = Wire()
    presence = Presence(wire)
    got: list[PeerEvent] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, presence, got)
        await trio.testing.wait_all_tasks_blocked()
        presence.on_message(control.PresenceSnapshot(wire.last_subscribe(), ["a"]))
        presence.on_message(control.PresenceEvent("a", True))  # a is there already
        presence.on_message(control.PresenceEvent("z", False))  # z never was
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert got == joined("a")


# --- the coordinator's side: a subscriber that falls behind ------------------------------


class FakeConn:
    def __init__(self) -> None:
        self.is_open = True
        self.backlog = 0
        self.written = b""

    def send_stream_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.written += data
        self.backlog += len(data)

    def send_backlog(self, stream_id: int) -> int:
        return self.backlog

    def messages(self) -> list[control.Message]:
        decoder = FrameDecoder(1 << 20)
        decoder.feed(self.written)
        out = []
        while (frame := decoder.next_message()) is not None:
            out.append(control.decode(frame))
        return out


class FakeSession:
    def __init__(self, client_id: str) -> None:
        self.id = client_id
        self.conn = FakeConn()
        self.control = type("St", (), {"stream_id": 0, "send_error": None, "conn": self.conn})()


def test_a_slow_subscriber_is_dropped_and_told() -> None:
    window = 1000
    feed = PresenceFeed(window)
    slow, quick = FakeSession("slow"), FakeSession("quick")
    feed.subscribe(slow, 1, ["slow", "quick"])  # type: ignore[arg-type]
    feed.subscribe(quick, 1, ["slow", "quick"])  # type: ignore[arg-type]
    n = 0
    while isinstance(slow.conn.messages()[-1], control.PresenceSnapshot | control.PresenceEvent):
        quick.conn.backlog = 0  # it acknowledges everything
        feed.publish(f"p{n}", True)
        n += 1
        assert n < window, "never dropped"
    # The slow one got a snapshot, events up to about a window, and then the notice.
    *events, notice = slow.conn.messages()[1:]
    assert isinstance(notice, control.PresenceDropped)
    assert "subscribe again" in notice.message
    framed = sum(1 + len(control.encode(e)) for e in events)  # a 1-byte length each
    assert window - 20 < framed <= window + 20
    feed.publish("later", True)
    assert slow.conn.messages()[-1] == notice  # nothing more for it
    assert quick.conn.messages()[-1] == control.PresenceEvent("later", True)
    assert len(quick.conn.messages()) == n + 2
    # It read all that, then subscribed again: it starts over with a snapshot.
    slow.conn.backlog = 0
    feed.subscribe(slow, 2, ["slow"])  # type: ignore[arg-type]
    feed.publish("again", True)
    assert slow.conn.messages()[-2:] == [
        control.PresenceSnapshot(2, ["slow"]),
        control.PresenceEvent("again", True),
    ]


# --- real sockets --------------------------------------------------------------------------


async def test_client_ids_and_list_peers(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "carol") as carol, open_client(coord, "alice") as alice:
        async with open_client(coord, "bob") as bob:
            assert coord.client_ids() == ["alice", "bob", "carol"]
            for client in (alice, bob, carol):
                assert await client.list_peers() == frozenset({"alice", "bob", "carol"})
        # bob is gone once the coordinator saw it leave
        await wait_for(lambda: coord.client_ids() == ["alice", "carol"])
        peers = await alice.list_peers()
        assert isinstance(peers, frozenset)
        assert peers == {"alice", "carol"}


async def test_watch_peers_follows_joins_and_leaves(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "bob"), open_client(coord, "alice") as alice:
        running: set[str] = set()

        async def next_event(events: trio.abc.ReceiveChannel[PeerEvent]) -> PeerEvent:
            with trio.fail_after(DEADLINE):
                event = await events.receive()
            nonlocal running
            running = applied(running, [event])
            return event

        async with alice.watch_peers() as events, AsyncExitStack() as stack:
            # First a join for everyone connected now, alice included.
            assert {await next_event(events), await next_event(events)} == set(
                joined("alice", "bob")
            )
            assert running == set(coord.client_ids())
            await stack.enter_async_context(open_client(coord, "carol"))
            assert await next_event(events) == PeerEvent("carol", True)
            async with open_client(coord, "dave"):
                assert await next_event(events) == PeerEvent("dave", True)
                assert running == set(coord.client_ids()) == {"alice", "bob", "carol", "dave"}
            assert await next_event(events) == PeerEvent("dave", False)
            await stack.aclose()
            assert await next_event(events) == PeerEvent("carol", False)
            assert running == set(coord.client_ids()) == {"alice", "bob"}
            # A second watcher starts from the same running set.
            async with alice.watch_peers() as second:
                assert {await second.receive(), await second.receive()} == set(
                    joined("alice", "bob")
                )
        with pytest.raises(trio.EndOfChannel):
            await events.receive()


async def test_only_watchers_are_sent_presence(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    # Opt-in: the coordinator pushes joins and leaves only to clients that watch, and only
    # while they watch (observed through its subscriber table: nothing public shows it).
    subscribers = coord._presence._subscribers
    async with open_client(coord, "alice") as alice, open_client(coord, "bob"):
        assert not subscribers
        async with alice.watch_peers():
            assert [s.id for s in subscribers] == ["alice"]
        await wait_for(lambda: not subscribers)
        await alice.wait_for_peer("bob")
        await wait_for(lambda: not subscribers)


async def test_wait_for_peer_that_joins_later(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice:
        with trio.fail_after(DEADLINE):
            await alice.wait_for_peer("alice")  # connected: at once
        arrived = trio.Event()

        async def wait() -> None:
            with trio.fail_after(DEADLINE):
                await alice.wait_for_peer("bob")
            arrived.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            # Subscribed and waiting: nothing more happens until bob comes.
            await wait_for(lambda: len(coord._presence._subscribers) == 1)
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert not arrived.is_set()
            async with open_client(coord, "bob"):
                with trio.fail_after(DEADLINE):
                    await arrived.wait()
                # bob is connected now: another wait returns at once
                with trio.fail_after(DEADLINE):
                    await alice.wait_for_peer("bob")


async def test_wait_for_peer_fails_when_the_coordinator_goes(
    coord_config: Any, client_config: Any
) -> None:
    async with (
        conec_trio.open_coordinator(coord_config()) as coord,
        conec_trio.open_client(client_config(coord, "alice", **NO_RECONNECT)) as alice,
        trio.open_nursery() as nursery,
    ):
        failed = trio.Event()

        async def wait() -> None:
            with pytest.raises(DisconnectedError):
                await alice.wait_for_peer("bob")
            failed.set()

        nursery.start_soon(wait)
        await wait_for(lambda: len(coord._presence._subscribers) == 1)
        await coord._shutdown()
        with trio.fail_after(DEADLINE):
            await failed.wait()


async def test_a_dropped_watcher_catches_up(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice, alice.watch_peers() as events:
        running = applied(set(), [await events.receive()])
        # Make the coordinator treat alice as too far behind (its backlog is over any
        # negative allowance), so that the next join drops its subscription.
        (session,) = coord._presence._subscribers
        coord._presence._subscribers[session] = -1
        async with open_client(coord, "bob"), open_client(coord, "carol"):
            with trio.fail_after(DEADLINE):
                while running != set(coord.client_ids()):
                    running = applied(running, [await events.receive()])
            assert running == {"alice", "bob", "carol"}
            assert coord._presence._subscribers[session] > 0  # subscribed again


async def test_broadcast_members(coord: conec_trio.Coordinator, open_client: ClientFactory) -> None:
    async with (
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
        open_client(coord, "carol") as carol,
    ):
        with pytest.raises(BroadcastNotFoundError, match="news"):
            await alice.broadcast_members("news")
        await alice.new_broadcast("news")
        _, b_recv = await bob.new_broadcast("news")
        c_send, _ = await carol.new_broadcast("news")
        await carol.new_broadcast("news")  # a second membership: named once
        everyone = frozenset({"alice", "bob", "carol"})
        members = await bob.broadcast_members("news")
        assert members == (everyone, everyone)
        assert all(isinstance(ids, frozenset) for ids in members)
        await c_send.aclose()
        await b_recv.aclose()

        async def members_now() -> tuple[frozenset[str], frozenset[str]]:
            return await alice.broadcast_members("news")

        expected = (everyone, frozenset({"alice", "carol"}))  # carol's 2nd membership sends
        with trio.fail_after(DEADLINE):
            while (got := await members_now()) != expected:
                await trio.sleep(0.01)
        assert got == expected
        assert await alice.broadcast_count("news") == (3, 3)  # counts count memberships
        with pytest.raises(BroadcastNotFoundError):
            await alice.broadcast_members("other")
