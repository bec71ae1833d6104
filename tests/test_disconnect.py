"""Calls waiting on the coordinator when its connection is lost fail with DisconnectedError
(a ConecError, as the contract promises), never with trio's EndOfChannel."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

import conec_trio

CALLS: dict[str, Callable[[conec_trio.Client], Any]] = {
    "new_channel": lambda alice: alice.new_channel("bob"),
    "broadcast_count": lambda alice: alice.broadcast_count("news"),
    "new_stream": lambda alice: alice.new_stream("bob"),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_a_call_pending_when_the_coordinator_goes_fails_with_disconnected_error(
    call: str,
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The coordinator takes every control request and never answers it, so the call is
    # surely waiting when the coordinator goes away.
    taken = trio.Event()

    async def never_answer(*args: object) -> None:
        taken.set()
        await trio.sleep_forever()

    monkeypatch.setattr(conec_trio._coordinator.Coordinator, "_control_message", never_answer)
    stop, stopped = trio.Event(), trio.Event()

    async def run_coordinator(*, task_status: trio.TaskStatus[conec_trio.Coordinator]) -> None:
        async with conec_trio.open_coordinator(coord_config()) as coord:
            task_status.started(coord)
            await stop.wait()
        stopped.set()

    raised: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        coord = await nursery.start(run_coordinator)
        async with AsyncExitStack() as clients:
            alice = await clients.enter_async_context(
                conec_trio.open_client(client_config(coord, "alice"))
            )
            await clients.enter_async_context(conec_trio.open_client(client_config(coord, "bob")))

            async def make_call() -> None:
                try:
                    await CALLS[call](alice)
                except BaseException as exc:
                    raised.append(exc)

            with trio.fail_after(5):
                async with trio.open_nursery() as calls:
                    calls.start_soon(make_call)
                    await taken.wait()
                    stop.set()  # the coordinator leaves, closing every client's connection
                    await stopped.wait()
    assert len(raised) == 1
    assert isinstance(raised[0], conec_trio.DisconnectedError), repr(raised[0])
    assert "alice" in str(raised[0])
