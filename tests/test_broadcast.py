"""Broadcast channels on real sockets: fan-out, sender ids, order, counts, ends, flow control."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import ClientFactory, wait_for, wait_until_stalled

import conec_trio
from conec_trio import (
    BroadcastMessage,
    BroadcastNotFoundError,
    CborReceiveChannel,
    CborSendChannel,
    ConecError,
    Lagged,
    MessageTooLargeError,
    RefusedError,
    open_nonblocking,
    untagged,
)
from conec_trio._wire.framing import encode_tagged

DEADLINE = 10  # seconds: every wait in these tests is bounded by this unless told otherwise

# A small per-stream window, so that a few dozen kilobytes fill every buffer on the way and
# flow control shows within a few hundred messages.
SMALL_WINDOW = 16 * 1024


async def wait_counts(
    client: conec_trio.Client, name: str, expected: tuple[int, int], within: float = 5.0
) -> None:
    """Wait until ``broadcast_count(name) == expected``, with a deadline."""
    counts: tuple[int, int] | None = None
    try:
        with trio.fail_after(within):
            while True:
                counts = await client.broadcast_count(name)
                if counts == expected:
                    return
                await trio.sleep(0.005)
    except trio.TooSlowError:
        raise AssertionError(
            f"broadcast {name!r} counts stayed {counts}, expected {expected} within {within} s"
        ) from None


async def wait_gone(
    coord: conec_trio.Coordinator, client: conec_trio.Client, name: str, broadcasts: int = 0
) -> None:
    """Wait until the coordinator dropped channel ``name``; then ``broadcast_count`` raises."""
    await wait_for(lambda: coord.num_broadcasts == broadcasts, DEADLINE)
    with trio.fail_after(DEADLINE), pytest.raises(BroadcastNotFoundError, match=name):
        await client.broadcast_count(name)


async def receive_all(
    recv: trio.abc.ReceiveChannel[BroadcastMessage[bytes]], n: int
) -> list[BroadcastMessage[bytes]]:
    with trio.fail_after(DEADLINE):
        return [await recv.receive() for _ in range(n)]


async def expect_end(recv: trio.abc.ReceiveChannel[Any]) -> None:
    with trio.fail_after(DEADLINE), pytest.raises(trio.EndOfChannel):
        await recv.receive()


def by_sender(messages: list[BroadcastMessage[bytes]]) -> dict[str, list[int]]:
    """Sequence numbers (the payload's first 4 bytes) of each sender, in arrival order."""
    out: dict[str, list[int]] = {}
    for m in messages:
        out.setdefault(m.sender, []).append(int.from_bytes(m.data[:4], "big"))
    return out


def numbered(k: int, size: int = 4) -> bytes:
    return k.to_bytes(4, "big") + bytes(size - 4)


# --- delivery and sender ids ----------------------------------------------------------------


async def test_loopback_single_member_gets_its_own_messages(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "solo") as solo:
        with trio.fail_after(DEADLINE):
            send, recv = await solo.new_broadcast("echo")
            payloads = [b"one", b"", b"three" * 1000]
            for p in payloads:
                await send.send(p)
        got = await receive_all(recv, 3)
        assert got == [BroadcastMessage("solo", p) for p in payloads]
        assert all(type(m) is BroadcastMessage for m in got)


async def test_two_members_both_directions_tagged_with_authenticated_ids(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        with trio.fail_after(DEADLINE):
            sa, ra = await alice.new_broadcast("chat")
            sb, rb = await bob.new_broadcast("chat")
            # Payloads that look like the coordinator's own framing: a tag naming someone else,
            # and the empty-sender tag that marks the end of the channel. Both must arrive as
            # plain data from their real sender.
            forged_tag = encode_tagged("bob", b"forged")
            forged_end = encode_tagged("", b"")
            await sa.send(b"from alice")
            await sa.send(forged_tag)
            await sa.send(forged_end)
        expected_a = [
            BroadcastMessage("alice", b"from alice"),
            BroadcastMessage("alice", forged_tag),
            BroadcastMessage("alice", forged_end),
        ]
        assert await receive_all(ra, 3) == expected_a
        assert await receive_all(rb, 3) == expected_a

        with trio.fail_after(DEADLINE):
            await sb.send(b"from bob")
            await sb.send(encode_tagged("alice", b"forged too"))
        expected_b = [
            BroadcastMessage("bob", b"from bob"),
            BroadcastMessage("bob", encode_tagged("alice", b"forged too")),
        ]
        assert await receive_all(ra, 2) == expected_b
        assert await receive_all(rb, 2) == expected_b


async def test_every_receiver_sees_each_senders_messages_in_order(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    senders = ["s1", "s2", "s3"]
    per_sender = 200
    total = per_sender * len(senders)
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(open_client(coord, cid))
            for cid in [*senders, "listener"]
        ]
        ends = []
        with trio.fail_after(DEADLINE):
            for c in clients:
                ends.append(await c.new_broadcast("ordered"))
        received: dict[str, list[BroadcastMessage[bytes]]] = {}

        async def send_all(send: trio.abc.SendChannel[bytes]) -> None:
            for k in range(per_sender):
                await send.send(numbered(k, 300))

        async def read_all(cid: str, recv: trio.abc.ReceiveChannel[Any]) -> None:
            received[cid] = [await recv.receive() for _ in range(total)]

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                for c, (send, recv) in zip(clients, ends, strict=True):
                    nursery.start_soon(read_all, c.id, recv)
                    if c.id in senders:
                        nursery.start_soon(send_all, send)

    assert set(received) == {*senders, "listener"}
    for cid, messages in received.items():
        assert by_sender(messages) == {s: list(range(per_sender)) for s in senders}, cid


# --- counts and membership ------------------------------------------------------------------


async def test_counts_right_after_joining_and_unknown_name(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        with trio.fail_after(DEADLINE):
            with pytest.raises(BroadcastNotFoundError, match="nothing-here") as info:
                await alice.broadcast_count("nothing-here")
            assert isinstance(info.value, ConecError)
            assert coord.num_broadcasts == 0

            await alice.new_broadcast("room")
            assert await alice.broadcast_count("room") == (1, 1)
            assert await bob.broadcast_count("room") == (1, 1)
            assert coord.num_broadcasts == 1

            await bob.new_broadcast("room")
            assert await alice.broadcast_count("room") == (2, 2)
            assert coord.num_broadcasts == 1

            await bob.new_broadcast("other")
            assert await alice.broadcast_count("other") == (1, 1)
            assert await alice.broadcast_count("room") == (2, 2)
            assert coord.num_broadcasts == 2

            # One client may join the same channel twice: two members.
            await alice.new_broadcast("room")
            assert await bob.broadcast_count("room") == (3, 3)


async def test_closing_send_end_lowers_senders_and_keeps_receiving(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        with trio.fail_after(DEADLINE):
            sa, ra = await alice.new_broadcast("room")
            sb, rb = await bob.new_broadcast("room")
            await sa.aclose()
        await wait_counts(bob, "room", (1, 2))
        with pytest.raises(trio.ClosedResourceError):
            await sa.send(b"after close")
        with trio.fail_after(DEADLINE):
            await sb.send(b"still here")
        # alice no longer sends but still receives, and is not told the channel ended.
        assert await receive_all(ra, 1) == [BroadcastMessage("bob", b"still here")]
        assert await receive_all(rb, 1) == [BroadcastMessage("bob", b"still here")]


async def test_closing_receive_end_lowers_receivers_promptly(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        with trio.fail_after(DEADLINE):
            _, ra = await alice.new_broadcast("room")
            sb, rb = await bob.new_broadcast("room")
            await rb.aclose()
        # Nothing is sent: the coordinator learns of the close from the close itself.
        await wait_counts(alice, "room", (2, 1), within=2.0)
        with pytest.raises(trio.ClosedResourceError):
            await rb.receive()
        # bob still sends; alice gets it.
        with trio.fail_after(DEADLINE):
            await sb.send(b"bob sends on")
        assert await receive_all(ra, 1) == [BroadcastMessage("bob", b"bob sends on")]


async def test_member_whose_client_left_its_block_is_reaped(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice:
        with trio.fail_after(DEADLINE):
            sa, ra = await alice.new_broadcast("room")
            async with open_client(coord, "bob") as bob:
                await bob.new_broadcast("room")  # both ends left open
                assert await alice.broadcast_count("room") == (2, 2)
        await wait_counts(alice, "room", (1, 1), within=2.0)
        # alice alone: not held back, and her own messages still come back.
        with trio.fail_after(DEADLINE):
            for k in range(100):
                await sa.send(numbered(k, 1000))
        got = await receive_all(ra, 100)
        assert by_sender(got) == {"alice": list(range(100))}


# The client run in a separate process, so that it can be killed without a clean close.
_DOOMED_CLIENT = """
import sys, trio, conec_trio

async def main():
    port, ca = int(sys.argv[1]), sys.argv[2]
    config = conec_trio.ClientConfig(
        id="doomed", coord_host="127.0.0.1", coord_port=port, ca=ca, idle_timeout=1.0
    )
    async with conec_trio.open_client(config) as client:
        await client.new_broadcast("reap")
        print("joined", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_member_whose_client_was_killed_is_reaped_after_idle_timeout(
    coord_config: Callable[..., conec_trio.CoordConfig],
    open_client: ClientFactory,
    tmp_path: Path,
    coord_identity: tuple[bytes, bytes],
) -> None:
    idle = 1.0
    ca_path = tmp_path / "coord-ca.pem"
    ca_path.write_bytes(coord_identity[0])
    script = tmp_path / "doomed.py"
    script.write_text(_DOOMED_CLIENT)
    config = coord_config(idle_timeout=idle, stream_window=SMALL_WINDOW)
    async with (
        conec_trio.open_coordinator(config) as coord,
        # The survivor's own idle timeout is short too, so that its keepalives come often
        # enough for the coordinator's short idle timeout.
        open_client(coord, "alice", idle_timeout=idle, stream_window=SMALL_WINDOW) as alice,
    ):
        with trio.fail_after(DEADLINE):
            sa, ra = await alice.new_broadcast("reap")
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script), str(coord.address[1]), str(ca_path)],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            with trio.fail_after(DEADLINE):
                line = b""
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(1)
                    assert chunk, "the doomed client exited before joining"
                    line += chunk
                assert line == b"joined\n"
            await wait_counts(alice, "reap", (2, 2))
        finally:
            proc.kill()
            with trio.fail_after(DEADLINE):
                await proc.wait()

        # Far more than the windows on the way to the dead member can hold: alice's sends
        # complete only once the dead member is reaped, within the idle timeout plus margin.
        killed_at = time.monotonic()
        n = 200
        done = trio.Event()

        async def send_many() -> None:
            for k in range(n):
                await sa.send(numbered(k, 1024))
            done.set()

        with trio.fail_after(idle + 4):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_many)
                got = [await ra.receive() for _ in range(n)]
                await done.wait()
        assert by_sender(got) == {"alice": list(range(n))}
        assert await alice.broadcast_count("reap") == (1, 1)
        assert time.monotonic() - killed_at < idle + 4


async def test_names_are_checked_and_distinct(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice:
        with trio.fail_after(DEADLINE):
            for bad in ["", "x" * 1025, 123, None]:
                with pytest.raises(ConecError, match="broadcast name"):
                    await alice.new_broadcast(bad)  # type: ignore[arg-type]
            assert coord.num_broadcasts == 0
            longest = "\u00e9" * 1024  # 1024 characters, 2048 bytes of UTF-8
            spaced = "a name / with spaces"
            s1, r1 = await alice.new_broadcast(longest)
            s2, r2 = await alice.new_broadcast(spaced)
            s3, r3 = await alice.new_broadcast(spaced.upper())
            assert coord.num_broadcasts == 3
            assert await alice.broadcast_count(longest) == (1, 1)
            await s1.send(b"1")
            await s2.send(b"2")
            await s3.send(b"3")
        assert await receive_all(r1, 1) == [BroadcastMessage("alice", b"1")]
        assert await receive_all(r2, 1) == [BroadcastMessage("alice", b"2")]
        assert await receive_all(r3, 1) == [BroadcastMessage("alice", b"3")]


async def test_channel_limit_refuses_new_names_only(
    coord_config: Callable[..., conec_trio.CoordConfig], open_client: ClientFactory
) -> None:
    async with (
        conec_trio.open_coordinator(coord_config(max_broadcasts=1)) as coord,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        with trio.fail_after(DEADLINE):
            sa, ra = await alice.new_broadcast("first")
            with pytest.raises(RefusedError, match="maximum of 1 broadcast"):
                await bob.new_broadcast("second")
            assert coord.num_broadcasts == 1
            with pytest.raises(BroadcastNotFoundError):
                await bob.broadcast_count("second")
            # The existing channel still takes members, and bob's client is fine.
            sb, rb = await bob.new_broadcast("first")
            assert await bob.broadcast_count("first") == (2, 2)
            for end in (sa, ra, sb, rb):
                await end.aclose()
        await wait_gone(coord, bob, "first")
        with trio.fail_after(DEADLINE):
            s2, r2 = await bob.new_broadcast("second")
            await s2.send(b"room now")
        assert await receive_all(r2, 1) == [BroadcastMessage("bob", b"room now")]


async def test_largest_message_arrives_whole_from_the_longest_id(
    coord_config: Callable[..., conec_trio.CoordConfig], open_client: ClientFactory
) -> None:
    limit = 64 * 1024
    long_id = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
    async with (
        conec_trio.open_coordinator(coord_config(max_message_size=limit)) as coord,
        open_client(coord, long_id, max_message_size=limit) as sender,
        open_client(coord, "reader", max_message_size=limit) as reader,
    ):
        with trio.fail_after(DEADLINE):
            s, _ = await sender.new_broadcast("big")
            _, r = await reader.new_broadcast("big")
            biggest = bytes(range(256)) * (limit // 256)
            await s.send(biggest)
            with pytest.raises(MessageTooLargeError):
                await s.send(biggest + b"!")
            await s.send(b"after")  # the refused message left the channel usable
        assert await receive_all(r, 2) == [
            BroadcastMessage(long_id, biggest),
            BroadcastMessage(long_id, b"after"),
        ]


async def test_idle_member_with_default_config_stays_under_short_coordinator_idle_timeout(
    coord_config: Callable[..., conec_trio.CoordConfig], open_client: ClientFactory
) -> None:
    idle = 0.5
    async with (
        conec_trio.open_coordinator(coord_config(idle_timeout=idle)) as coord,
        open_client(coord, "idler") as idler,  # keepalive=True, default idle_timeout
    ):
        with trio.fail_after(DEADLINE):
            await idler.new_broadcast("quiet")
        # A live member must not be reaped like a dead one: watch it over several idle timeouts.
        with trio.move_on_after(4 * idle):
            await wait_for(lambda: coord.num_clients == 0, DEADLINE)
        assert coord.num_clients == 1, "the idle client was dropped"
        with trio.fail_after(DEADLINE):
            assert await idler.broadcast_count("quiet") == (1, 1)


# --- the end of a channel -------------------------------------------------------------------


async def test_end_of_channel_after_last_message_and_channel_gone_after_last_close(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    names = ["alice", "bob", "carol"]
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(open_client(coord, cid)) for cid in names]
        with trio.fail_after(DEADLINE):
            ends = [await c.new_broadcast("finite") for c in clients]
        (sa, ra), (sb, rb), (sc, rc) = ends
        alice, bob, carol = clients

        with trio.fail_after(DEADLINE):
            await sb.send(numbered(0))
            await sb.aclose()
            await sc.aclose()
        await wait_counts(alice, "finite", (1, 3))

        async def alice_sends() -> None:
            for k in range(50):
                await sa.send(numbered(k, 2000))
            await sa.aclose()

        results: dict[str, list[BroadcastMessage[bytes]]] = {}

        async def read_to_end(cid: str, recv: trio.abc.ReceiveChannel[Any]) -> None:
            results[cid] = [m async for m in recv]  # stops at EndOfChannel

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice_sends)
                for cid, (_, recv) in zip(names, ends, strict=True):
                    nursery.start_soon(read_to_end, cid, recv)

        for cid in names:
            assert by_sender(results[cid]) == {"bob": [0], "alice": list(range(50))}, cid
            await expect_end(ends[names.index(cid)][1])  # and again: the end stays

        # Every sender closed; the receivers that saw the end still count until aclose().
        await wait_counts(carol, "finite", (0, 3))
        assert coord.num_broadcasts == 1
        with trio.fail_after(DEADLINE):
            await ra.aclose()
        await wait_counts(carol, "finite", (0, 2))
        with trio.fail_after(DEADLINE):
            await rb.aclose()
        await wait_counts(carol, "finite", (0, 1))
        assert coord.num_broadcasts == 1
        with trio.fail_after(DEADLINE):
            await rc.aclose()
        await wait_gone(coord, alice, "finite")

        # The name is free again: joining creates a fresh channel.
        with trio.fail_after(DEADLINE):
            s2, r2 = await bob.new_broadcast("finite")
            assert await bob.broadcast_count("finite") == (1, 1)
            await s2.send(b"fresh")
        assert await receive_all(r2, 1) == [BroadcastMessage("bob", b"fresh")]


async def test_channel_gone_when_every_member_closed_both_ends(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        with trio.fail_after(DEADLINE):
            sa, ra = await alice.new_broadcast("short")
            sb, rb = await bob.new_broadcast("short")
            await bob.new_broadcast("other")
            assert coord.num_broadcasts == 2
            # Receive ends first: the members still count as senders.
            await ra.aclose()
            await rb.aclose()
        await wait_counts(alice, "short", (2, 0))
        assert coord.num_broadcasts == 2
        with trio.fail_after(DEADLINE):
            await sa.aclose()
            await sb.aclose()
        await wait_gone(coord, alice, "short", broadcasts=1)
        assert await bob.broadcast_count("other") == (1, 1)


# --- flow control ---------------------------------------------------------------------------


async def test_a_member_that_stops_reading_holds_senders_back_until_it_closes(
    coord_config: Callable[..., conec_trio.CoordConfig], open_client: ClientFactory
) -> None:
    per_sender, size = 80, 2048
    senders = ["a", "b", "c"]
    total = per_sender * len(senders)
    config = coord_config(stream_window=SMALL_WINDOW)
    async with conec_trio.open_coordinator(config) as coord, AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(open_client(coord, cid, stream_window=SMALL_WINDOW))
            for cid in [*senders, "stuck"]
        ]
        with trio.fail_after(DEADLINE):
            ends = [await c.new_broadcast("paced") for c in clients]
        _, stuck_recv = ends[-1]
        sent = dict.fromkeys(senders, 0)
        received: dict[str, list[BroadcastMessage[bytes]]] = {}

        async def send_all(cid: str, send: trio.abc.SendChannel[bytes]) -> None:
            for k in range(per_sender):
                await send.send(numbered(k, size))
                sent[cid] += 1

        async def read_all(cid: str, recv: trio.abc.ReceiveChannel[Any]) -> None:
            received[cid] = [await recv.receive() for _ in range(total)]

        async with trio.open_nursery() as nursery:
            for cid, (send, recv) in zip(senders, ends[:-1], strict=True):
                nursery.start_soon(send_all, cid, send)
                nursery.start_soon(read_all, cid, recv)
            # "stuck" never reads: the senders stall. What got through is bounded by the
            # windows between them and it (a few per sender), far below what they want to send.
            with trio.fail_after(DEADLINE):
                await wait_until_stalled()
            blocked_at = sum(sent.values())
            assert blocked_at * size <= 16 * SMALL_WINDOW, sent
            assert blocked_at < total
            # Closing the stuck member's receive end lets everyone go on at once.
            with trio.fail_after(DEADLINE):
                await stuck_recv.aclose()
            await wait_counts(clients[0], "paced", (4, 3))
            with trio.fail_after(DEADLINE):
                await wait_for(lambda: sum(sent.values()) == total, DEADLINE)

    expected = {s: list(range(per_sender)) for s in senders}
    for cid in senders:
        assert by_sender(received[cid]) == expected, cid


async def test_nonblocking_receiver_never_holds_the_sender_back(
    coord_config: Callable[..., conec_trio.CoordConfig], open_client: ClientFactory
) -> None:
    n, size, capacity = 2000, 200, 16
    config = coord_config(stream_window=SMALL_WINDOW)
    async with (
        conec_trio.open_coordinator(config) as coord,
        open_client(coord, "talker", stream_window=SMALL_WINDOW) as talker,
        open_client(coord, "lazy", stream_window=SMALL_WINDOW) as lazy,
    ):
        with trio.fail_after(DEADLINE):
            st, rt = await talker.new_broadcast("news")
            sl, rl = await lazy.new_broadcast("news")
            await sl.aclose()  # lazy only listens
            await rt.aclose()  # talker only talks
        async with open_nonblocking(rl, capacity) as nb:
            # n * size is many times what the windows to "lazy" hold: without the adapter
            # draining in the background, the sends would stall (see the test above).
            with trio.fail_after(DEADLINE):
                for k in range(n):
                    await st.send(numbered(k, size))
                await st.aclose()
            received: list[BroadcastMessage[bytes]] = []
            lag_reports: list[int] = []
            with trio.fail_after(DEADLINE):
                while True:
                    try:
                        received.append(await nb.receive())
                    except Lagged as exc:
                        lag_reports.append(exc.count)
                    except trio.EndOfChannel:
                        break
        seqs = by_sender(received)["talker"]
        assert lag_reports
        assert all(count > 0 for count in lag_reports)
        assert sum(lag_reports) + len(received) == n
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        assert seqs[-1] == n - 1  # the newest are kept


# --- adapters on broadcast channels ---------------------------------------------------------


async def test_adapters_on_broadcast_channels(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        with trio.fail_after(DEADLINE):
            sa, ra = await alice.new_broadcast("typed")
            sb, rb = await bob.new_broadcast("typed")
            await ra.aclose()

            await sa.send(b"plain")
            assert await untagged(rb).receive() == b"plain"

            value = {"n": 1, "items": [1.5, "two", b"three", None], "nested": {"ok": True}}
            await CborSendChannel(sa).send(value)
            assert await CborReceiveChannel(rb).receive() == BroadcastMessage("alice", value)
            await CborSendChannel(sb).send([1, 2, 3])
            assert await CborReceiveChannel(rb).receive() == BroadcastMessage("bob", [1, 2, 3])

            async with open_nonblocking(rb, 8) as nb:
                await sa.send(b"via nonblocking")
                assert await untagged(nb).receive() == b"via nonblocking"
                await CborSendChannel(sb).send({"k": "v"})
                assert await CborReceiveChannel(untagged(nb)).receive() == {"k": "v"}
                await CborSendChannel(sa).send(7)
                assert await CborReceiveChannel(nb).receive() == BroadcastMessage("alice", 7)
                await sa.aclose()
                await sb.aclose()
                with pytest.raises(trio.EndOfChannel):
                    await untagged(nb).receive()
        # Leaving the block closed bob's receiver: the channel is gone.
        await wait_gone(coord, alice, "typed")


# --- many members ---------------------------------------------------------------------------


async def test_fifty_members_each_receive_every_message_of_two_senders(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    members, per_sender = 50, 50
    started = time.monotonic()
    joined = 0
    all_joined = trio.Event()
    go_ahead = trio.Event()
    sends: dict[int, trio.abc.SendChannel[bytes]] = {}
    results: dict[int, dict[str, list[int]]] = {}
    observer: list[conec_trio.Client] = []

    async def member(i: int) -> None:
        nonlocal joined
        async with open_client(coord, f"m{i}") as client:
            send, recv = await client.new_broadcast("crowd")
            sends[i] = send
            if i == 0:
                observer.append(client)
            joined += 1
            if joined == members:
                all_joined.set()
            got = [await recv.receive() for _ in range(2 * per_sender)]
            results[i] = by_sender(got)
            await go_ahead.wait()

    async def send_all(i: int) -> None:
        for k in range(per_sender):
            await sends[i].send(numbered(k, 100))

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for i in range(members):
                nursery.start_soon(member, i)  # all open and join concurrently
            await all_joined.wait()
            joined_after = time.monotonic() - started
            assert coord.num_clients == members
            assert await observer[0].broadcast_count("crowd") == (members, members)
            async with trio.open_nursery() as senders:
                senders.start_soon(send_all, 0)
                senders.start_soon(send_all, 1)
            await wait_for(lambda: len(results) == members, DEADLINE)
            go_ahead.set()
    elapsed = time.monotonic() - started
    expected = {"m0": list(range(per_sender)), "m1": list(range(per_sender))}
    assert all(results[i] == expected for i in range(members))
    print(f"50 members: joined in {joined_after:.2f} s, all done in {elapsed:.2f} s")
    await wait_for(lambda: coord.num_broadcasts == 0, DEADLINE)
