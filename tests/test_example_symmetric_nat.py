"""An example of what conec_trio.testing is for: a user's own code, tested against NATs and
a lossy link, deterministically and in simulated time. Only public names are used here.

The user's code is a small echo service. The question: does it still work for a peer behind
a symmetric NAT, where no direct channel can be punched through, so that every stream has
to go through the coordinator?
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing

import conec_trio
from conec_trio import certs
from conec_trio.testing import FakeNetwork, open_fake_network

COORD_IP, COORD_PORT = "192.0.2.1", 1719
HOME_NAT, ALICE_IP = "198.51.100.1", "10.0.1.2"  # alice: behind a cone NAT
MOBILE_NAT, BOB_IP = "203.0.113.1", "10.0.2.2"  # bob: behind a symmetric NAT (a phone network)


# --- the user's code under test ---------------------------------------------------------------


async def serve_echo(client: conec_trio.Client) -> None:
    """Answer every message on every stream opened to ``client`` with the same message."""

    async def echo(incoming: conec_trio.IncomingStream) -> None:
        async with incoming.send:
            async for message in incoming.recv:
                await incoming.send.send(message)

    async with trio.open_nursery() as nursery:
        async for incoming in client.incoming_streams:
            nursery.start_soon(echo, incoming)


async def ask(client: conec_trio.Client, peer: str, questions: list[bytes]) -> list[bytes]:
    """Send ``questions`` to ``peer`` on one stream and collect its answers."""
    send, recv = await client.new_stream(peer)
    answers = []
    async with send, recv:
        for question in questions:
            await send.send(question)
            answers.append(await recv.receive())
    return answers


# --- the test ------------------------------------------------------------------------------------


@asynccontextmanager
async def alice_and_bob(net: FakeNetwork) -> AsyncIterator[tuple[conec_trio.Client, ...]]:
    """A coordinator on the public side, alice behind a cone NAT, bob behind a symmetric one."""
    net.add_host(COORD_IP)
    net.add_host(ALICE_IP, behind=net.add_nat(HOME_NAT, kind="cone"))
    net.add_host(BOB_IP, behind=net.add_nat(MOBILE_NAT, kind="symmetric"))
    cert, key = certs.self_signed_cert([COORD_IP])
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            conec_trio.open_coordinator(
                conec_trio.CoordConfig(cert, key, host=COORD_IP, port=COORD_PORT)
            )
        )
        clients = []
        for name, ip in (("alice", ALICE_IP), ("bob", BOB_IP)):
            config = conec_trio.ClientConfig(
                id=name, coord_host=COORD_IP, coord_port=COORD_PORT, ca=cert
            )
            with net.on_host(ip):
                clients.append(await stack.enter_async_context(conec_trio.open_client(config)))
        yield tuple(clients)


@pytest.mark.parametrize("seed", [1, 2])
async def test_echo_service_works_for_a_peer_behind_a_symmetric_nat(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    questions = [b"question %d " % i * (1 + i * 37 % 200) for i in range(30)]
    async with (
        open_fake_network(seed, loss=0.02, delay=(0.010, 0.040), reorder=0.02) as net,
        alice_and_bob(net) as (alice, bob),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(serve_echo, bob)
        # Simulated seconds: the direct channel's attempt runs out its timeout in no time.
        with trio.fail_after(60):
            assert await ask(alice, "bob", questions) == questions
            assert await ask(alice, "bob", [b"once more"]) == [b"once more"]
        nursery.cancel_scope.cancel()

    # Everything went through the coordinator: no datagram of one peer reached the other.
    assert net.host(BOB_IP).received_from[HOME_NAT] == 0
    assert net.host(ALICE_IP).received_from[MOBILE_NAT] == 0
    assert net.host(COORD_IP).stats["received"] > 0
    assert net.dropped["lost"] > 0  # and the link did lose some of them
