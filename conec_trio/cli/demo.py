"""``conec-trio demo``: a coordinator and three clients on loopback, showing every kind of
stream and how fast it goes, in a few seconds."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from .. import (
    CborReceiveChannel,
    CborSendChannel,
    Client,
    ClientConfig,
    CoordConfig,
    Coordinator,
    Lagged,
    open_client,
    open_coordinator,
    open_nonblocking,
)
from ..certs import self_signed_cert
from ..forward.console import error, format_address, setup_logging, show
from .common import LOOPBACK_NAMES

__all__ = ["DemoError", "add_demo_command", "run_demo"]


def add_demo_command(subparsers: Any) -> None:
    """Register ``conec-trio demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="show conec at work on loopback, in a few seconds",
        description="Start a coordinator with a throwaway certificate and three clients "
        "(alice, bob, carol) on 127.0.0.1, exchange messages over every kind of stream, and "
        "print what happened and how fast. Exits with status 0 when every step worked, 1 "
        "otherwise.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller transfers (about a second)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser.set_defaults(run=run_demo)


class DemoError(Exception):
    """A demo step failed; the message says which and why."""


def run_demo(args: argparse.Namespace) -> int:
    """``conec-trio demo``: returns the exit status."""
    setup_logging(args.verbose)
    try:
        trio.run(_demo, args.quick)
    except DemoError as exc:
        return error(f"demo failed: {exc}")
    return 0


def _describe(exc: BaseException) -> str:
    """One line about ``exc``; for an exception group, about its first real leaf."""
    while isinstance(getattr(exc, "exceptions", None), tuple):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]  # type: ignore[attr-defined]
        if not leaves:
            break
        exc = leaves[0]
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Progress:
    """The step the demo is at, for the message when something fails outside a step."""

    def __init__(self) -> None:
        self.step = "starting"


@contextmanager
def _step(progress: _Progress, name: str, seconds: float) -> Iterator[None]:
    """Run one demo step with a deadline; any failure becomes a DemoError naming the step."""
    progress.step = name
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise DemoError(f"{name}: no result within {seconds:g} s") from None
    except DemoError as exc:
        raise DemoError(f"{name}: {exc}") from None
    except Exception as exc:
        raise DemoError(f"{name}: {_describe(exc)}") from exc


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoError(message)


def _line(label: str, text: str) -> None:
    show(f"  {label:<15} {text}")


class _Tap(trio.abc.ReceiveChannel[bytes]):
    """Passes a stream's messages through and says when the stream has ended.

    The demo's slow reader starts reading only once every message has arrived, so exactly
    how many the non-blocking buffer dropped is known in advance.
    """

    def __init__(self, inner: trio.abc.ReceiveChannel[bytes]) -> None:
        self._inner = inner
        self.ended = trio.Event()

    async def receive(self) -> bytes:
        try:
            return await self._inner.receive()
        except trio.EndOfChannel:
            self.ended.set()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _demo(quick: bool) -> None:
    progress = _Progress()
    total = 30.0 if quick else 60.0
    try:
        with trio.fail_after(total):
            await _demo_steps(quick, progress)
    except DemoError:
        raise
    except trio.TooSlowError:
        raise DemoError(f"{progress.step}: the demo did not finish within {total:g} s") from None
    except Exception as exc:
        raise DemoError(f"{progress.step}: {_describe(exc)}") from exc


async def _demo_steps(quick: bool, progress: _Progress) -> None:
    # Transfers stop at a size or after a time budget, whichever comes first, so that the
    # demo takes a few seconds on slow machines too.
    bulk_bytes = (4 if quick else 20) * 1_000_000
    small_count = 2_000 if quick else 20_000
    budget = 0.5 if quick else 2.0
    started = trio.current_time()

    show("conec-trio demo: a coordinator and three clients on 127.0.0.1 (throwaway certificate)")
    cert, key = self_signed_cert(list(LOOPBACK_NAMES))
    progress.step = "starting the coordinator"
    coord_config = CoordConfig(cert_chain=cert, private_key=key, host="127.0.0.1", port=0)
    async with open_coordinator(coord_config) as coord:
        _line("coordinator", f"listening on {format_address(*coord.address)}")

        def config(client_id: str) -> ClientConfig:
            return ClientConfig(
                id=client_id, coord_host="127.0.0.1", coord_port=coord.address[1], ca=cert
            )

        # open_client gives up after its connect_timeout (10 s) if the coordinator is silent.
        progress.step = "connecting clients"
        async with (
            open_client(config("alice")) as alice,
            open_client(config("bob")) as bob,
            open_client(config("carol")) as carol,
        ):
            _check(coord.num_clients == 3, f"coord.num_clients is {coord.num_clients}, not 3")
            _line(
                "clients",
                f"alice, bob, carol connected (coord.num_clients = {coord.num_clients})",
            )
            with _step(progress, "proxied stream", 5):
                await _proxied_exchange(alice, bob)
            with _step(progress, "stream to the coordinator", 5):
                await _coordinator_exchange(alice, coord)
            with _step(progress, "loopback stream", 5):
                await _loopback_exchange(alice)
            with _step(progress, "bulk transfer", budget + 10):
                await _bulk(alice, bob, bulk_bytes, budget)
            with _step(progress, "direct channel", budget + 15):
                await _direct(alice, carol, bulk_bytes, budget)
            with _step(progress, "small messages", budget + 10):
                await _small_messages(alice, bob, small_count, budget)
            with _step(progress, "non-blocking reader", 5):
                await _nonblocking(alice, bob)
            with _step(progress, "CBOR", 5):
                await _cbor(alice, bob)
            with _step(progress, "broadcast", 5):
                await _broadcast({"alice": alice, "bob": bob, "carol": carol}, coord)
            progress.step = "shutting down"
    show("paths:")
    for pair, path in _PATHS.items():
        _line(pair, path)
    show(f"demo finished in {trio.current_time() - started:.1f} s")


# The path each pair of peers used, in the order the demo used them (shown at the end).
_PATHS: dict[str, str] = {}


class _DirectAddresses(logging.Handler):
    """The address each direct channel opened to, as the library logs it ("direct channel
    to PEER open via ADDRESS"): the public API has no query for it yet."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addresses: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "direct channel to %r open via %s" and isinstance(record.args, tuple):
            peer, address = record.args
            if isinstance(address, tuple) and len(address) >= 2:
                self.addresses[str(peer)] = format_address(str(address[0]), int(address[1]))


async def _accept(client: Client, expected_peer: str) -> tuple[Any, Any]:
    incoming = await client.incoming_streams.receive()
    _check(
        incoming.peer == expected_peer,
        f"{client.id} got a stream from {incoming.peer!r}, expected {expected_peer!r}",
    )
    return incoming.send, incoming.recv


async def _proxied_exchange(alice: Client, bob: Client) -> None:
    _PATHS["alice -> bob"] = "relayed by the coordinator (proxied streams)"
    t0 = trio.current_time()
    send, recv = await alice.new_proxied_stream("bob")
    await send.send(b"hello bob")
    bob_send, bob_recv = await _accept(bob, "alice")
    got = await bob_recv.receive()
    await bob_send.send(b"hi alice")
    reply = await recv.receive()
    elapsed = trio.current_time() - t0
    _check(got == b"hello bob" and reply == b"hi alice", f"got {got!r} and {reply!r}")
    for channel in (send, recv, bob_send, bob_recv):
        await channel.aclose()
    _line(
        "proxied",
        f"alice -> bob {got!r}, reply {reply!r} ({send.stream_id!r}, "
        f"open + round trip {elapsed * 1000:.1f} ms)",
    )


async def _coordinator_exchange(alice: Client, coord: Coordinator) -> None:
    _PATHS["alice -> coordinator"] = "alice's connection to the coordinator"
    send, recv = await alice.new_proxied_stream(None)
    await send.send(b"ping")
    incoming = await coord.incoming_streams.receive()
    _check(incoming.peer == "alice", f"the coordinator saw peer {incoming.peer!r}")
    got = await incoming.recv.receive()
    await incoming.send.send(b"pong")
    reply = await recv.receive()
    _check(got == b"ping" and reply == b"pong", f"got {got!r} and {reply!r}")
    for channel in (send, recv, incoming.send, incoming.recv):
        await channel.aclose()
    _line(
        "to coordinator",
        f"alice -> coordinator {got!r}, reply {reply!r} (alice's end has peer None)",
    )


async def _loopback_exchange(alice: Client) -> None:
    _PATHS["alice -> alice"] = "relayed by the coordinator (a stream to itself)"
    send, recv = await alice.new_proxied_stream("alice")
    await send.send(b"note to self")
    in_send, in_recv = await _accept(alice, "alice")
    got = await in_recv.receive()
    await in_send.send(b"noted")
    reply = await recv.receive()
    _check(got == b"note to self" and reply == b"noted", f"got {got!r} and {reply!r}")
    for channel in (send, recv, in_send, in_recv):
        await channel.aclose()
    _line("loopback", f"alice -> alice {got!r}, reply {reply!r}")


async def _transfer(
    alice: Client, bob: Client, size: int, max_count: int, budget: float, direct: bool = False
) -> tuple[int, float]:
    """alice sends ``size``-byte messages to bob through the coordinator, ``max_count`` of
    them or as many as fit in ``budget`` seconds, then ends the stream; bob counts them and
    answers with the count once the stream ended.

    Returns ``(messages, seconds)``: from alice's first send to her receipt of bob's answer.
    """
    payload = bytes(size)
    if direct:
        send, recv = await alice.new_direct_stream(bob.id)
    else:
        send, recv = await alice.new_proxied_stream(bob.id)
    bob_channels: list[Any] = []
    received = 0

    async def receiver() -> None:
        nonlocal received
        bob_send, bob_recv = await _accept(bob, alice.id)
        bob_channels.extend((bob_send, bob_recv))
        async for message in bob_recv:
            if len(message) == size:
                received += 1
        await bob_send.send(received.to_bytes(8, "big"))

    sent = 0
    t0 = trio.current_time()
    deadline = t0 + budget
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        while sent < max_count and (sent == 0 or trio.current_time() < deadline):
            await send.send(payload)
            sent += 1
        await send.aclose()
        ack = await recv.receive()
    elapsed = trio.current_time() - t0
    _check(int.from_bytes(ack, "big") == sent, f"alice sent {sent} messages, bob got {received}")
    for channel in (recv, *bob_channels):
        await channel.aclose()
    return sent, elapsed


async def _bulk(alice: Client, bob: Client, max_bytes: int, budget: float) -> None:
    chunk = 64 * 1024
    count, elapsed = await _transfer(alice, bob, chunk, math.ceil(max_bytes / chunk), budget)
    total = count * chunk
    _line(
        "bulk",
        f"{total / 1e6:.1f} MB alice -> bob in {chunk // 1024} KiB messages: "
        f"{elapsed:.2f} s, {total / 1e6 / elapsed:.1f} MB/s",
    )


async def _direct(alice: Client, carol: Client, max_bytes: int, budget: float) -> None:
    t0 = trio.current_time()
    watcher = _DirectAddresses()
    direct_log = logging.getLogger("conec_trio.direct")
    level, propagate = direct_log.level, direct_log.propagate
    direct_log.addHandler(watcher)
    if not direct_log.isEnabledFor(logging.INFO):  # raised for the watcher only
        direct_log.setLevel(logging.INFO)
        direct_log.propagate = False
    try:
        await alice.new_channel(carol.id)
    finally:
        direct_log.removeHandler(watcher)
        direct_log.setLevel(level)
        direct_log.propagate = propagate
    opened = trio.current_time() - t0
    where = watcher.addresses.get(carol.id)
    _PATHS["alice -> carol"] = "direct" + (f", to {where}" if where else "")
    chunk = 64 * 1024
    count, elapsed = await _transfer(
        alice, carol, chunk, math.ceil(max_bytes / chunk), budget, direct=True
    )
    await alice.close_channel(carol.id)
    total = count * chunk
    _line(
        "direct",
        f"channel alice <-> carol opened in {opened * 1000:.1f} ms (pinned certificates); "
        f"{total / 1e6:.1f} MB over a direct stream: {elapsed:.2f} s, "
        f"{total / 1e6 / elapsed:.1f} MB/s",
    )


async def _small_messages(alice: Client, bob: Client, max_count: int, budget: float) -> None:
    count, elapsed = await _transfer(alice, bob, 64, max_count, budget)
    _line(
        "small messages",
        f"{count:,} x 64 B alice -> bob: {elapsed:.2f} s, {count / elapsed:,.0f} msgs/s",
    )


async def _nonblocking(alice: Client, bob: Client) -> None:
    sent, capacity = 1_000, 10
    send, recv = await alice.new_proxied_stream("bob")
    bob_send, bob_recv = await _accept(bob, "alice")
    tap = _Tap(bob_recv)
    async with open_nonblocking(tap, capacity) as nb:
        # Nothing holds alice back: bob's buffer drops the oldest messages instead.
        for i in range(sent):
            await send.send(i.to_bytes(4, "big"))
        await send.aclose()
        await tap.ended.wait()  # bob is a slow reader: he starts after everything arrived
        lagged = 0
        try:
            await nb.receive()
        except Lagged as exc:
            lagged = exc.count
        kept = [int.from_bytes(message, "big") async for message in nb]
    expected = list(range(sent - capacity, sent))
    _check(lagged == sent - capacity, f"Lagged.count was {lagged}, expected {sent - capacity}")
    _check(kept == expected, f"bob kept messages {kept}, expected {expected}")
    await recv.aclose()
    await bob_send.aclose()
    _line(
        "non-blocking",
        f"alice sent {sent:,}; bob's reader (capacity {capacity}) got "
        f"Lagged(count={lagged}), then #{kept[0]}..#{kept[-1]}",
    )


async def _cbor(alice: Client, bob: Client) -> None:
    value = {"n": 42, "tags": ["quic", "trio"], "raw": b"\x00\xff"}
    send, recv = await alice.new_proxied_stream("bob")
    bob_send, bob_recv = await _accept(bob, "alice")
    await CborSendChannel(send).send(value)
    got = await CborReceiveChannel(bob_recv).receive()
    await CborSendChannel(bob_send).send(got)
    back = await CborReceiveChannel(recv).receive()
    _check(got == value and back == value, f"sent {value!r}, bob got {got!r}, back {back!r}")
    for channel in (send, recv, bob_send, bob_recv):
        await channel.aclose()
    _line("CBOR", f"{value!r} alice -> bob -> alice, unchanged")


async def _broadcast(clients: dict[str, Client], coord: Coordinator) -> None:
    name = "demo-room"
    members = {}
    for client_id, client in clients.items():
        members[client_id] = await client.new_broadcast(name)
    counts = await clients["alice"].broadcast_count(name)
    _check(counts == (3, 3), f"broadcast_count({name!r}) is {counts}, not (3, 3)")
    received: dict[str, list[tuple[str, bytes]]] = {client_id: [] for client_id in clients}

    async def member(client_id: str) -> None:
        send, recv = members[client_id]
        await send.send(f"hello from {client_id}".encode())
        for _ in range(len(clients)):
            message = await recv.receive()
            received[client_id].append((message.sender, message.data))

    async with trio.open_nursery() as nursery:
        for client_id in clients:
            nursery.start_soon(member, client_id)
    senders = sorted(clients)
    for client_id, messages in received.items():
        got = sorted(sender for sender, _ in messages)
        _check(got == senders, f"{client_id} got broadcasts from {got}, expected {senders}")
        for sender, data in messages:
            _check(data == f"hello from {sender}".encode(), f"{client_id} got {data!r}")
    num_broadcasts = coord.num_broadcasts
    for send, recv in members.values():
        await send.aclose()
        await recv.aclose()
    _line(
        "broadcast",
        f"{name!r}: each client sent 1, received 3; broadcast_count = {counts}, "
        f"coord.num_broadcasts = {num_broadcasts}",
    )
