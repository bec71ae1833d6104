"""Helpers shared by the tests (fixtures live in conftest.py).

``wait_for`` waits for a condition with a deadline and says which one timed out;
``wait_until_stalled`` waits until every party of a loopback test is stuck;
``coordinator_echo`` is a stream to the coordinator that echoes each message.
"""

from __future__ import annotations

import ast
import linecache
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio
import trio.testing

import conec_trio

# ``open_client(coord, "alice", **overrides)`` of conftest.py: an async context manager.
ClientFactory = Callable[..., AbstractAsyncContextManager[conec_trio.Client]]

# How long every task must have been blocked, with nothing arriving and no timer due, before
# wait_until_stalled believes it. A transfer that is still moving always has a timer due
# within this: the delayed ACK (25 ms), or a loss probe, which on loopback starts at a few
# tens of milliseconds.
STALL_CUSHION = 0.25


def describe(predicate: Callable[[], object]) -> str:
    """What ``predicate`` checks, for a failure message: a lambda's own source text (told
    apart from other lambdas on its line by the positions of its code), else its name."""
    name = getattr(predicate, "__qualname__", None) or repr(predicate)
    code = getattr(predicate, "__code__", None)
    if code is None or not name.endswith("<lambda>"):
        return name
    source = "".join(linecache.getlines(code.co_filename))
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return name
    spans = [
        (line, column, end_line, end_column)
        for line, end_line, column, end_column in code.co_positions()
        # RESUME and the implicit return: column 0 and no width, not inside the lambda
        if None not in (line, end_line, column, end_column)
        and (line, column) != (end_line, end_column)
    ]

    def contains(node: ast.Lambda) -> bool:
        start = (node.lineno, node.col_offset)
        end = (node.end_lineno or node.lineno, node.end_col_offset or 0)
        return all(start <= (a, b) and (c, d) <= end for a, b, c, d in spans)

    lambdas = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Lambda) and node.lineno == code.co_firstlineno and contains(node)
    ]
    if not lambdas:
        return name
    # A lambda inside another one's body lies within it too: take the inner one.
    innermost = max(lambdas, key=lambda node: (node.lineno, node.col_offset))
    text = ast.get_source_segment(source, innermost.body)
    return " ".join(text.split()) if text else name


async def wait_for(
    predicate: Callable[[], object], timeout: float = 5.0, *, what: str | None = None
) -> None:
    """Wait until ``predicate()`` is true, checking every few milliseconds, for at most
    ``timeout`` seconds of trio's clock.

    For conditions that change without an event to wait on (counters in another task). At
    the deadline it raises ``trio.TooSlowError`` naming the condition (``what``, or the
    predicate's source) and the deadline.
    """
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return
    if predicate():  # it came true at the very deadline
        return
    condition = what if what is not None else describe(predicate)
    raise trio.TooSlowError(
        f"waited {timeout:g} s (until t={start + timeout:.3f} on trio's clock) "
        f"for {condition}: still false"
    )


async def wait_until_stalled(cushion: float = STALL_CUSHION) -> None:
    """Return once every other task has been blocked for ``cushion`` seconds of real time,
    with no datagram arriving and no timer coming due meanwhile.

    In a test where the coordinator and every client run in this process on loopback, that
    is a stall: nothing can move until a timer far off (a keepalive, an idle timeout) fires.
    Unlike watching a counter for a while, a sender starved of CPU does not look stalled:
    it is runnable. The caller bounds the wait (``trio.fail_after``), since a transfer that
    never stops never lets it return.
    """
    await trio.testing.wait_all_tasks_blocked(cushion)


@asynccontextmanager
async def coordinator_echo(
    client: conec_trio.Client, coord: conec_trio.Coordinator
) -> AsyncIterator[tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[bytes]]]:
    """A stream from ``client`` to ``coord`` whose coordinator end echoes every message."""
    send, recv = await client.new_proxied_stream(None)
    await send.send(b"hello")
    incoming = await coord.incoming_streams.receive()
    assert await incoming.recv.receive() == b"hello"

    async def echo() -> None:
        async for message in incoming.recv:
            await incoming.send.send(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        yield send, recv
        nursery.cancel_scope.cancel()
