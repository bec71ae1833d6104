"""ACKs ride on answers: request/response traffic costs one datagram per message each way.

On the fake network (1 ms each way, simulated time), a client sends a 64-byte message and
waits for the echo, 50 times: through the coordinator (relayed), and to the coordinator
itself. aioquic acknowledges 1 ms after a packet arrives, so each hop used to send an
ACK-only datagram beside the answer; the ACK now waits for the answer and rides on it. When
the answer is late, the ACK still leaves within the 25 ms ``max_ack_delay`` every endpoint
announces, so the sender never retransmits a message that arrived.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

import conec_trio
from conec_trio import certs
from conec_trio.testing import FakeNetwork, open_fake_network

COORD_IP, A_IP, B_IP = "192.0.2.1", "192.0.2.10", "192.0.2.11"
COORD = (COORD_IP, 1719)
ONE_WAY = 0.001
ROUND_TRIPS = 50
MESSAGE = b"m" * 64
# An ACK-only 1-RTT datagram is about 40 bytes; one carrying a 64-byte message is over 90.
SMALL = 70
MAX_ACK_DELAY = 0.025  # aioquic's transport parameter default, which conec_trio keeps


@pytest.fixture(scope="module")
def identity() -> tuple[bytes, bytes]:
    return certs.self_signed_cert([COORD_IP])


def _config(cert: bytes, client_id: str) -> conec_trio.ClientConfig:
    return conec_trio.ClientConfig(id=client_id, coord_host=COORD_IP, coord_port=1719, ca=cert)


def _between(net: FakeNetwork, since: int, ip: str) -> list[tuple[float, bool, bool]]:
    """(sent at, from the coordinator, small) for every datagram between ``ip`` and the
    coordinator sent since log position ``since``."""
    out = []
    for d in net.sent_log[since:]:
        if d.src[0] == ip and d.dst == COORD:
            out.append((d.sent_at, False, len(d.data) < SMALL))
        elif d.sender == COORD and d.dst[0] == ip:
            out.append((d.sent_at, True, len(d.data) < SMALL))
    return out


async def _echo_stream(recv: trio.abc.ReceiveChannel[bytes], send: trio.abc.SendChannel[bytes],
                       delay: float) -> None:  # fmt: skip
    async for msg in recv:
        await trio.sleep(delay)
        await send.send(msg)


async def _ping_pong(
    send: trio.abc.SendChannel[bytes], recv: trio.abc.ReceiveChannel[bytes], trips: int
) -> None:
    for _ in range(trips):
        await send.send(MESSAGE)
        assert await recv.receive() == MESSAGE


async def _proxied_exchange(
    identity: tuple[bytes, bytes], answer_delay: float, trips: int
) -> tuple[FakeNetwork, int]:
    """a ping-pongs with b through the coordinator; returns the network and the log
    position where the measured exchange began (after one warm-up round trip)."""
    cert, key = identity
    async with open_fake_network(delay=(ONE_WAY, ONE_WAY)) as net:
        for ip in (COORD_IP, A_IP, B_IP):
            net.add_host(ip)
        config = conec_trio.CoordConfig(cert, key, host=COORD_IP, port=1719)
        async with conec_trio.open_coordinator(config), contextlib.AsyncExitStack() as stack:
            with net.on_host(B_IP):
                b = await stack.enter_async_context(conec_trio.open_client(_config(cert, "b")))
            async with trio.open_nursery() as nursery:

                async def serve() -> None:
                    async for inc in b.incoming_streams:
                        nursery.start_soon(_echo_stream, inc.recv, inc.send, answer_delay)

                nursery.start_soon(serve)
                with net.on_host(A_IP):
                    async with conec_trio.open_client(_config(cert, "a")) as a:
                        send, recv = await a.new_proxied_stream("b")
                        await _ping_pong(send, recv, 1)
                        start = len(net.sent_log)
                        await _ping_pong(send, recv, trips)
                        await send.aclose()
                nursery.cancel_scope.cancel()
    return net, start


async def test_relayed_request_response_sends_no_ack_only_datagrams(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    net, start = await _proxied_exchange(identity, 0.0, ROUND_TRIPS)
    for ip in (A_IP, B_IP):
        log = _between(net, start, ip)
        # one message each way per round trip, and nothing else: the ACKs rode along
        from_coord = [small for _, coord, small in log if coord]
        to_coord = [small for _, coord, small in log if not coord]
        assert from_coord.count(False) >= ROUND_TRIPS, ip
        assert to_coord.count(False) >= ROUND_TRIPS, ip
        # the close at the end may add a few; 2 per round trip came before
        assert from_coord.count(True) <= 2, (ip, from_coord.count(True))
        assert to_coord.count(True) <= 2, (ip, to_coord.count(True))


async def test_a_late_answer_does_not_hold_the_ack_past_max_ack_delay(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    trips = 10
    net, start = await _proxied_exchange(identity, 0.2, trips)
    log = _between(net, start, A_IP)
    sent = [t for t, coord, small in log if not coord and not small]
    # nothing a sent was retransmitted: every message left once (and its close)
    assert trips <= len(sent) <= trips + 1
    for t in sent[:trips]:
        answers = [u for u, coord, _ in log if coord and u > t]
        assert answers, t
        # the coordinator's first datagram back (its ACK) within max_ack_delay of arrival
        assert answers[0] - (t + ONE_WAY) <= MAX_ACK_DELAY


async def test_request_response_to_the_coordinator_sends_no_ack_only_datagrams(
    autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    cert, key = identity
    async with open_fake_network(delay=(ONE_WAY, ONE_WAY)) as net:
        for ip in (COORD_IP, A_IP):
            net.add_host(ip)
        config = conec_trio.CoordConfig(cert, key, host=COORD_IP, port=1719)
        async with conec_trio.open_coordinator(config) as coord, trio.open_nursery() as nursery:

            async def serve() -> None:
                async for inc in coord.incoming_streams:
                    nursery.start_soon(_echo_stream, inc.recv, inc.send, 0.0)

            nursery.start_soon(serve)
            with net.on_host(A_IP):
                async with conec_trio.open_client(_config(cert, "a")) as a:
                    send, recv = await a.new_proxied_stream(None)
                    await _ping_pong(send, recv, 1)
                    start = len(net.sent_log)
                    await _ping_pong(send, recv, ROUND_TRIPS)
                    await send.aclose()
            nursery.cancel_scope.cancel()
    log = _between(net, start, A_IP)
    assert [small for _, coord, small in log if coord].count(True) <= 2
    assert [small for _, coord, small in log if not coord].count(True) <= 2
