"""Time from a coordinator's return to all its clients reconnected (in-process, loopback).

    python benchmarks/reconnect_time.py 10 100

Each run: N clients connect, the coordinator stops (clients see it at once), a new one starts
on the same port, and the clock runs until every client's ``wait_connected`` returned.
"""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack

import trio

import conec_trio
from conec_trio import certs


async def run_coordinator(
    config: conec_trio.CoordConfig,
    stop: trio.Event,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[conec_trio.Coordinator] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with conec_trio.open_coordinator(config) as coord:
        task_status.started(coord)
        await stop.wait()
    stopped.set()


async def measure(n: int) -> float:
    cert, key = certs.self_signed_cert(["localhost", "127.0.0.1"])
    stop_first, stop_second, stopped = trio.Event(), trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        config = conec_trio.CoordConfig(cert, key, host="127.0.0.1", port=0)
        coord = await nursery.start(run_coordinator, config, stop_first, stopped)
        port = coord.address[1]
        async with AsyncExitStack() as stack:
            clients = []
            for i in range(n):
                client_config = conec_trio.ClientConfig(
                    id=f"c{i}", coord_host="127.0.0.1", coord_port=port, ca=cert
                )
                clients.append(
                    await stack.enter_async_context(conec_trio.open_client(client_config))
                )
            stop_first.set()
            with trio.fail_after(30):
                await stopped.wait()
                while any(c.connected for c in clients):  # noqa: ASYNC110 (no event to wait on)
                    await trio.sleep(0.01)
            config = conec_trio.CoordConfig(cert, key, host="127.0.0.1", port=port)
            await nursery.start(run_coordinator, config, stop_second, trio.Event())
            returned = trio.current_time()
            with trio.fail_after(60):
                for c in clients:
                    await c.wait_connected()
            elapsed = trio.current_time() - returned
        stop_second.set()
    return elapsed


def main() -> None:
    for n in [int(a) for a in sys.argv[1:]] or [10, 100]:
        print(f"{n} clients: all reconnected {trio.run(measure, n):.3f} s after the return")


if __name__ == "__main__":
    main()
