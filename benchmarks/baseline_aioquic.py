"""Raw aioquic baselines: aioquic's own asyncio API, server and client in two processes.

This is what an application built directly on ``aioquic.asyncio`` gets on this machine: a
server from ``aioquic.asyncio.serve`` and clients from ``aioquic.asyncio.connect``, each a
``QuicConnectionProtocol`` subclass handling ``StreamDataReceived`` and writing with
``send_stream_data`` + ``transmit()``. Everything uses aioquic's defaults (max datagram size
1200, 1 MiB stream and connection flow-control windows, Reno), on 127.0.0.1, with a throwaway
ECDSA P-256 certificate that the client trusts (full verification, as a real client would).

The public functions run in the calling (harness) process, start one server process and one
client process (``spawn``), and return one number:

* ``bulk(nbytes)``: MB/s (10**6 bytes/s) for one stream carrying ``nbytes`` to the server.
* ``pingpong(duration)``: round trips per second of 64-byte messages on one stream.
* ``oneway_small(count)``: 64-byte messages per second, one send call per message.
* ``handshake(connections)``: median ms from ``connect()`` entry to a completed handshake.
* ``connect_many(count, batch)``: seconds to bring ``count`` connections up, ``batch`` at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, cast

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ._certs import self_signed_cert
from ._procs import Link, Processes

HOST = "127.0.0.1"
SERVER_NAME = "localhost"
ALPN = "conec-bench"

CHUNK = 64 * 1024  # bulk write size
SMALL_MESSAGE = 64  # pingpong / oneway_small message size
# aioquic buffers whatever it is given without bound. Senders therefore keep at most
# SEND_HIGH_WATER bytes written-but-unacknowledged on their stream, and resume below
# SEND_LOW_WATER, as an application with any backpressure would (the receiver's 1 MiB window
# bounds what is in flight anyway). The reported time always runs until the server has
# received everything, so this only keeps memory bounded; it does not flatter the numbers.
SEND_HIGH_WATER = 2 * 1024 * 1024
SEND_LOW_WATER = 1024 * 1024

STARTUP_TIMEOUT = 60.0  # spawning a process and importing aioquic
STOP_TIMEOUT = 10.0
CLOSE_GRACE = 0.5  # see _HeldConnections
MAX_ROUND_TRIPS = 10_000_000  # bound on the pingpong loop besides its duration


# --------------------------------------------------------------------------------------------
# Measurements (called in the harness process)


def bulk(nbytes: int) -> float:
    """MB/s: the client sends ``nbytes`` in 64 KiB writes on one stream, then FIN; the server
    replies with one byte on FIN. Time from the first write until that reply arrives."""
    if nbytes <= 0:
        raise ValueError("nbytes must be positive")
    value, received = _run_pair("sink", "bulk", {"nbytes": nbytes}, 60.0 + nbytes / 1e6)
    if received != nbytes:
        raise RuntimeError(f"bulk: the server received {received} bytes, not {nbytes}")
    return value


def pingpong(duration: float) -> float:
    """Round trips/s: 64-byte message, wait for its echo, repeat for ``duration`` seconds."""
    value, _ = _run_pair("echo", "pingpong", {"duration": duration}, duration + 30.0)
    return value


def oneway_small(count: int) -> float:
    """Messages/s: ``count`` 64-byte messages, each with its own ``send_stream_data`` +
    ``transmit()``, then FIN; until the server's one-byte reply to the FIN arrives."""
    if count <= 0:
        raise ValueError("count must be positive")
    value, received = _run_pair("sink", "oneway_small", {"count": count}, 60.0 + count / 1000)
    if received != count * SMALL_MESSAGE:
        raise RuntimeError(
            f"oneway_small: the server received {received} bytes, not {count * SMALL_MESSAGE}"
        )
    return value


def handshake(connections: int = 20) -> float:
    """Median ms from ``connect()`` entry to handshake complete, over ``connections``
    sequential connections from one client process (held open until the last is up)."""
    value, _ = _run_pair(
        "sink", "handshake", {"connections": connections}, 30.0 + connections * 1.0
    )
    return value


def connect_many(count: int, batch: int = 100) -> float:
    """Seconds to open ``count`` connections from one client process to one server process,
    ``batch`` concurrently at a time, all held open until the last one is up."""
    value, _ = _run_pair(
        "sink", "connect_many", {"count": count, "batch": batch}, 60.0 + count * 0.1
    )
    return value


def _run_pair(
    server_mode: str, measurement: str, params: dict[str, Any], timeout: float
) -> tuple[float, int]:
    """Run one measurement: ``(client's value, bytes the server received)``."""
    cert_pem, key_pem = self_signed_cert()
    with Processes() as procs:
        # Both processes start (and import aioquic) at the same time; the client only begins
        # measuring once it has the server's port.
        server = procs.spawn(
            "aioquic server",
            _server_main,
            cert_pem,
            key_pem,
            server_mode,
            timeout + STARTUP_TIMEOUT,
            side="server",
        )
        client = procs.spawn(
            f"aioquic {measurement} client",
            _client_main,
            cert_pem,
            measurement,
            params,
            timeout,
            side="client",
        )
        port = server.recv(STARTUP_TIMEOUT)
        client.send(port)
        value = client.recv(timeout + STARTUP_TIMEOUT)
        server.send("stop")
        received = server.recv(STOP_TIMEOUT)
    return float(value), int(received)


# --------------------------------------------------------------------------------------------
# Server process


class _ServerStats:
    def __init__(self) -> None:
        self.received = 0


class _ServerProtocol(QuicConnectionProtocol):
    """``sink``: count bytes; on FIN reply one byte and FIN. ``echo``: send back what comes."""

    def __init__(self, *args: Any, mode: str, stats: _ServerStats, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mode = mode
        self._stats = stats

    def quic_event_received(self, event: QuicEvent) -> None:
        # No transmit() needed here: datagram_received() transmits after handling events.
        if not isinstance(event, StreamDataReceived):
            return
        self._stats.received += len(event.data)
        if self._mode == "echo":
            if event.data or event.end_stream:
                self._quic.send_stream_data(
                    event.stream_id, event.data, end_stream=event.end_stream
                )
        elif event.end_stream:
            self._quic.send_stream_data(event.stream_id, b"\x01", end_stream=True)


def _server_main(link: Link, cert_pem: bytes, key_pem: bytes, mode: str, lifetime: float) -> None:
    """Child process: serve until the parent says stop, then report the bytes received."""
    received = asyncio.run(_serve(link, cert_pem, key_pem, mode, lifetime))
    link.send(received)


async def _serve(link: Link, cert_pem: bytes, key_pem: bytes, mode: str, lifetime: float) -> int:
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.certificate = x509.load_pem_x509_certificate(cert_pem)
    config.private_key = cast(ec.EllipticCurvePrivateKey, load_pem_private_key(key_pem, None))
    stats = _ServerStats()
    server: QuicServer = await serve(
        HOST,
        0,
        configuration=config,
        create_protocol=partial(_ServerProtocol, mode=mode, stats=stats),
    )
    try:
        # serve() has no public way to learn the port it bound; the transport knows.
        transport = server._transport
        assert transport is not None
        _same_socket_buffers(transport)
        link.send(transport.get_extra_info("sockname")[1])
        async with asyncio.timeout(lifetime):
            await _parent_readable(link)
    finally:
        server.close()
    return stats.received


async def _parent_readable(link: Link) -> None:
    """Wait until the parent sends something (or goes away)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(link.fileno(), on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(link.fileno())


# --------------------------------------------------------------------------------------------
# Client process


class _ClientProtocol(QuicConnectionProtocol):
    """Counts what arrives per stream and lets one coroutine wait for progress."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received: dict[int, int] = {}
        self._finished: set[int] = set()
        # (stream, bytes needed, FIN needed, future)
        self._rx_waiter: tuple[int, int, bool, asyncio.Future[None]] | None = None
        # (stream, resume when unacknowledged bytes are at most this, future)
        self._drain_waiter: tuple[int, int, asyncio.Future[None]] | None = None
        self._terminated: str | None = None

    async def wait_received(self, stream_id: int, nbytes: int, fin: bool = False) -> None:
        """Wait until ``nbytes`` have arrived on the stream (and its FIN if ``fin``)."""
        if self._rx_done(stream_id, nbytes, fin):
            return
        self._check_alive()
        future = self._loop.create_future()
        self._rx_waiter = (stream_id, nbytes, fin, future)
        try:
            await future
        finally:
            self._rx_waiter = None

    async def wait_unacked_at_most(self, stream_id: int, limit: int) -> None:
        """Wait until at most ``limit`` bytes written to the stream are unacknowledged."""
        if unacked_bytes(self._quic, stream_id) <= limit:
            return
        self._check_alive()
        future = self._loop.create_future()
        self._drain_waiter = (stream_id, limit, future)
        try:
            await future
        finally:
            self._drain_waiter = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            sid = event.stream_id
            self._received[sid] = self._received.get(sid, 0) + len(event.data)
            if event.end_stream:
                self._finished.add(sid)
            waiter = self._rx_waiter
            if waiter is not None and waiter[0] == sid and self._rx_done(*waiter[:3]):
                _wake(waiter[3])
        elif isinstance(event, ConnectionTerminated):
            self._terminated = f"connection closed ({event.error_code}: {event.reason_phrase})"
            for pending in (self._rx_waiter, self._drain_waiter):
                if pending is not None and not pending[-1].done():
                    pending[-1].set_exception(ConnectionError(self._terminated))

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        waiter = self._drain_waiter
        if waiter is not None and unacked_bytes(self._quic, waiter[0]) <= waiter[1]:
            _wake(waiter[2])

    def _rx_done(self, stream_id: int, nbytes: int, fin: bool) -> bool:
        if self._received.get(stream_id, 0) < nbytes:
            return False
        return not fin or stream_id in self._finished

    def _check_alive(self) -> None:
        if self._terminated is not None:
            raise ConnectionError(self._terminated)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def unacked_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream that the peer has not acknowledged yet.

    aioquic has no public API for this; it reads the stream sender's buffer bounds.
    """
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return sender._buffer_stop - sender._buffer_start


def _client_config(cert_pem: bytes) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=SERVER_NAME)
    config.load_verify_locations(cadata=cert_pem)
    return config


def _same_socket_buffers(transport: Any) -> None:
    """Give aioquic's socket the buffer sizes conec_trio's endpoint asks for, so that ratios
    compare the protocol stacks, not kernel drops from a default-sized receive buffer."""
    sock = transport.get_extra_info("socket")
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)


@asynccontextmanager
async def _connect(port: int, config: QuicConfiguration) -> AsyncIterator[Any]:
    async with connect(HOST, port, configuration=config, create_protocol=_ClientProtocol) as p:
        _same_socket_buffers(p._transport)
        yield p


async def _bulk_client(port: int, cert_pem: bytes, nbytes: int) -> float:
    async with _connect(port, _client_config(cert_pem)) as protocol:
        client = cast(_ClientProtocol, protocol)
        quic = client._quic
        stream_id = quic.get_next_available_stream_id()
        chunk = bytes(CHUNK)
        sent = 0
        start = time.perf_counter()
        while sent < nbytes:
            if unacked_bytes(quic, stream_id) > SEND_HIGH_WATER:
                await client.wait_unacked_at_most(stream_id, SEND_LOW_WATER)
            size = min(CHUNK, nbytes - sent)
            sent += size
            data = chunk if size == CHUNK else chunk[:size]
            quic.send_stream_data(stream_id, data, end_stream=sent == nbytes)
            client.transmit()
        await client.wait_received(stream_id, 1, fin=True)
        elapsed = time.perf_counter() - start
    return nbytes / elapsed / 1e6


async def _pingpong_client(port: int, cert_pem: bytes, duration: float) -> float:
    async with _connect(port, _client_config(cert_pem)) as protocol:
        client = cast(_ClientProtocol, protocol)
        quic = client._quic
        stream_id = quic.get_next_available_stream_id()
        message = bytes(SMALL_MESSAGE)
        expected = 0
        trips = 0
        start = now = time.perf_counter()
        deadline = start + duration
        while trips < MAX_ROUND_TRIPS and now < deadline:
            quic.send_stream_data(stream_id, message)
            client.transmit()
            expected += SMALL_MESSAGE
            await client.wait_received(stream_id, expected)
            trips += 1
            now = time.perf_counter()
        elapsed = now - start
    return trips / elapsed


async def _oneway_small_client(port: int, cert_pem: bytes, count: int) -> float:
    async with _connect(port, _client_config(cert_pem)) as protocol:
        client = cast(_ClientProtocol, protocol)
        quic = client._quic
        stream_id = quic.get_next_available_stream_id()
        message = bytes(SMALL_MESSAGE)
        start = time.perf_counter()
        for _ in range(count):
            if unacked_bytes(quic, stream_id) > SEND_HIGH_WATER:
                await client.wait_unacked_at_most(stream_id, SEND_LOW_WATER)
            quic.send_stream_data(stream_id, message)
            client.transmit()
            # One checkpoint per message, as an application awaiting its own send call gets:
            # the event loop handles incoming acknowledgements in between.
            await asyncio.sleep(0)
        quic.send_stream_data(stream_id, b"", end_stream=True)
        client.transmit()
        await client.wait_received(stream_id, 1, fin=True)
        elapsed = time.perf_counter() - start
    return count / elapsed


class _HeldConnections:
    """Connections opened with ``connect()`` and held open until the block ends.

    On the way out every connection is closed at once: CONNECTION_CLOSE goes out immediately,
    and waiting out each closing period (three PTOs) would only cost wall time, so that wait
    is cut short after CLOSE_GRACE seconds.
    """

    def __init__(self, port: int, config: QuicConfiguration) -> None:
        self._port = port
        self._config = config
        self._managers: list[AbstractAsyncContextManager[Any]] = []

    async def open(self) -> None:
        manager = _connect(self._port, self._config)
        await manager.__aenter__()
        self._managers.append(manager)

    def __len__(self) -> int:
        return len(self._managers)

    async def __aenter__(self) -> _HeldConnections:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        managers, self._managers = self._managers, []
        closing = asyncio.gather(
            *(m.__aexit__(None, None, None) for m in managers), return_exceptions=True
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE):
                await closing


async def _handshake_client(port: int, cert_pem: bytes, connections: int) -> float:
    times: list[float] = []
    async with _HeldConnections(port, _client_config(cert_pem)) as held:
        for _ in range(connections):
            start = time.perf_counter()
            await held.open()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


async def _connect_many_client(port: int, cert_pem: bytes, count: int, batch: int) -> float:
    async with _HeldConnections(port, _client_config(cert_pem)) as held:
        start = time.perf_counter()
        for first in range(0, count, batch):
            await asyncio.gather(*(held.open() for _ in range(min(batch, count - first))))
        elapsed = time.perf_counter() - start
        if len(held) != count:
            raise RuntimeError(f"connect_many: {len(held)} connections up, not {count}")
    return elapsed


_CLIENTS: dict[str, Any] = {
    "bulk": _bulk_client,
    "pingpong": _pingpong_client,
    "oneway_small": _oneway_small_client,
    "handshake": _handshake_client,
    "connect_many": _connect_many_client,
}


def _client_main(
    link: Link, cert_pem: bytes, measurement: str, params: dict[str, Any], timeout: float
) -> None:
    """Child process: wait for the server's port, run one measurement, report its value."""
    port = link.recv(STARTUP_TIMEOUT)

    async def run() -> float:
        async with asyncio.timeout(timeout):
            return float(await _CLIENTS[measurement](port, cert_pem, **params))

    link.send(asyncio.run(run()))
