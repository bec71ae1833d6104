"""A conec_trio node for the NAT lab: a coordinator or a client, run inside a lab namespace.

Run with the test's own interpreter (``python conec_node.py ROLE ...``). Every line it
prints on stdout is one JSON object with an ``"event"`` key; logs go to stderr.

``coord``
    Runs ``open_coordinator`` on ``--host``:``--port`` with the certificate and key files
    given, prints ``{"event": "ready", ...}`` and stays up until its stdin is closed.

``client``
    Connects to the coordinator at ``--coord``:``--port`` (trusting ``--ca``) as ``--id``,
    prints ``{"event": "connected", "observed": [ip, port], ...}``, and from then on echoes
    every message of every stream another client opens to it (one ``"incoming"`` line per
    finished stream). It runs the commands it reads on stdin, one per line and one at a
    time, each bounded with ``trio.fail_after``, and prints one ``"result"`` line per
    command:

    ``open PEER N``
        ``new_channel(PEER)``, then a direct stream carrying N messages that must come back
        echoed. Reports ``channel_ms``, ``via`` (the peer address the channel uses),
        ``is_direct``, ``echoed``.
    ``stream PEER N``
        ``new_stream(PEER)`` (direct if a channel can be had, else proxied), N echoed
        messages. Reports ``is_direct``, ``path`` (where the stream started), ``stream_ms``,
        ``first_echo_ms`` (from the call until the first echo), ``echoed``, and after the
        echoes ``via`` (the channel's peer address, if one is open) and ``failure`` (why a
        direct attempt failed, if one did).
    ``close PEER``
        ``close_channel(PEER)``.
    ``ping``
        One request/reply round trip to the coordinator (after the lab forgot the NAT
        mappings, this makes this host's NAT map its coordinator connection again).
    ``bulk PEER direct|proxied``
        Starts a bulk transfer to PEER in the background and reports at once: random
        64 KiB messages, as fast as the stream takes them, over a direct stream (opening
        the channel first if there is none) or a proxied one, until ``finish``. Meanwhile
        the sending size of the connection it uses (the channel's, or the coordinator
        connection's) is printed as a ``"size"`` line (``size``, ``t``) whenever it changes.
    ``finish``
        Ends the bulk transfer: closes the stream, waits for the receiver's report, and
        reports ``bytes`` and ``sha256`` of what was sent and ``receiver`` (the report).
    ``keep PEER``
        Opens a direct stream to PEER (and the channel first if there is none) and keeps
        it for ``talk`` and ``end``. Reports ``is_direct`` and ``via``.
    ``talk PEER N``
        Sends the next N numbered messages on the kept stream, all at once, while reading
        their echoes: each must come back in order (none lost, duplicated or reordered).
        Reports ``first`` (the number of the first of them), ``echoed``, ``bytes`` (their
        payloads: less than they took on the stream) and ``via``.
    ``end PEER``
        Ends the kept stream (it must end cleanly after the last echo) and reports
        ``echoed``, all the messages it carried.
    ``channel PEER``
        The direct channel to PEER as ``client.statistics()`` shows it: ``address`` (the
        peer address its QUIC connection uses now), ``bytes_sent``, ``bytes_received``;
        ``address`` is None when there is no channel.

    A stream whose first message is ``BULK_HEADER`` is a bulk transfer: it is not echoed;
    its messages are hashed, a ``"progress"`` line (``bytes``, ``t``) is printed at most
    every 0.1 s while data arrives, and at the end the report (``bytes``, ``sha256``,
    ``first`` and ``last`` arrival, ``stalls``: every gap between two arrivals of at least
    50 ms as ``[from, to]``) goes back over the stream and out as a ``"bulk-received"``
    line. Every ``t`` and time in these is ``time.monotonic()``, the clock every process
    on the machine shares.

    A command that raises reports ``error`` (the exception's class and message) and
    ``error_type`` instead. Every result carries ``elapsed_ms``, the command's whole time.
    The client leaves its block and exits as soon as stdin is closed, even mid-command.

``tcp-echo --listen PORT``
    A TCP echo server on ``127.0.0.1:PORT`` (a target for ``expose``); prints ``ready``.

``tcp-probe --connect PORT [--count N]``
    N TCP connections to ``127.0.0.1:PORT`` one after the other (through ``forward``), each
    printing a ``probe`` line with ``first_byte_ms``: from the connect call until the first
    byte of the echo of its first line.

Every process also has a hard bound on its whole life (``--life``), so none outlives a
test that lost track of it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

import conec_trio

COMMAND_TIMEOUT = 20.0  # each command; the library's own channel timeout is 10 s
BULK_HEADER = b"conec-natlab bulk"
BULK_MESSAGE = 64 * 1024
PROGRESS_INTERVAL = 0.1
STALL = 0.05  # gaps between two arrivals this long or longer are reported
SIZE_POLL = 0.005


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        text += " [" + "; ".join(describe(sub) for sub in exc.exceptions) + "]"
    return text


async def stdin_lines() -> Any:
    """Lines of stdin (without the newline) until it is closed."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line.decode().strip()
    if buffer.strip():
        yield buffer.decode().strip()


# -- coordinator -------------------------------------------------------------------------------


async def run_coord(args: argparse.Namespace) -> None:
    config = conec_trio.CoordConfig(
        cert_chain=args.cert, private_key=args.key, host=args.host, port=args.port
    )
    async with conec_trio.open_coordinator(config) as coord:
        emit("ready", address=list(coord.address))
        async for _ in stdin_lines():
            pass
        emit("bye", clients=coord.num_clients)


# -- plain TCP: a target for forwarding, and a timed client -----------------------------------


async def run_tcp_echo(args: argparse.Namespace) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(trio.serve_tcp, handler, args.listen, host="127.0.0.1")
        )
        emit("ready", port=args.listen)


async def run_tcp_probe(args: argparse.Namespace) -> None:
    """``--count`` connections to ``127.0.0.1:--connect``, one after the other: each sends a
    line and reports when the first byte of its echo came back."""
    for i in range(args.count):
        start = trio.current_time()
        report: dict[str, Any] = {"n": i}
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                stream = await trio.open_tcp_stream("127.0.0.1", args.connect)
                async with stream:
                    message = f"probe {i}\n".encode()
                    await stream.send_all(message)
                    got = await stream.receive_some(len(message))
                    report["first_byte_ms"] = round((trio.current_time() - start) * 1000, 1)
                    while len(got) < len(message) and (more := await stream.receive_some()):
                        got += more
                    report["echoed"] = got == message
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            report["error"] = describe(exc)
        emit("probe", **report)


# -- client ------------------------------------------------------------------------------------


async def echo(stream: conec_trio.IncomingStream) -> None:
    """Send every message of ``stream`` back; report when the opener finished it. A bulk
    transfer (see ``BULK_HEADER``) goes to ``sink`` instead."""
    count = 0
    error = None
    try:
        with trio.fail_after(COMMAND_TIMEOUT) as bound:
            async for message in stream.recv:
                if count == 0 and message == BULK_HEADER:
                    bound.deadline = math.inf  # bounded by the process's life instead
                    await sink(stream)
                    return
                await stream.send.send(message)
                count += 1
            await stream.send.aclose()
    except (conec_trio.ConecError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        error = describe(exc)
    emit(
        "incoming",
        peer=stream.peer,
        is_direct=stream.stream_id.is_direct,
        echoed=count,
        error=error,
    )


async def sink(stream: conec_trio.IncomingStream) -> None:
    """The receiving end of a bulk transfer: hash what arrives, note when it arrives."""
    digest = hashlib.sha256()
    received = 0
    first = last = time.monotonic()
    next_progress = first + PROGRESS_INTERVAL
    stalls: list[list[float]] = []
    try:
        async for message in stream.recv:
            now = time.monotonic()
            if now - last >= STALL:
                stalls.append([round(last, 4), round(now, 4)])
            last = now
            digest.update(message)
            received += len(message)
            if now >= next_progress:
                emit("progress", peer=stream.peer, bytes=received, t=round(now, 4))
                next_progress = now + PROGRESS_INTERVAL
        report = {
            "bytes": received,
            "sha256": digest.hexdigest(),
            "first": round(first, 4),
            "last": round(last, 4),
            "stalls": stalls,
        }
        await stream.send.send(json.dumps(report).encode())
        await stream.send.aclose()
    except (conec_trio.ConecError, trio.BrokenResourceError) as exc:
        emit("bulk-received", peer=stream.peer, bytes=received, error=describe(exc))
        return
    emit("bulk-received", peer=stream.peer, is_direct=stream.stream_id.is_direct, **report)


async def serve(client: conec_trio.Client) -> None:
    async with trio.open_nursery() as nursery:
        try:
            async for stream in client.incoming_streams:
                nursery.start_soon(echo, stream)
        except trio.BrokenResourceError as exc:
            emit("lost", error=describe(exc))


async def exchange(send: Any, recv: Any, count: int, on_first: Any = None) -> int:
    """Send ``count`` messages one at a time, each must come back; then finish cleanly.
    ``on_first()`` is called when the first echo arrived."""
    for i in range(count):
        message = f"message {i} ".encode() * (i + 1)
        await send.send(message)
        answer = await recv.receive()
        if answer != message:
            raise AssertionError(f"echo {i} is {answer[:40]!r}, not {message[:40]!r}")
        if i == 0 and on_first is not None:
            on_first()
    await send.aclose()
    try:
        extra = await recv.receive()
    except trio.EndOfChannel:
        return count
    raise AssertionError(f"unexpected message after the echoes: {extra[:40]!r}")


def channel_path(client: conec_trio.Client, peer: str) -> list[Any] | None:
    """Where the direct channel to ``peer`` goes, if one is open."""
    channel = client.statistics().channels.get(peer)
    return None if channel is None else list(channel.address)


async def cmd_open(client: conec_trio.Client, peer: str, count: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    start = trio.current_time()
    await client.new_channel(peer)
    report["channel_ms"] = round((trio.current_time() - start) * 1000, 1)
    report["via"] = channel_path(client, peer)
    send, recv = await client.new_direct_stream(peer)
    report["is_direct"] = send.stream_id.is_direct
    start = trio.current_time()
    report["echoed"] = await exchange(send, recv, count)
    report["exchange_ms"] = round((trio.current_time() - start) * 1000, 1)
    return report


async def cmd_stream(client: conec_trio.Client, peer: str, count: int) -> dict[str, Any]:
    start = trio.current_time()
    send, recv = await client.new_stream(peer)
    report: dict[str, Any] = {
        "stream_ms": round((trio.current_time() - start) * 1000, 1),
        "is_direct": send.stream_id.is_direct,
        "path": send.path.value,  # where it started
    }

    def first_echo() -> None:
        report["first_echo_ms"] = round((trio.current_time() - start) * 1000, 1)

    report["echoed"] = await exchange(send, recv, count, first_echo)
    report["via"] = channel_path(client, peer)
    report["failure"] = client.statistics().direct_failures.get(peer)
    return report


async def cmd_close(client: conec_trio.Client, peer: str) -> dict[str, Any]:
    await client.close_channel(peer)
    return {}


async def cmd_ping(client: conec_trio.Client) -> dict[str, Any]:
    start = trio.current_time()
    with contextlib.suppress(conec_trio.ConecError):
        await client.broadcast_count("natlab-ping")  # nobody creates it: a plain round trip
    return {"rtt_ms": round((trio.current_time() - start) * 1000, 1)}


@dataclass
class Bulk:
    """A bulk transfer this client runs (``bulk``/``finish``)."""

    finish: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    report: dict[str, Any] = field(default_factory=dict)


async def cmd_bulk(
    client: conec_trio.Client, nursery: trio.Nursery, bulks: list[Bulk], peer: str, path: str
) -> dict[str, Any]:
    if bulks and not bulks[-1].done.is_set():
        raise RuntimeError("a bulk transfer is running already")
    size_now: Callable[[], int | None]
    if path == "direct":
        if peer not in client.statistics().channels:
            await client.new_channel(peer)
        send, recv = await client.new_direct_stream(peer)

        def size_now() -> int | None:
            channel = client.statistics().channels.get(peer)
            return None if channel is None else channel.datagram_size

    elif path == "proxied":
        send, recv = await client.new_proxied_stream(peer)

        def size_now() -> int | None:
            return client.statistics().coordinator_datagram_size

    else:
        raise ValueError(f"path must be direct or proxied, not {path!r}")
    await send.send(BULK_HEADER)
    bulk = Bulk()
    bulks.append(bulk)
    nursery.start_soon(send_bulk, bulk, send, recv)
    nursery.start_soon(watch_size, bulk, size_now)
    return {"is_direct": send.stream_id.is_direct}


async def send_bulk(bulk: Bulk, send: Any, recv: Any) -> None:
    digest = hashlib.sha256()
    sent = 0
    try:
        while not bulk.finish.is_set():
            message = os.urandom(BULK_MESSAGE)
            await send.send(message)
            digest.update(message)
            sent += len(message)
        await send.aclose()
        receiver = json.loads(await recv.receive())
        bulk.report = {"bytes": sent, "sha256": digest.hexdigest(), "receiver": receiver}
    except Exception as exc:  # the test judges it
        bulk.report = {"error": describe(exc), "error_type": type(exc).__name__, "bytes": sent}
    finally:
        bulk.done.set()


async def watch_size(bulk: Bulk, size_now: Callable[[], int | None]) -> None:
    """Print the sending size whenever it changes, until the transfer is done."""
    last: int | None = None
    while not bulk.done.is_set():
        size = size_now()
        if size != last:
            emit("size", size=size, t=round(time.monotonic(), 4))
            last = size
        await trio.sleep(SIZE_POLL)


async def cmd_finish(bulks: list[Bulk]) -> dict[str, Any]:
    if not bulks:
        raise RuntimeError("no bulk transfer to finish")
    bulk = bulks[-1]
    bulk.finish.set()
    await bulk.done.wait()
    return bulk.report


@dataclass
class Kept:
    """A direct stream kept open across commands (``keep``/``talk``/``end``)."""

    send: Any
    recv: Any
    sent: int = 0  # numbered messages sent, and echoed, so far


def numbered(i: int) -> bytes:
    """Numbered message ``i`` (sizes vary, so a message cut or joined would show)."""
    return f"numbered {i} ".encode() * (1 + i % 7)


async def cmd_keep(client: conec_trio.Client, kept: dict[str, Kept], peer: str) -> dict[str, Any]:
    if peer in kept:
        raise RuntimeError(f"a stream to {peer!r} is kept already")
    if peer not in client.statistics().channels:
        await client.new_channel(peer)
    send, recv = await client.new_direct_stream(peer)
    kept[peer] = Kept(send, recv)
    return {"is_direct": send.stream_id.is_direct, "via": channel_path(client, peer)}


async def cmd_talk(
    client: conec_trio.Client, kept: dict[str, Kept], peer: str, count: int
) -> dict[str, Any]:
    stream = kept[peer]
    first = stream.sent
    numbers = range(first, first + count)

    async def send_all() -> None:
        for i in numbers:
            await stream.send.send(numbered(i))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        for i in numbers:
            answer = await stream.recv.receive()
            if answer != numbered(i):
                raise AssertionError(f"echo {i} is {answer[:40]!r}, not {numbered(i)[:40]!r}")
            stream.sent = i + 1
    size = sum(len(numbered(i)) for i in numbers)
    return {"first": first, "echoed": count, "bytes": size, "via": channel_path(client, peer)}


async def cmd_end(kept: dict[str, Kept], peer: str) -> dict[str, Any]:
    stream = kept.pop(peer)
    await stream.send.aclose()
    try:
        extra = await stream.recv.receive()
    except trio.EndOfChannel:
        return {"echoed": stream.sent}
    raise AssertionError(f"unexpected message after the echoes: {extra[:40]!r}")


async def cmd_channel(client: conec_trio.Client, peer: str) -> dict[str, Any]:
    channel = client.statistics().channels.get(peer)
    if channel is None:
        return {"address": None}
    return {
        "address": list(channel.address),
        "bytes_sent": channel.bytes_sent,
        "bytes_received": channel.bytes_received,
    }


async def run_command(
    client: conec_trio.Client,
    nursery: trio.Nursery,
    bulks: list[Bulk],
    kept: dict[str, Kept],
    line: str,
) -> None:
    words = line.split()
    commands: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
        "open": lambda peer, n: cmd_open(client, peer, int(n)),
        "stream": lambda peer, n: cmd_stream(client, peer, int(n)),
        "close": lambda peer: cmd_close(client, peer),
        "ping": lambda: cmd_ping(client),
        "bulk": lambda peer, path: cmd_bulk(client, nursery, bulks, peer, path),
        "finish": lambda: cmd_finish(bulks),
        "keep": lambda peer: cmd_keep(client, kept, peer),
        "talk": lambda peer, n: cmd_talk(client, kept, peer, int(n)),
        "end": lambda peer: cmd_end(kept, peer),
        "channel": lambda peer: cmd_channel(client, peer),
    }
    if not words or words[0] not in commands:
        emit("result", cmd=line, error=f"unknown command {line!r}")
        return
    start = trio.current_time()
    try:
        with trio.fail_after(COMMAND_TIMEOUT):
            report = await commands[words[0]](*words[1:])
    except Exception as exc:  # whatever the library raised: the test judges it
        report = {"error": describe(exc), "error_type": type(exc).__name__}
    report.setdefault("elapsed_ms", round((trio.current_time() - start) * 1000, 1))
    emit("result", cmd=words[0], args=words[1:], **report)


async def run_client(args: argparse.Namespace) -> None:
    config = conec_trio.ClientConfig(
        id=args.id,
        coord_host=args.coord,
        coord_port=args.port,
        ca=args.ca,
        holepunch=not args.no_holepunch,
        listen=not args.no_listen,
        idle_timeout=args.idle_timeout,
    )
    start = trio.current_time()
    async with conec_trio.open_client(config) as client:
        emit(
            "connected",
            id=client.id,
            observed=list(client.observed_address or ()),
            connect_ms=round((trio.current_time() - start) * 1000, 1),
        )
        commands_in, commands = trio.open_memory_channel[str](math.inf)

        async def read_commands() -> None:
            async with commands_in:
                async for line in stdin_lines():
                    commands_in.send_nowait(line)
            nursery.cancel_scope.cancel()  # stdin closed: stop, even mid-command

        bulks: list[Bulk] = []
        kept: dict[str, Kept] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, client)
            nursery.start_soon(read_commands)
            async for line in commands:
                await run_command(client, nursery, bulks, kept, line)
    emit("bye")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--life", type=float, default=60.0, help="hard bound on run time (s)")
    parser.add_argument("--port", type=int, default=4433, help="the coordinator's UDP port")
    sub = parser.add_subparsers(dest="role", required=True)
    c = sub.add_parser("coord")
    c.add_argument("--host", default="0.0.0.0")
    c.add_argument("--cert", required=True, help="PEM file: the coordinator's certificate")
    c.add_argument("--key", required=True, help="PEM file: its private key")
    k = sub.add_parser("client")
    k.add_argument("--id", required=True)
    k.add_argument("--coord", required=True, help="the coordinator's IP address")
    k.add_argument("--ca", required=True, help="PEM file trusted for the coordinator")
    k.add_argument("--no-holepunch", action="store_true")
    k.add_argument("--no-listen", action="store_true")
    k.add_argument("--idle-timeout", type=float, default=None, help="seconds (library default)")
    e = sub.add_parser("tcp-echo")
    e.add_argument("--listen", type=int, required=True, help="TCP port on 127.0.0.1")
    p = sub.add_parser("tcp-probe")
    p.add_argument("--connect", type=int, required=True, help="TCP port on 127.0.0.1")
    p.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(relativeCreated)7.0f ms {args.role} %(name)s: %(message)s",
    )
    role = {
        "coord": run_coord,
        "client": run_client,
        "tcp-echo": run_tcp_echo,
        "tcp-probe": run_tcp_probe,
    }[args.role]

    async def bounded() -> None:
        with trio.fail_after(args.life if args.life > 0 else math.inf):
            await role(args)

    try:
        trio.run(bounded)
    except conec_trio.ConecError as exc:
        emit("failed", error=describe(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
