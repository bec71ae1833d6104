"""conec_trio subjects: the same measurements as ``baseline_aioquic``, through the library.

Each function is called in the harness process, like its baseline, and starts its own peers as
separate processes (``benchmarks._procs.Processes``: ``spawn`` start method, a pipe per child,
timeouts on every wait, children always stopped) so that no two peers share an interpreter
lock. Everything runs on 127.0.0.1 with port 0: the coordinator process sends its bound port
to the parent, which hands it to the clients. The clients connect (and open their channels
and streams) first, report "ready", and only start the clock when the parent says "go",
exactly where the baseline starts it.

Each returns one float in the unit of its case (see ``cases.py``). Raising
``NotImplementedError`` or ``ImportError`` makes the harness print "subject not available".

Processes, per measurement:

* ``trio_endpoint_bulk``: coordinator + client A (A's stream goes to the coordinator itself,
  ``new_proxied_stream(None)``, read from ``coord.incoming_streams``: one hop through our Trio
  QUIC endpoint and message-stream layer, nothing relayed).
* ``pingpong_coordinator``: coordinator + client A (the coordinator echoes A's stream).
* ``proxied_bulk``, ``direct_bulk``, ``pingpong_proxied``, ``pingpong_direct``,
  ``oneway_small_proxied``, ``oneway_small_direct``: coordinator + A + B.
* ``channel_open``: coordinator + A + B (A opens and closes direct channels to B).
* ``open_client``, ``connect_many``: coordinator + one client process.
* ``broadcast_fanout``: coordinator + sender + one or two receiver processes holding several
  receiving clients each (the machine may have two cores only).
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

import conec_trio

from ._certs import self_signed_cert
from ._child import from_parent, usage
from ._procs import Child, Link, Processes, Side

HOST = "127.0.0.1"
CHUNK = 64 * 1024  # bulk message size
SMALL_MESSAGE = 64  # pingpong / oneway_small message size
REPLY = b"\x01"  # the one-message answer to an end of stream

STARTUP_TIMEOUT = 60.0  # spawning a process, importing, connecting
STOP_TIMEOUT = 15.0  # a child reporting and leaving after "stop"
MAX_ROUND_TRIPS = 10_000_000  # bound on the pingpong loop besides its duration
MAX_RECEIVER_PROCESSES = 2  # broadcast receivers share at most this many processes
BROADCAST_NAME = "bench"

# A child's role: ``role(link, port, cert_pem, **params) -> value`` (sent to the parent).
Role = Callable[..., Awaitable[Any]]


# --------------------------------------------------------------------------------------------
# Measurements (called in the harness process)


def trio_endpoint_bulk(nbytes: int) -> float:
    """MB/s (10**6 bytes/s), like ``baseline_aioquic.bulk``: one QUIC stream point to point
    through conec_trio's own Trio endpoint and stream layer: client A opens a stream to the
    coordinator (``new_proxied_stream(None)``), the coordinator process reads it from
    ``coord.incoming_streams``. A sends ``nbytes`` in 64 KiB messages and closes its send
    side; the coordinator answers with one message on ``EndOfChannel``; time from A's first
    send until A receives that answer."""
    _check_positive(nbytes, "nbytes")
    value, stats = _run(
        "sink", "bulk", {"target": None, "nbytes": nbytes}, None, _bulk_timeout(nbytes)
    )
    _check_received("trio_endpoint_bulk", stats["coord"], nbytes)
    return value


def proxied_bulk(nbytes: int) -> float:
    """MB/s: client A sends ``nbytes`` as 64 KiB messages on a proxied stream to client B
    (coordinator, A and B in three processes), then closes its send side; B answers with one
    message on ``EndOfChannel``; time from A's first send until A receives that answer."""
    _check_positive(nbytes, "nbytes")
    value, stats = _run(
        "plain", "bulk", {"target": "bench-b", "nbytes": nbytes}, "sink", _bulk_timeout(nbytes)
    )
    _check_received("proxied_bulk", stats["b"], nbytes)
    return value


def direct_bulk(nbytes: int) -> float:
    """MB/s: as ``proxied_bulk`` but on a direct stream over a direct channel between A and B
    (the coordinator process only brokers; the channel is open before the clock starts)."""
    _check_positive(nbytes, "nbytes")
    params = {"target": "bench-b", "nbytes": nbytes, "direct": True}
    value, stats = _run("plain", "bulk", params, "sink", _bulk_timeout(nbytes), "server")
    _check_received("direct_bulk", stats["b"], nbytes)
    return value


def pingpong_proxied(duration: float) -> float:
    """Round trips/s: A sends a 64-byte message on a proxied stream to B, B echoes it, A waits
    for the echo; repeated for ``duration`` seconds (coordinator, A, B in three processes)."""
    value, _ = _run(
        "plain", "pingpong", {"target": "bench-b", "duration": duration}, "echo", duration + 30.0
    )
    return value


def pingpong_direct(duration: float) -> float:
    """Round trips/s: as ``pingpong_proxied`` on a direct stream over a direct channel A-B
    (opened, with its stream, before the clock starts; the coordinator only brokers)."""
    params = {"target": "bench-b", "duration": duration, "direct": True}
    value, _ = _run("plain", "pingpong", params, "echo", duration + 30.0, "server")
    return value


def pingpong_coordinator(duration: float) -> float:
    """Round trips/s: as ``pingpong_proxied`` on a stream from A to the coordinator itself
    (``new_proxied_stream(None)``), which echoes it from ``coord.incoming_streams``: one hop,
    like the baseline (coordinator and A in two processes)."""
    value, _ = _run(
        "echo", "pingpong", {"target": None, "duration": duration}, None, duration + 30.0
    )
    return value


def oneway_small_proxied(count: int) -> float:
    """Messages/s: A sends ``count`` 64-byte messages (one ``await send.send(msg)`` each) on a
    proxied stream to B, then closes; B answers with one message on ``EndOfChannel``; time from
    A's first send until A receives that answer."""
    return _oneway_small_case("oneway_small_proxied", count, direct=False)


def oneway_small_direct(count: int) -> float:
    """Messages/s: as ``oneway_small_proxied`` on a direct stream over a direct channel A-B
    (opened, with its stream, before the clock starts)."""
    return _oneway_small_case("oneway_small_direct", count, direct=True)


def _oneway_small_case(what: str, count: int, direct: bool) -> float:
    _check_positive(count, "count")
    value, stats = _run(
        "plain",
        "oneway_small",
        {"target": "bench-b", "count": count, "direct": direct},
        "sink",
        60.0 + count / 1000,
        "server" if direct else "client",
    )
    _check_received(what, stats["b"], count * SMALL_MESSAGE)
    return value


def stream_move(nbytes: int) -> dict[str, float]:
    """A bulk stream that starts proxied and moves onto the direct channel mid-transfer: A
    opens it with ``new_stream`` and ``direct_head_start=0`` (so it starts proxied while the
    channel opens in the background) and sends ``nbytes`` in 64 KiB messages; B notes when
    each message arrives and by which path. Returns B's view: ``before_mbps`` (MB/s over the
    messages that came proxied), ``after_mbps`` (over those that came direct), ``pause_ms``
    (from the last proxied message to the first direct one) and ``gap_ms`` (the median gap
    between two messages, for scale)."""
    _check_positive(nbytes, "nbytes")
    _, stats = _run(
        "plain", "move_bulk", {"target": "bench-b", "nbytes": nbytes}, "movesink",
        _bulk_timeout(nbytes),
    )  # fmt: skip
    _check_received("stream_move", stats["b"], nbytes)
    move: dict[str, float] | None = stats["b"].get("move")
    if move is None:
        raise RuntimeError("stream_move: the stream did not move during the transfer")
    return move


def open_client(connections: int = 20) -> float:
    """Milliseconds (median over ``connections``): time from ``open_client(cfg)`` entry until
    its body runs, against a coordinator in another process; one client process opens them one
    after another (distinct ids), holding each open until the last is up, as the baseline does;
    closing them afterwards is not timed. Each config is left at its defaults, so each client
    makes its ephemeral self-signed certificate inside ``open_client``, as users' clients do."""
    _check_positive(connections, "connections")
    value, _ = _run(
        "plain", "open_client", {"connections": connections}, None, 30.0 + connections * 1.0
    )
    return value


def channel_open(opens: int = 10) -> float:
    """Milliseconds (median over ``opens``): time for ``client.new_channel("bench-b")`` in
    client A, a direct channel to client B (brokered by the coordinator, hole punching, the
    QUIC handshake with the certificates the coordinator vouched for); coordinator, A and B in
    three processes, both clients connected before the clock starts. A closes the channel
    (``close_channel``, not timed) before each next open."""
    _check_positive(opens, "opens")
    params = {"target": "bench-b", "opens": opens}
    value, _ = _run("plain", "channel_open", params, "sink", 30.0 + opens * 5.0, "server")
    return value


def broadcast_fanout(nbytes: int, receivers: int) -> float:
    """MB/s: one sender sends ``nbytes`` in 64 KiB messages on broadcast channel, joined by
    ``receivers`` receiving members (besides the sender), then closes; throughput is ``nbytes``
    over the time from the first send until the LAST receiver has seen ``EndOfChannel`` (each
    receiver gets all ``nbytes``). Coordinator, sender and receivers in separate processes
    (receivers share at most two processes, several clients per process, to fit 2 cores).

    The sender closes its own receive end before the clock starts (a member gets its own
    messages too; a closed receiver holds nobody back), the receivers close their send ends
    (so that the sender's close ends the channel). The clock spans processes: the sender's
    first send and each receiver's ``EndOfChannel`` are read from ``time.monotonic()``, which
    is one system-wide clock on Linux."""
    _check_positive(nbytes, "nbytes")
    _check_positive(receivers, "receivers")
    timeout = 60.0 + nbytes * receivers / 2e6
    cert_pem, key_pem = self_signed_cert()
    nprocs = min(receivers, MAX_RECEIVER_PROCESSES)
    groups = [[f"bench-r{i}" for i in range(receivers) if i % nprocs == p] for p in range(nprocs)]
    with Processes() as procs:
        coord = procs.spawn(
            "conec coordinator",
            _coord_main,
            cert_pem,
            key_pem,
            "plain",
            timeout + 2 * STARTUP_TIMEOUT,
            side="server",
        )
        # The coordinator relays: its endpoints, sender and receivers, are the client side.
        sender = procs.spawn(
            "conec broadcast sender",
            _client_main,
            cert_pem,
            "broadcast_sender",
            {"receivers": receivers, "nbytes": nbytes},
            timeout + STARTUP_TIMEOUT,
            side="client",
        )
        recv_procs = [
            procs.spawn(
                f"conec broadcast receivers {p + 1}/{nprocs}",
                _client_main,
                cert_pem,
                "broadcast_receivers",
                {"ids": ids},
                timeout + 2 * STARTUP_TIMEOUT,
                side="client",
            )
            for p, ids in enumerate(groups)
        ]
        port = coord.recv(STARTUP_TIMEOUT)
        # The sender joins first: receivers closing their send ends on a channel with no
        # other sender would end it at once.
        sender.send(port)
        _expect(sender, "ready", STARTUP_TIMEOUT)
        for child in recv_procs:
            child.send(port)
        for child in recv_procs:
            _expect(child, "ready", STARTUP_TIMEOUT)
        sender.send("go")
        start = float(sender.recv(timeout))
        results = [child.recv(timeout) for child in recv_procs]
        for child in recv_procs:
            child.send("stop")
        sender.send("stop")
        for child in [*recv_procs, sender]:
            child.recv(STOP_TIMEOUT)
        coord.send("stop")
        coord.recv(STOP_TIMEOUT)
    received = [n for result in results for n in result["received"]]
    if len(received) != receivers or any(n != nbytes for n in received):
        raise RuntimeError(
            f"broadcast_fanout: receivers got {sorted(set(received))} bytes, not {nbytes} each"
        )
    end = max(float(t) for result in results for t in result["ends"])
    return nbytes / (end - start) / 1e6


def connect_many(count: int, batch: int = 100) -> float:
    """Seconds: one process opens ``count`` clients (distinct ids) to a coordinator in another
    process, ``batch`` concurrently at a time, all held open until the last one is up."""
    _check_positive(count, "count")
    _check_positive(batch, "batch")
    value, _ = _run(
        "plain", "connect_many", {"count": count, "batch": batch}, None, 60.0 + count * 0.1
    )
    return value


def _check_positive(value: float, name: str) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive")


def _bulk_timeout(nbytes: int) -> float:
    return 60.0 + nbytes / 1e6


def _check_received(what: str, stats: dict[str, Any], expected: int) -> None:
    if stats["received"] != expected:
        raise RuntimeError(f"{what}: the receiver got {stats['received']} bytes, not {expected}")


def _expect(child: Child, expected: str, timeout: float) -> None:
    value = child.recv(timeout)
    if value != expected:
        raise RuntimeError(f"{child.name}: sent {value!r}, expected {expected!r}")


def _run(
    coord_mode: str,
    measurement: str,
    params: dict[str, Any],
    peer_mode: str | None,
    timeout: float,
    peer_side: Side = "client",
) -> tuple[float, dict[str, Any]]:
    """Coordinator, client A running ``measurement``, and (with ``peer_mode``) client B
    serving A's streams: ``(A's value, {"coord": stats, "b": stats})``.

    With CPU pinning on, the coordinator is on the server side and A on the client side; B
    on ``peer_side``: the client side when the coordinator relays between A and B (the relay
    on one side, both its ends on the other), the server side when A talks to B directly
    (B serves, the coordinator only brokers)."""
    cert_pem, key_pem = self_signed_cert()
    stats: dict[str, Any] = {}
    with Processes() as procs:
        coord = procs.spawn(
            "conec coordinator",
            _coord_main,
            cert_pem,
            key_pem,
            coord_mode,
            timeout + 2 * STARTUP_TIMEOUT,
            side="server",
        )
        peer = None
        if peer_mode is not None:
            peer = procs.spawn(
                "conec client B",
                _client_main,
                cert_pem,
                "peer",
                {"id": "bench-b", "mode": peer_mode},
                timeout + 2 * STARTUP_TIMEOUT,
                side=peer_side,
            )
        client = procs.spawn(
            f"conec {measurement} client A",
            _client_main,
            cert_pem,
            measurement,
            params,
            timeout + STARTUP_TIMEOUT,
            side="client",
        )
        port = coord.recv(STARTUP_TIMEOUT)
        if peer is not None:
            peer.send(port)
        client.send(port)
        if peer is not None:
            _expect(peer, "ready", STARTUP_TIMEOUT)
        _expect(client, "ready", STARTUP_TIMEOUT)
        client.send("go")
        value = float(client.recv(timeout))
        client.recv(STOP_TIMEOUT)  # A has left its client block
        if peer is not None:
            peer.send("stop")
            stats["b"] = peer.recv(STOP_TIMEOUT)
        coord.send("stop")
        stats["coord"] = coord.recv(STOP_TIMEOUT)
    return value, stats


# --------------------------------------------------------------------------------------------
# Helpers for the children (trio side)


async def _expect_from_parent(link: Link, expected: str, limit: float) -> None:
    value = await from_parent(link, limit)
    if value != expected:
        raise RuntimeError(f"the parent sent {value!r}, expected {expected!r}")


DATAGRAM_ENV = "CONEC_BENCH_MAX_DATAGRAM"


def _datagram_cap() -> dict[str, int]:
    """``CONEC_BENCH_MAX_DATAGRAM`` (inherited by the spawned peers) caps path MTU probing:
    1200 measures conec_trio at aioquic's default datagram size."""
    cap = os.environ.get(DATAGRAM_ENV)
    return {"max_datagram_size": int(cap)} if cap else {}


def _client_config(client_id: str, port: int, cert_pem: bytes) -> conec_trio.ClientConfig:
    return conec_trio.ClientConfig(
        id=client_id, coord_host=HOST, coord_port=port, ca=cert_pem, **_datagram_cap()
    )


class _Counter:
    def __init__(self) -> None:
        self.received = 0
        self.streams = 0
        self.broken = 0
        self.move: dict[str, float] | None = None  # mode movesink: what the move looked like


def _move_figures(arrivals: list[tuple[float, int, conec_trio.Path]]) -> dict[str, float] | None:
    """Throughput on each side of the move and the pause at it, from ``(time, bytes, path)``
    per message as the receiver saw them; None if the stream did not move."""
    proxied = [a for a in arrivals if a[2] is conec_trio.Path.PROXIED]
    direct = [a for a in arrivals if a[2] is conec_trio.Path.DIRECT]
    if len(proxied) < 2 or len(direct) < 2:
        return None
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    return {
        "before_mbps": sum(a[1] for a in proxied[1:]) / (proxied[-1][0] - proxied[0][0]) / 1e6,
        "after_mbps": sum(a[1] for a in direct[1:]) / (direct[-1][0] - direct[0][0]) / 1e6,
        "pause_ms": (direct[0][0] - proxied[-1][0]) * 1000,
        "gap_ms": statistics.median(gaps) * 1000,
        "moved_at_fraction": sum(a[1] for a in proxied) / sum(a[1] for a in arrivals),
    }


async def _serve_stream(
    send: trio.abc.SendChannel[bytes],
    recv: trio.abc.ReceiveChannel[bytes],
    mode: str,
    counter: _Counter,
) -> None:
    """``sink``: count what arrives, answer the end with one message. ``echo``: send back."""
    counter.streams += 1
    arrivals: list[tuple[float, int, conec_trio.Path]] = []
    try:
        while True:
            try:
                msg = await recv.receive()
            except trio.EndOfChannel:
                break
            counter.received += len(msg)
            if mode == "movesink":
                arrivals.append((time.perf_counter(), len(msg), recv.path))  # type: ignore[attr-defined]
            if mode == "echo":
                await send.send(msg)
        if mode == "movesink":
            counter.move = _move_figures(arrivals)
        if mode in ("sink", "movesink"):
            await send.send(REPLY)
        await send.aclose()
    except trio.BrokenResourceError:
        counter.broken += 1  # the opener left first: not a measurement error by itself


async def _serve_incoming(
    incoming: trio.abc.ReceiveChannel[conec_trio.IncomingStream], mode: str, counter: _Counter
) -> None:
    async with trio.open_nursery() as nursery:
        async for stream in incoming:
            nursery.start_soon(_serve_stream, stream.send, stream.recv, mode, counter)


# --------------------------------------------------------------------------------------------
# Coordinator process


def _coord_main(link: Link, cert_pem: bytes, key_pem: bytes, mode: str, lifetime: float) -> None:
    """Child process: run a coordinator until the parent says stop, then report.

    ``mode``: ``plain`` (only coordinate), or ``sink`` / ``echo`` (also serve the streams
    opened to the coordinator itself, as client B does)."""
    link.send(trio.run(_coord_run, link, cert_pem, key_pem, mode, lifetime))


async def _coord_run(
    link: Link, cert_pem: bytes, key_pem: bytes, mode: str, lifetime: float
) -> dict[str, Any]:
    counter = _Counter()
    config = conec_trio.CoordConfig(
        cert_chain=cert_pem, private_key=key_pem, host=HOST, port=0, **_datagram_cap()
    )
    with trio.fail_after(lifetime):
        async with conec_trio.open_coordinator(config) as coord:
            link.send(coord.address[1])
            async with trio.open_nursery() as nursery:
                if mode != "plain":
                    nursery.start_soon(_serve_incoming, coord.incoming_streams, mode, counter)
                await from_parent(link, lifetime)
                nursery.cancel_scope.cancel()
    return {"received": counter.received, "streams": counter.streams, **usage()}


# --------------------------------------------------------------------------------------------
# Client processes


def _client_main(
    link: Link, cert_pem: bytes, role: str, params: dict[str, Any], timeout: float
) -> None:
    """Child process: wait for the coordinator's port, play ``role``, report its value."""
    port = link.recv(STARTUP_TIMEOUT)

    async def run() -> Any:
        with trio.fail_after(timeout):
            return await _ROLES[role](link, port, cert_pem, **params)

    link.send(trio.run(run))


async def _peer(link: Link, port: int, cert_pem: bytes, id: str, mode: str) -> dict[str, Any]:
    """Client B: serve every incoming stream (``sink`` or ``echo``) until the parent's stop."""
    counter = _Counter()
    async with conec_trio.open_client(_client_config(id, port, cert_pem)) as client:
        link.send("ready")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_incoming, client.incoming_streams, mode, counter)
            await from_parent(link, math.inf)
            nursery.cancel_scope.cancel()
    return {
        "received": counter.received,
        "streams": counter.streams,
        "broken": counter.broken,
        "move": counter.move,
    }


async def _send_bulk(send: trio.abc.SendChannel[bytes], nbytes: int) -> None:
    """``nbytes`` in messages of ``CHUNK`` bytes (the last one shorter), then the end."""
    chunk = bytes(CHUNK)
    sent = 0
    while sent < nbytes:
        size = min(CHUNK, nbytes - sent)
        await send.send(chunk if size == CHUNK else chunk[:size])
        sent += size
    await send.aclose()


async def _open_stream(
    client: conec_trio.Client, target: str | None, direct: bool
) -> tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[bytes]]:
    """A's stream to ``target`` (None: the coordinator): direct over a new direct channel, or
    proxied."""
    if direct:
        assert target is not None
        await client.new_channel(target)
        return await client.new_direct_stream(target)
    return await client.new_proxied_stream(target)


async def _bulk(
    link: Link, port: int, cert_pem: bytes, target: str | None, nbytes: int, direct: bool = False
) -> str:
    async with conec_trio.open_client(_client_config("bench-a", port, cert_pem)) as client:
        link.send("ready")
        await _expect_from_parent(link, "go", STARTUP_TIMEOUT)
        send, recv = await _open_stream(client, target, direct)
        start = time.perf_counter()
        await _send_bulk(send, nbytes)
        reply = await recv.receive()
        elapsed = time.perf_counter() - start
        if reply != REPLY:
            raise RuntimeError(f"bulk: unexpected reply {reply!r}")
        link.send(nbytes / elapsed / 1e6)
    return "done"


async def _pingpong(
    link: Link,
    port: int,
    cert_pem: bytes,
    target: str | None,
    duration: float,
    direct: bool = False,
) -> str:
    async with conec_trio.open_client(_client_config("bench-a", port, cert_pem)) as client:
        link.send("ready")
        await _expect_from_parent(link, "go", STARTUP_TIMEOUT)
        send, recv = await _open_stream(client, target, direct)
        message = bytes(SMALL_MESSAGE)
        trips = 0
        start = now = time.perf_counter()
        deadline = start + duration
        while trips < MAX_ROUND_TRIPS and now < deadline:
            await send.send(message)
            echo = await recv.receive()
            if len(echo) != SMALL_MESSAGE:
                raise RuntimeError(f"pingpong: echo of {len(echo)} bytes")
            trips += 1
            now = time.perf_counter()
        link.send(trips / (now - start))
        await send.aclose()
    return "done"


async def _oneway_small(
    link: Link, port: int, cert_pem: bytes, target: str, count: int, direct: bool = False
) -> str:
    async with conec_trio.open_client(_client_config("bench-a", port, cert_pem)) as client:
        link.send("ready")
        await _expect_from_parent(link, "go", STARTUP_TIMEOUT)
        send, recv = await _open_stream(client, target, direct)
        message = bytes(SMALL_MESSAGE)
        start = time.perf_counter()
        for _ in range(count):
            await send.send(message)
        await send.aclose()
        reply = await recv.receive()
        elapsed = time.perf_counter() - start
        if reply != REPLY:
            raise RuntimeError(f"oneway_small: unexpected reply {reply!r}")
        link.send(count / elapsed)
    return "done"


async def _hold_client(
    config: conec_trio.ClientConfig,
    release: trio.Event,
    times: list[float] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open a client, report it up (and how long ``open_client`` took), hold it until
    ``release``."""
    start = time.perf_counter()
    async with conec_trio.open_client(config):
        if times is not None:
            times.append(time.perf_counter() - start)
        task_status.started()
        await release.wait()


async def _open_client(link: Link, port: int, cert_pem: bytes, connections: int) -> str:
    link.send("ready")
    await _expect_from_parent(link, "go", STARTUP_TIMEOUT)
    times: list[float] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for i in range(connections):
            config = _client_config(f"bench-c{i}", port, cert_pem)
            await nursery.start(_hold_client, config, release, times)
        link.send(statistics.median(times) * 1000.0)
        release.set()
    return "done"


async def _channel_open(link: Link, port: int, cert_pem: bytes, target: str, opens: int) -> str:
    async with conec_trio.open_client(_client_config("bench-a", port, cert_pem)) as client:
        link.send("ready")
        await _expect_from_parent(link, "go", STARTUP_TIMEOUT)
        times: list[float] = []
        for _ in range(opens):
            start = time.perf_counter()
            await client.new_channel(target)
            times.append(time.perf_counter() - start)
            await client.close_channel(target)
        link.send(statistics.median(times) * 1000.0)
    return "done"


async def _connect_many(link: Link, port: int, cert_pem: bytes, count: int, batch: int) -> str:
    link.send("ready")
    await _expect_from_parent(link, "go", STARTUP_TIMEOUT)
    release = trio.Event()
    up = 0

    async def open_one(nursery: trio.Nursery, config: conec_trio.ClientConfig) -> None:
        nonlocal up
        await nursery.start(_hold_client, config, release)
        up += 1

    async with trio.open_nursery() as holders:
        start = time.perf_counter()
        for first in range(0, count, batch):
            async with trio.open_nursery() as openers:
                for i in range(first, min(first + batch, count)):
                    config = _client_config(f"bench-c{i}", port, cert_pem)
                    openers.start_soon(open_one, holders, config)
        elapsed = time.perf_counter() - start
        if up != count:
            raise RuntimeError(f"connect_many: {up} clients up, not {count}")
        link.send(elapsed)
        release.set()
    return "done"


async def _broadcast_sender(
    link: Link, port: int, cert_pem: bytes, receivers: int, nbytes: int
) -> str:
    async with conec_trio.open_client(_client_config("bench-s", port, cert_pem)) as client:
        send, recv = await client.new_broadcast(BROADCAST_NAME)
        await recv.aclose()  # its own messages would come back to it
        link.send("ready")
        await _expect_from_parent(link, "go", STARTUP_TIMEOUT)
        # Every receiver has joined and closed its send end; the counts may lag a little
        # behind those closes, so wait (bounded) until they show it.
        for _ in range(1000):  # 10 s at most
            counts = await client.broadcast_count(BROADCAST_NAME)
            if counts == (1, receivers):
                break
            await trio.sleep(0.01)
        else:
            raise RuntimeError(f"broadcast: counts {counts}, expected (1, {receivers})")
        start = time.monotonic()
        await _send_bulk(send, nbytes)
        link.send(start)
        await from_parent(link, math.inf)  # stop: leave only once the receivers are done
    return "done"


async def _broadcast_receivers(link: Link, port: int, cert_pem: bytes, ids: list[str]) -> str:
    """Several receiving clients in one process; reports each one's bytes and end time."""
    received: dict[str, int] = {}
    ends: dict[str, float] = {}
    joined = 0
    all_joined = trio.Event()
    all_done = trio.Event()
    go = trio.Event()

    async def member(client_id: str) -> None:
        nonlocal joined
        config = _client_config(client_id, port, cert_pem)
        async with conec_trio.open_client(config) as client:
            send, recv = await client.new_broadcast(BROADCAST_NAME)
            await send.aclose()
            joined += 1
            if joined == len(ids):
                all_joined.set()
            count = 0
            async with recv:
                async for msg in recv:
                    count += len(msg.data)
                ends[client_id] = time.monotonic()
                received[client_id] = count
                if len(ends) == len(ids):
                    all_done.set()
            await go.wait()  # hold the client until the parent says stop

    async with trio.open_nursery() as nursery:
        for client_id in ids:
            nursery.start_soon(member, client_id)
        await all_joined.wait()
        link.send("ready")
        await all_done.wait()
        link.send({"received": list(received.values()), "ends": list(ends.values())})
        await from_parent(link, math.inf)
        go.set()
    return "done"


async def _move_bulk(link: Link, port: int, cert_pem: bytes, target: str, nbytes: int) -> str:
    """A of ``stream_move``: a bulk transfer on a stream that starts proxied and moves."""
    config = _client_config("bench-a", port, cert_pem)
    config.direct_head_start = 0
    async with conec_trio.open_client(config) as client:
        link.send("ready")
        await _expect_from_parent(link, "go", STARTUP_TIMEOUT)
        send, recv = await client.new_stream(target)
        start = time.perf_counter()
        await _send_bulk(send, nbytes)
        reply = await recv.receive()
        elapsed = time.perf_counter() - start
        if reply != REPLY:
            raise RuntimeError(f"stream_move: unexpected reply {reply!r}")
        link.send(nbytes / elapsed / 1e6)
    return "done"


_ROLES: dict[str, Role] = {
    "peer": _peer,
    "move_bulk": _move_bulk,
    "bulk": _bulk,
    "pingpong": _pingpong,
    "oneway_small": _oneway_small,
    "open_client": _open_client,
    "channel_open": _channel_open,
    "connect_many": _connect_many,
    "broadcast_sender": _broadcast_sender,
    "broadcast_receivers": _broadcast_receivers,
}
