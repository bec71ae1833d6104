"""Hole punching against hostile clients: no peer becomes a flood, and forged punches change
nothing.

On the fake network (``conec_trio.testing``) with trio's MockClock, so the 10 s a channel
attempt may punch cost no wall time and every datagram a host sends is counted. The bounds
asserted are the ones ``conec_trio._punch`` documents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from helpers import wait_for

import conec_trio
from conec_trio import _connect, certs
from conec_trio._direct import CHANNEL_TIMEOUT
from conec_trio._punch import (
    FAST_PUNCHES,
    MAX_PUNCHES_PER_ATTEMPT,
    PUNCH_BURST,
    PUNCH_MAGIC,
    PUNCH_RATE,
    PUNCH_TIMEOUT,
    candidates_for,
)
from conec_trio._session import CHANNEL_REQUEST_BURST, CHANNEL_REQUEST_RATE
from conec_trio._wire import control
from conec_trio._wire.codes import Reason
from conec_trio.testing import Datagram, FakeNetwork, open_fake_network

COORD_IP, COORD_PORT = "192.0.2.1", 1719
NAT_B, BOB_IP = "203.0.113.1", "10.0.2.2"
ALICE_IP = "198.51.100.8"  # public: anyone can send to her socket
MALLORY_IP = "198.51.100.66"
VICTIM_IP = "192.0.2.99"  # an address mallory would like flooded
PATIENCE = CHANNEL_TIMEOUT + 5.0  # simulated seconds


@pytest.fixture(scope="module")
def identity() -> tuple[bytes, bytes]:
    return certs.self_signed_cert([COORD_IP])


class Lab:
    def __init__(self, net: FakeNetwork, identity: tuple[bytes, bytes]) -> None:
        self.net = net
        self.identity = identity
        self.stack = AsyncExitStack()
        self.coord: conec_trio.Coordinator | None = None

    async def client(
        self, name: str, ip: str, local_addrs: list[tuple[str, int]] | None = None
    ) -> conec_trio.Client:
        """A client on host ``ip``; ``local_addrs``: what its hello claims as its own."""
        config = conec_trio.ClientConfig(
            id=name, coord_host=COORD_IP, coord_port=COORD_PORT, ca=self.identity[0]
        )
        with pytest.MonkeyPatch.context() as patch, self.net.on_host(ip):
            if local_addrs is not None:
                patch.setattr(_connect, "local_addrs", lambda *_: local_addrs)
            return await self.stack.enter_async_context(conec_trio.open_client(config))


@asynccontextmanager
async def open_lab(identity: tuple[bytes, bytes]) -> AsyncIterator[Lab]:
    """A public coordinator and hosts: bob behind a cone NAT, alice and mallory public."""
    # A few ms each way, so that forgeries can arrive while a channel is being brokered.
    async with open_fake_network(0, delay=(0.005, 0.005)) as net:
        net.add_host(COORD_IP)
        # Open filtering: bob's socket gets anything sent to his public address, forgeries too.
        net.add_host(BOB_IP, behind=net.add_nat(NAT_B, kind="cone", filtering="open"))
        net.add_host(ALICE_IP)
        net.add_host(MALLORY_IP)
        lab = Lab(net, identity)
        async with lab.stack:
            cert, key = identity
            lab.coord = await lab.stack.enter_async_context(
                conec_trio.open_coordinator(
                    conec_trio.CoordConfig(cert, key, host=COORD_IP, port=COORD_PORT)
                )
            )
            yield lab


def punches_by(net: FakeNetwork, ip: str, since: int = 0) -> list[Datagram]:
    """The punches host ``ip`` sent (after the first ``since`` datagrams of the network)."""
    return [d for d in net.sent_log[since:] if d.sender[0] == ip and d.data.startswith(PUNCH_MAGIC)]


def most_in_one_second(datagrams: list[Datagram]) -> int:
    times = sorted(d.sent_at for d in datagrams)
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


# --- row 2: a listener punched every address the requester claimed ------------------------------


async def test_row02_a_channel_request_makes_the_listener_punch_only_the_requester(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    """mallory claims 16 addresses of a victim as her own, then asks for a channel to bob
    and never dials. bob punched every one of them 20 times a second for 10 s (3,200
    datagrams); now only mallory as the coordinator saw her, within the documented bound."""
    async with open_lab(identity) as lab:
        bob = await lab.client("bob", BOB_IP)
        claimed = [(VICTIM_IP, 1000 + i) for i in range(control.MAX_LOCAL_ADDRS)]
        mallory = await lab.client("mallory", MALLORY_IP, local_addrs=claimed)
        start = len(lab.net.sent_log)
        mallory._send_control(control.ChannelRequest(1, "bob"))
        await wait_for(lambda: "mallory" in bob._direct._expected, PATIENCE)
        await wait_for(lambda: not bob._direct._expected, PATIENCE)  # the attempt ended
        sent = [d for d in lab.net.sent_log[start:] if d.sender[0] == BOB_IP]
        assert not [d for d in sent if d.dst[0] == VICTIM_IP]
        punches = punches_by(lab.net, BOB_IP, start)
        assert punches, "bob did not punch at all: the test proves nothing"
        assert {d.dst for d in punches} == {(MALLORY_IP, mallory.observed_address[1])}
        assert len(punches) <= MAX_PUNCHES_PER_ATTEMPT + 1


async def test_row02_channel_requests_are_rate_limited_per_client(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    """A burst of channel requests beyond the client's quota is refused, naming the limit;
    the quota refills at its rate, and another client's requests are not affected."""
    async with open_lab(identity) as lab:
        await lab.client("bob", BOB_IP)
        mallory = await lab.client("mallory", MALLORY_IP)
        alice = await lab.client("alice", ALICE_IP)
        extra = 10
        replies: list[Any] = []

        async def ask(client: conec_trio.Client) -> None:
            replies.append(await client._request(lambda rid: control.ChannelRequest(rid, "bob")))

        async with trio.open_nursery() as nursery:
            for _ in range(CHANNEL_REQUEST_BURST + extra):
                nursery.start_soon(ask, mallory)
        limited = [
            r for r in replies if isinstance(r, control.ErrorReply) and r.reason == Reason.LIMIT
        ]
        assert len(limited) == extra
        assert "faster than the coordinator allows" in limited[0].message
        replies.clear()
        await ask(alice)  # her own quota
        await trio.sleep(1 / CHANNEL_REQUEST_RATE)  # one request's worth of refill
        await ask(mallory)
        assert all(isinstance(r, control.ChannelGrant) for r in replies), replies


async def test_row02_a_listener_punches_within_its_budget_across_all_offers(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    """Offers from 200 peers at once (ids are cheap without a client CA): bob punched each
    20 times a second; now all of them together stay within his punch budget."""
    async with open_lab(identity) as lab:
        bob = await lab.client("bob", BOB_IP)
        start = len(lab.net.sent_log)
        async with trio.open_nursery() as nursery:
            for i in range(200):
                offer = control.ChannelOffer(
                    10_000 + i, f"peer{i}", b"cert", [(f"192.0.2.{i + 2}", 4000)], bytes(16)
                )
                nursery.start_soon(bob._direct.on_offer, offer)
        punches = punches_by(lab.net, BOB_IP, start)
        assert len(punches) >= PUNCH_BURST, "bob did not punch: the test proves nothing"
        assert most_in_one_second(punches) <= PUNCH_BURST + PUNCH_RATE
        assert len(punches) <= PUNCH_BURST + PUNCH_RATE * (CHANNEL_TIMEOUT + 1)


async def test_local_addresses_are_candidates_only_behind_the_same_public_ip() -> None:
    observed = ("203.0.113.1", 5000)
    local = [("10.0.2.2", 5000), ("192.0.2.99", 9), ("fe80::1", 5000), ("10.0.2.3", 1)]
    local += [("192.168.1.1", 1), ("172.16.0.1", 1)]
    assert candidates_for(observed, local, "198.51.100.1") == [observed]
    assert candidates_for(observed, local, "203.0.113.1") == [
        observed,
        ("10.0.2.2", 5000),
        ("fe80::1", 5000),
        ("10.0.2.3", 1),
    ]


async def test_hosts_behind_one_nat_open_a_channel_over_their_lan(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    """Peers behind one NAT are still told each other's LAN address, and punch it."""
    async with open_lab(identity) as lab:
        nat = lab.net.nats[NAT_B]
        lab.net.add_host("10.0.2.3", behind=nat)
        bob = await lab.client("bob", BOB_IP)
        carol = await lab.client("carol", "10.0.2.3")
        with trio.fail_after(PATIENCE):
            await carol.new_channel("bob")
            send, _ = await carol.new_direct_stream("bob")
            await send.send(b"over the LAN")
            incoming = await bob.incoming_streams.receive()
            assert await incoming.recv.receive() == b"over the LAN"
        assert lab.net.host("10.0.2.3").received_from[BOB_IP] > 0


# --- row 8: the first punch won, and punches were unauthenticated -------------------------------


async def test_row08_forged_punches_do_not_stop_a_channel_and_cost_nothing(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    """mallory sprays punches at alice and bob while alice opens a channel to bob: in the
    old form (carrying the peer's id, which made alice dial mallory and fail after 10 s),
    and in the new form with tokens she made up. The channel opens as usual, and neither
    answers mallory with a single datagram."""
    async with open_lab(identity) as lab:
        alice = await lab.client("alice", ALICE_IP)
        bob = await lab.client("bob", BOB_IP)
        assert lab.coord is not None
        alice_at = lab.coord._clients["alice"].observed_addr
        bob_at = lab.coord._clients["bob"].observed_addr
        forgeries = [
            (PUNCH_MAGIC + b"bob", alice_at),
            (PUNCH_MAGIC + bytes(16), alice_at),
            (PUNCH_MAGIC + b"\xff" * 16, alice_at),
            (PUNCH_MAGIC + b"alice", bob_at),
            (PUNCH_MAGIC + bytes(16), bob_at),
        ]
        sock = lab.net.socket_factory(2, MALLORY_IP, 4444)
        start = len(lab.net.sent_log)
        async with trio.open_nursery() as nursery:

            async def spray() -> None:
                while True:
                    for packet, addr in forgeries:
                        sock.sendto_nowait(packet, addr)
                    await trio.sleep(0.002)

            nursery.start_soon(spray)
            await trio.sleep(0.1)  # forgeries already arriving when the attempt starts
            t0 = trio.current_time()
            with trio.fail_after(2.0):
                await alice.new_channel("bob")
            assert trio.current_time() - t0 < 1.0
            nursery.cancel_scope.cancel()
        assert not [d for d in lab.net.sent_log[start:] if d.dst[0] == MALLORY_IP]
        with trio.fail_after(PATIENCE):
            send, _ = await alice.new_direct_stream("bob")
            await send.send(b"direct")
            incoming = await bob.incoming_streams.receive()
            assert await incoming.recv.receive() == b"direct"


async def test_reach_me_floods_are_cut_to_the_channel_request_budget(
    autojump_clock: trio.testing.MockClock,
    identity: tuple[bytes, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ReachMe makes its peer punch or ping (``control.ReachMe``): one naming its sender or
    nobody does nothing, and a flood of them reaches the peer only as fast as channel
    requests may be made, and always naming the sender's own address."""
    async with open_lab(identity) as lab:
        bob = await lab.client("bob", BOB_IP)
        mallory = await lab.client("mallory", MALLORY_IP)
        await mallory.new_channel("bob")  # one channel request from the budget
        start = len(lab.net.sent_log)
        notices: list[tuple[str, tuple[str, int]]] = []
        peer_address = bob._direct.peer_address

        def record(peer: str, addr: tuple[str, int]) -> None:
            notices.append((peer, addr))
            peer_address(peer, addr)

        monkeypatch.setattr(bob._direct, "peer_address", record)
        for peer in ("mallory", "nobody"):
            mallory._send_control(control.ReachMe(peer))
        for _ in range(100):
            mallory._send_control(control.ReachMe("bob"))
        await wait_for(lambda: len(notices) == CHANNEL_REQUEST_BURST - 1, PATIENCE)
        await trio.sleep(1.0)  # simulated: time for any notice beyond the budget to arrive
        assert len(notices) == CHANNEL_REQUEST_BURST - 1
        assert set(notices) == {("mallory", mallory.observed_address)}
        # mallory is where the coordinator saw her: bob only pinged the channel, and it lives.
        assert not punches_by(lab.net, BOB_IP, start)
        assert "mallory" in bob.statistics().channels


async def test_peer_address_notices_make_one_bounded_punch_run(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    """However many notices name a new address for a peer, the client punches it at most
    ``FAST_PUNCHES`` times in all (one run per channel at a time), and only there."""
    async with open_lab(identity) as lab:
        bob = await lab.client("bob", BOB_IP)
        await lab.client("mallory", MALLORY_IP)
        await bob.new_channel("mallory")
        start = len(lab.net.sent_log)
        for _ in range(100):
            bob._direct.peer_address("mallory", (VICTIM_IP, 1000))
        await trio.sleep(PUNCH_TIMEOUT)  # simulated: far beyond the run
        punches = punches_by(lab.net, BOB_IP, start)
        assert punches, "bob did not punch: the test proves nothing"
        assert {d.dst for d in punches} == {(VICTIM_IP, 1000)}
        assert len(punches) <= FAST_PUNCHES
