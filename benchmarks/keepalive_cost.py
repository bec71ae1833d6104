"""Keepalive cost: the coordinator's CPU time per keepalive PING it answers.

``python -m benchmarks.keepalive_cost [--clients 200] [--idle-timeout 2.0] [--window 10]
[--rounds 3]``

One coordinator process and one client process (``spawn``), on 127.0.0.1. The clients connect
with a short idle timeout (the lower of both sides' settings counts), so that their keepalive
PINGs, sent after half of it without traffic, come faster than at the default 10 s; the path
each takes through the coordinator is the same. The defaults (200 clients, 2 s) make 200
keepalives a second, as many as 1000 clients make at the default idle timeout.

Once every client is up and one idle timeout has passed, the coordinator's CPU time
(``time.process_time()``, read inside it) and the number of PINGs it has received are read at
the start and end of each window: the cost per keepalive is their ratio, and ``at 1000
clients`` is that cost at 200 keepalives a second, in % of one core. CPU time, not wall-clock
time; still, other work on the machine raises it (shared caches and cores): compare figures
from the same sitting, run by turns.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import trio

import conec_trio

from ._certs import self_signed_cert
from ._child import from_parent
from ._procs import Link, Processes

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
KEEPALIVES_PER_S_AT_1000 = 1000 / 5.0  # 1000 clients, a PING every 5 s (10 s idle timeout)


def _coord_main(link: Link, cert_pem: bytes, key_pem: bytes) -> None:
    trio.run(_coord_run, link, cert_pem, key_pem)


async def _coord_run(link: Link, cert_pem: bytes, key_pem: bytes) -> None:
    from conec_trio._quic._aioquic import FlowControlledConnection

    pings = 0
    handle_ping = FlowControlledConnection._handle_ping_frame

    def counting(self: Any, context: Any, frame_type: int, buf: Any) -> None:
        nonlocal pings
        pings += 1
        handle_ping(self, context, frame_type, buf)

    FlowControlledConnection._handle_ping_frame = counting  # type: ignore[method-assign]
    config = conec_trio.CoordConfig(cert_chain=cert_pem, private_key=key_pem, host=HOST, port=0)
    async with conec_trio.open_coordinator(config) as coord:
        link.send(coord.address[1])
        while await from_parent(link, 3600) == "read":
            link.send((time.process_time(), pings, coord.num_clients))


def _clients_main(link: Link, cert_pem: bytes, clients: int, idle_timeout: float) -> None:
    port = link.recv(STARTUP_TIMEOUT)
    trio.run(_clients_run, link, cert_pem, port, clients, idle_timeout)


async def _clients_run(
    link: Link, cert_pem: bytes, port: int, clients: int, idle_timeout: float
) -> None:
    release = trio.Event()

    async def hold(k: int, *, task_status: trio.TaskStatus[None]) -> None:
        config = conec_trio.ClientConfig(
            id=f"ka-{k}", coord_host=HOST, coord_port=port, ca=cert_pem, idle_timeout=idle_timeout
        )
        async with conec_trio.open_client(config):
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        for first in range(0, clients, 100):
            async with trio.open_nursery() as openers:
                for k in range(first, min(first + 100, clients)):
                    openers.start_soon(nursery.start, hold, k)
        link.send("up")
        await from_parent(link, 3600)
        release.set()


def measure(clients: int, idle_timeout: float, window: float, rounds: int) -> list[float]:
    """Microseconds of coordinator CPU per keepalive, one figure per window."""
    cert_pem, key_pem = self_signed_cert()
    costs = []
    with Processes() as procs:
        coord = procs.spawn("coordinator", _coord_main, cert_pem, key_pem, side="server")
        client = procs.spawn(
            "clients", _clients_main, cert_pem, clients, idle_timeout, side="client"
        )
        client.send(coord.recv(STARTUP_TIMEOUT))
        print(f"coordinator: process {coord.pid} (for py-spy)", flush=True)
        if client.recv(STARTUP_TIMEOUT + clients * 0.2) != "up":
            raise RuntimeError("clients did not come up")
        time.sleep(idle_timeout)  # past the connect burst, into steady keepalives
        coord.send("read")
        cpu0, pings0, _ = coord.recv(STARTUP_TIMEOUT)
        for _ in range(rounds):
            time.sleep(window)
            coord.send("read")
            cpu1, pings1, count = coord.recv(STARTUP_TIMEOUT)
            if count != clients:
                raise RuntimeError(f"the coordinator counts {count} clients, not {clients}")
            costs.append(1e6 * (cpu1 - cpu0) / max(1, pings1 - pings0))
            print(
                f"{pings1 - pings0} keepalives in {window:g} s "
                f"({(pings1 - pings0) / window:.0f}/s): {costs[-1]:.1f} us of coordinator CPU "
                f"each; at 1000 clients: {costs[-1] * KEEPALIVES_PER_S_AT_1000 / 1e4:.2f}% CPU",
                flush=True,
            )
            cpu0, pings0 = cpu1, pings1
        client.send("stop")
        coord.send("stop")
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.keepalive_cost",
        description="The coordinator's CPU time per keepalive PING it answers.",
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--idle-timeout", type=float, default=2.0, help="seconds")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per reading")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    costs = sorted(measure(args.clients, args.idle_timeout, args.window, args.rounds))
    median = costs[len(costs) // 2]
    print(
        f"median {median:.1f} us per keepalive (min {costs[0]:.1f}, max {costs[-1]:.1f}); "
        f"at 1000 clients: {median * KEEPALIVES_PER_S_AT_1000 / 1e4:.2f}% CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
