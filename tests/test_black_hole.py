"""Path MTU black holes on the fake network (simulated time): a path whose MTU drops
mid-transfer drops every full-size datagram. The sender falls back to a size the path still
carries, the transfer goes on with at most a short stall and arrives intact, and when the
MTU comes back the datagrams grow again. Both on a coordinator connection (a proxied
stream) and on a direct channel."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from helpers import wait_for

import conec_trio
from conec_trio import certs
from conec_trio._quic import PMTU_LADDER
from conec_trio._quic._pmtu import PMTU_RAISE_FIRST
from conec_trio.testing import TOO_BIG, FakeNetwork, open_fake_network

COORD_IP, ALICE_IP, BOB_IP = "192.0.2.1", "192.0.2.10", "192.0.2.20"
COORD_PORT = 1719
LARGEST = PMTU_LADDER[-1]
DROPPED_MTU = 1400  # what a tunnel leaves of a 1500-byte link
PATIENCE = 60.0  # simulated seconds: generous, they cost no wall time
STALL_LIMIT = 2.0  # the longest the transfer may stand still after the drop
HOLD = 4.5  # how long the limit holds: long enough for two re-probes to fail
# The sender writes at a steady 400 KB/s: enough for probing, and a few thousand
# datagrams at the fallback size keep the test fast in wall time.
CHUNK = 4 * 1024
CHUNK_INTERVAL = 0.01


@pytest.fixture(scope="module")
def identity() -> tuple[bytes, bytes]:
    return certs.self_signed_cert([COORD_IP])


@asynccontextmanager
async def open_lab(
    net: FakeNetwork, identity: tuple[bytes, bytes]
) -> AsyncIterator[tuple[conec_trio.Coordinator, conec_trio.Client, conec_trio.Client]]:
    cert, key = identity
    for ip in (COORD_IP, ALICE_IP, BOB_IP):
        net.add_host(ip)
    async with AsyncExitStack() as stack:
        coord = await stack.enter_async_context(
            conec_trio.open_coordinator(
                conec_trio.CoordConfig(cert, key, host=COORD_IP, port=COORD_PORT)
            )
        )
        clients = []
        for client_id, ip in (("alice", ALICE_IP), ("bob", BOB_IP)):
            stack.enter_context(net.on_host(ip))
            config = conec_trio.ClientConfig(
                id=client_id, coord_host=COORD_IP, coord_port=COORD_PORT, ca=cert
            )
            clients.append(await stack.enter_async_context(conec_trio.open_client(config)))
        yield coord, clients[0], clients[1]


@dataclass
class Transfer:
    """A stream of random chunks until ``stop``, hashed on both ends, with the time of
    every arrival."""

    chunk_interval: float = CHUNK_INTERVAL
    stop: trio.Event = field(default_factory=trio.Event)
    sent: hashlib._Hash = field(default_factory=hashlib.sha256)
    received_hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    received: int = 0
    arrivals: list[float] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    async def pump(self, send: conec_trio.MessageSendChannel) -> None:
        rng = random.Random(18)
        while not self.stop.is_set():
            chunk = rng.randbytes(CHUNK)
            self.sent.update(chunk)
            await send.send(chunk)
            await trio.sleep(self.chunk_interval)
        await send.aclose()

    async def drain(self, recv: conec_trio.MessageReceiveChannel) -> None:
        async for message in recv:
            self.received_hash.update(message)
            self.received += len(message)
            self.arrivals.append(trio.current_time())
        self.done.set()

    def longest_stall(self, since: float) -> float:
        """The longest time without an arrival from ``since`` to the last arrival."""
        times = [since] + [t for t in self.arrivals if t >= since]
        return max(b - a for a, b in itertools.pairwise(times))


@dataclass
class Recovery:
    fell_back: float  # from the drop until the sender's datagram size fit the path
    stall: float  # the longest pause in arrivals after the drop
    climbed_back: float  # from lifting the limit until the largest size again


async def drop_and_restore(
    net: FakeNetwork,
    datagram_size: Callable[[], int],
    send: conec_trio.MessageSendChannel,
    recv: conec_trio.MessageReceiveChannel,
) -> Recovery:
    transfer = Transfer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transfer.pump, send)
        nursery.start_soon(transfer.drain, recv)
        await wait_for(lambda: datagram_size() == LARGEST, PATIENCE, what="probing to the top")

        net.set_mtu(DROPPED_MTU)
        dropped_at = trio.current_time()
        too_big_before = net.dropped[TOO_BIG]
        await wait_for(lambda: datagram_size() <= DROPPED_MTU, PATIENCE, what="a fallback")
        fell_back = trio.current_time() - dropped_at
        assert net.dropped[TOO_BIG] > too_big_before  # the drop did bite
        # The transfer goes on at the smaller size.
        resumed_from = transfer.received
        await wait_for(
            lambda: transfer.received >= resumed_from + 256 * 1024,
            PATIENCE,
            what="256 KiB more after the drop",
        )
        stall = transfer.longest_stall(dropped_at)
        # While the limit holds, re-probing (after 1, 2, 4 s ...) finds nothing larger, and
        # costs the transfer no stall.
        while trio.current_time() < dropped_at + HOLD:
            assert datagram_size() <= DROPPED_MTU
            await trio.sleep(0.05)
        assert transfer.longest_stall(dropped_at) == stall

        net.set_mtu(None)
        lifted_at = trio.current_time()
        await wait_for(lambda: datagram_size() == LARGEST, PATIENCE, what="climbing back")
        climbed_back = trio.current_time() - lifted_at
        transfer.stop.set()
        with trio.fail_after(PATIENCE):
            await transfer.done.wait()
    assert transfer.received_hash.hexdigest() == transfer.sent.hexdigest()
    return Recovery(fell_back, stall, climbed_back)


async def test_a_proxied_stream_survives_an_mtu_drop_and_regrows(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(seed=1, delay=(0.01, 0.012), mtu=None) as net,
        open_lab(net, identity) as (coord, alice, _bob),
    ):
        send, _ = await alice.new_proxied_stream(None)
        incoming = await coord.incoming_streams.receive()
        link = alice._link
        assert link is not None
        recovery = await drop_and_restore(net, lambda: link.conn.datagram_size, send, incoming.recv)
    print(f"proxied stream: {recovery}")
    assert recovery.fell_back < STALL_LIMIT
    assert recovery.stall < STALL_LIMIT


async def test_a_direct_channel_survives_an_mtu_drop_and_regrows(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    async with (
        open_fake_network(seed=2, delay=(0.01, 0.012), mtu=None) as net,
        open_lab(net, identity) as (_coord, alice, bob),
    ):
        await alice.new_channel("bob")
        send, _ = await alice.new_direct_stream("bob")
        incoming = await bob.incoming_streams.receive()

        def size() -> int:
            return alice.statistics().channels["bob"].datagram_size

        recovery = await drop_and_restore(net, size, send, incoming.recv)
    print(f"direct channel: {recovery}")
    assert recovery.fell_back < STALL_LIMIT
    assert recovery.stall < STALL_LIMIT


async def test_a_long_session_climbs_back_soon_after_a_black_hole(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    # On an Ethernet path (1472 bytes of UDP payload) 1452 is the top that works, and every
    # re-probe of 4096 fails, so its interval grows through a long session (1, 2, 4, ... s).
    # A black hole is a new path: re-probing the size it took away starts over at 1 s
    # instead of waiting out that back-off (half a minute here, up to 10 in long sessions).
    ethernet, top = 1472, 1452
    async with (
        open_fake_network(seed=3, delay=(0.01, 0.012), mtu=ethernet) as net,
        open_lab(net, identity) as (_coord, alice, bob),
    ):
        await alice.new_channel("bob")
        send, _ = await alice.new_direct_stream("bob")
        incoming = await bob.incoming_streams.receive()
        transfer = Transfer(chunk_interval=0.05)  # 80 KB/s: probing goes on, cheaply

        def size() -> int:
            return alice.statistics().channels["bob"].datagram_size

        async with trio.open_nursery() as nursery:
            nursery.start_soon(transfer.pump, send)
            nursery.start_soon(transfer.drain, incoming.recv)
            await wait_for(lambda: size() == top, PATIENCE, what="probing to 1452")
            # Where a drop falls in the back-off's cycle is a matter of chance: three drops,
            # each after half a minute more of session (simulated), each with its own phase.
            climbs = []
            for _ in range(3):
                await trio.sleep(30.0)
                assert size() == top
                net.set_mtu(DROPPED_MTU)
                await wait_for(lambda: size() <= DROPPED_MTU, PATIENCE, what="a fallback")
                resumed_from = transfer.received
                await wait_for(
                    lambda start=resumed_from: transfer.received >= start + 128 * 1024,
                    PATIENCE,
                    what="128 KiB more at the fallback size",
                )
                assert size() <= DROPPED_MTU
                net.set_mtu(ethernet)
                lifted_at = trio.current_time()
                await wait_for(lambda: size() == top, PATIENCE, what="climbing back")
                climbs.append(round(trio.current_time() - lifted_at, 2))
            transfer.stop.set()
            with trio.fail_after(PATIENCE):
                await transfer.done.wait()
    assert transfer.received_hash.hexdigest() == transfer.sent.hexdigest()
    print(f"long session: climbed back {climbs} s after each lift")
    assert max(climbs) < 2 * PMTU_RAISE_FIRST + STALL_LIMIT, climbs
