"""Calls waiting on the coordinator when its connection is lost: with reconnecting off they
fail with DisconnectedError (a ConecError, as the contract promises), never with trio's
EndOfChannel; with it on (the default) they are asked again once the client is back."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from helpers import wait_for

import conec_trio

CALLS: dict[str, Callable[[conec_trio.Client], Any]] = {
    "new_channel": lambda alice: alice.new_channel("bob"),
    "broadcast_count": lambda alice: alice.broadcast_count("news"),
    "new_stream": lambda alice: alice.new_stream("bob"),
}


async def call_across_a_restart(
    call: str,
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
    monkeypatch: pytest.MonkeyPatch,
    reconnect: bool,
) -> Any:
    """Make ``call`` while the coordinator sits on every control request, then stop it
    (with ``reconnect``, start another on the same port, which answers once both clients
    are back). Returns what the call returned or raised."""
    taken = trio.Event()
    answering = False
    control_message = conec_trio._coordinator.Coordinator._control_message

    async def answer_only_later(coord: conec_trio.Coordinator, *args: Any) -> None:
        if not answering:
            taken.set()
            await trio.sleep_forever()
        while coord.num_clients < 2:  # bob may come back after alice
            await trio.sleep(0.01)
        await control_message(coord, *args)

    monkeypatch.setattr(conec_trio._coordinator.Coordinator, "_control_message", answer_only_later)

    async def run_coordinator(
        port: int, stop: trio.Event, *, task_status: trio.TaskStatus[conec_trio.Coordinator]
    ) -> None:
        async with conec_trio.open_coordinator(coord_config(port=port)) as coord:
            task_status.started(coord)
            await stop.wait()

    outcome: list[Any] = []
    stop_first, stop_second = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        coord = await nursery.start(run_coordinator, 0, stop_first)
        port = coord.address[1]
        async with AsyncExitStack() as clients:
            alice, _ = [
                await clients.enter_async_context(
                    conec_trio.open_client(client_config(coord, name, reconnect=reconnect))
                )
                for name in ("alice", "bob")
            ]

            async def make_call() -> None:
                try:
                    outcome.append(await CALLS[call](alice))
                except Exception as exc:
                    outcome.append(exc)

            with trio.fail_after(10):
                async with trio.open_nursery() as calls:
                    calls.start_soon(make_call)
                    await taken.wait()
                    stop_first.set()  # the coordinator leaves, closing every connection
                    await wait_for(lambda: not alice.connected)
                    answering = True
                    if reconnect:
                        # The same port: the clients find the new coordinator by themselves.
                        await nursery.start(run_coordinator, port, stop_second)
        stop_second.set()
    assert len(outcome) == 1
    return outcome[0]


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_row13_a_call_pending_when_the_coordinator_goes_fails_with_disconnected_error(
    call: str,
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raised = await call_across_a_restart(
        call, coord_config, client_config, monkeypatch, reconnect=False
    )
    assert isinstance(raised, conec_trio.DisconnectedError), repr(raised)
    assert "alice" in str(raised)


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_a_call_pending_when_the_coordinator_goes_completes_after_it_returns(
    call: str,
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = await call_across_a_restart(
        call, coord_config, client_config, monkeypatch, reconnect=True
    )
    if call == "broadcast_count":
        # The new coordinator answered: it has no such channel (nobody joined it there).
        assert isinstance(result, conec_trio.BroadcastNotFoundError), repr(result)
    elif call == "new_stream":
        send, _ = result
        assert send.stream_id.is_direct  # the channel came from the new coordinator
    else:
        assert result is None, repr(result)
