"""Heavy loss on the fake network (simulated time): with 30% of datagrams lost each way and
a varying delay, every client still connects within the coordinator's hello timeout, and a
10 MB transfer completes intact, because probe and keepalive back-off is capped: a live path
is never silent for long enough to hit a setup or idle timeout."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest
import trio
import trio.testing

import conec_trio
from conec_trio import certs
from conec_trio.testing import FakeNetwork, open_fake_network

COORD_IP = "192.0.2.1"
COORD_PORT = 1719
LOSS = 0.3
DELAY = (0.01, 0.05)
CLIENTS = 20
TRANSFER = 10 * 1000 * 1000
HELLO_TIMEOUT = {f.name: f.default for f in dataclasses.fields(conec_trio.CoordConfig)}[
    "hello_timeout"
]
PATIENCE = 3600.0  # simulated seconds: the transfer's bound (it costs no wall time)


@pytest.fixture(scope="module")
def identity() -> tuple[bytes, bytes]:
    return certs.self_signed_cert([COORD_IP])


def client_ip(i: int) -> str:
    return f"192.0.2.{10 + i}"


def client_config(cert: bytes, client_id: str) -> conec_trio.ClientConfig:
    return conec_trio.ClientConfig(
        id=client_id, coord_host=COORD_IP, coord_port=COORD_PORT, ca=cert
    )


async def connect_all(
    net: FakeNetwork, cert: bytes, coord: conec_trio.Coordinator, results: dict[str, float]
) -> None:
    """Open ``CLIENTS`` clients at once; each records how long its connect took, then
    stays until all are connected."""
    all_in = trio.Event()

    async def one(i: int) -> None:
        client_id = f"c{i}"
        with net.on_host(client_ip(i)):
            start = trio.current_time()
            async with conec_trio.open_client(client_config(cert, client_id)):
                results[client_id] = trio.current_time() - start
                if len(results) == CLIENTS:
                    all_in.set()
                await all_in.wait()

    async with trio.open_nursery() as nursery:
        for i in range(CLIENTS):
            nursery.start_soon(one, i)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_connects_and_a_transfer_get_through_30_percent_loss(
    seed: int, autojump_clock: trio.testing.MockClock, identity: tuple[bytes, bytes]
) -> None:
    cert, key = identity
    async with open_fake_network(seed=seed, loss=LOSS, delay=DELAY) as net:
        net.add_host(COORD_IP)
        for i in range(CLIENTS):
            net.add_host(client_ip(i))
        config = conec_trio.CoordConfig(cert, key, host=COORD_IP, port=COORD_PORT)
        async with conec_trio.open_coordinator(config) as coord:
            connect_times: dict[str, float] = {}
            await connect_all(net, cert, coord, connect_times)
            assert len(connect_times) == CLIENTS
            assert max(connect_times.values()) < HELLO_TIMEOUT

            # 10 MB from one client to the coordinator.
            with net.on_host(client_ip(0)):
                async with conec_trio.open_client(client_config(cert, "sender")) as sender:
                    start = trio.current_time()
                    sent, got = hashlib.sha256(), hashlib.sha256()
                    received = 0
                    with trio.fail_after(PATIENCE):
                        send, _ = await sender.new_proxied_stream(None)
                        incoming = await coord.incoming_streams.receive()
                        async with trio.open_nursery() as nursery:

                            async def pump() -> None:
                                rng = random.Random(seed)
                                left = TRANSFER
                                while left:
                                    chunk = rng.randbytes(min(left, 64 * 1024))
                                    sent.update(chunk)
                                    await send.send(chunk)
                                    left -= len(chunk)
                                await send.aclose()

                            nursery.start_soon(pump)
                            async for message in incoming.recv:
                                got.update(message)
                                received += len(message)
                    took = trio.current_time() - start
    assert received == TRANSFER
    assert got.hexdigest() == sent.hexdigest()
    print(
        f"seed {seed}: slowest of {CLIENTS} connects {max(connect_times.values()):.2f} s, "
        f"10 MB in {took:.1f} s (simulated)"
    )
