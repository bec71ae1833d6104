"""Moving bytes between a TCP connection and a conec stream, both ways.

One message per TCP read (at most :data:`CHUNK` bytes). A TCP half-close is the stream's
clean end (``aclose`` -> ``EndOfChannel`` -> ``send_eof``); a TCP reset, or a broken stream,
breaks the other side too (stream abort, TCP RST).

Backpressure holds end to end with bounded memory: each direction moves one chunk at a time,
so a TCP reader that stops reading fills its socket buffers, which stops the pump writing to
it, which stops reading the stream, whose flow control blocks the far pump's ``send``, which
stops reading the far TCP socket.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from dataclasses import dataclass

import trio

from .. import MessageReceiveChannel, MessageSendChannel
from .console import format_address

__all__ = [
    "CHUNK",
    "SpliceResult",
    "close_all",
    "close_quietly",
    "splice",
    "summary",
    "tcp_peer",
    "why",
]

# The most TCP bytes one stream message carries.
CHUNK = 64 * 1024


@dataclass
class SpliceResult:
    """What :func:`splice` did: bytes each way, and why it was cut short (None: clean end)."""

    sent: int = 0  # from the TCP socket into the stream
    received: int = 0  # from the stream out to the TCP socket
    error: str | None = None


def why(exc: BaseException) -> str:
    """Why a stream or socket operation failed, in a few words (the OS's, where it gave any)."""
    cause = exc.__cause__ or exc.__context__
    text = str(exc)
    if cause is not None and isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return text or type(exc).__name__


def _reset_tcp(tcp: trio.SocketStream) -> None:
    """Make the coming close a TCP reset (RST), not an orderly end (FIN)."""
    with contextlib.suppress(OSError):
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def close_quietly(*resources: trio.abc.AsyncResource) -> None:
    """Close each of ``resources``, shielded from cancellation, ignoring broken ones."""
    with trio.CancelScope(shield=True):
        for resource in resources:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await resource.aclose()


async def close_all(
    tcp: trio.SocketStream,
    send: MessageSendChannel,
    recv: MessageReceiveChannel,
    error: str | None,
) -> None:
    """Close the TCP connection and both stream ends: cleanly, or as resets after ``error``."""
    with trio.CancelScope(shield=True):
        if error is not None:
            # A clean end would pass a cut-off connection for a complete one (a half-close).
            await send.abort()
            _reset_tcp(tcp)
    await close_quietly(send, recv, tcp)


async def splice(
    tcp: trio.SocketStream, send: MessageSendChannel, recv: MessageReceiveChannel
) -> SpliceResult:
    """Copy bytes between ``tcp`` and a stream both ways until both directions ended, then
    close all three.

    A direction ends cleanly at TCP EOF (-> ``send.aclose()``) or at the stream's end
    (-> ``tcp.send_eof()``); the other direction keeps flowing. A TCP error or a broken
    stream ends both at once, and the other side sees a reset.
    """
    result = SpliceResult()
    try:
        async with trio.open_nursery() as nursery:

            def abort(reason: str) -> None:
                if result.error is None:
                    result.error = reason
                nursery.cancel_scope.cancel()

            async def tcp_to_stream() -> None:
                while True:
                    try:
                        data = await tcp.receive_some(CHUNK)
                    except trio.BrokenResourceError as exc:
                        abort(f"TCP connection broke: {why(exc)}")
                        return
                    if not data:
                        break
                    try:
                        await send.send(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        abort(f"stream broke: {why(exc)}")
                        return
                    result.sent += len(data)
                await send.aclose()

            async def stream_to_tcp() -> None:
                while True:
                    try:
                        data = await recv.receive()
                    except trio.EndOfChannel:
                        break
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        abort(f"stream broke: {why(exc)}")
                        return
                    try:
                        await tcp.send_all(data)
                    except trio.BrokenResourceError as exc:
                        abort(f"TCP connection broke: {why(exc)}")
                        return
                    result.received += len(data)
                try:
                    await tcp.send_eof()
                except trio.BrokenResourceError as exc:
                    if not _gone(exc):
                        abort(f"TCP connection broke: {why(exc)}")

            nursery.start_soon(tcp_to_stream)
            nursery.start_soon(stream_to_tcp)
    except BaseException:
        if result.error is None:
            result.error = "cancelled"
        raise
    finally:
        await close_all(tcp, send, recv, result.error)
    return result


def _gone(exc: BaseException) -> bool:
    """Whether ``send_eof`` failed only because the TCP peer has closed its end already (every
    byte was delivered: a clean close, not a broken one)."""
    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, OSError) and cause.errno == errno.ENOTCONN


def tcp_peer(tcp: trio.SocketStream) -> str:
    """The address at the other end of ``tcp``, or ``?``."""
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "?"
    return format_address(str(host), int(port))


def _fmt_bytes(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"


def summary(result: SpliceResult, seconds: float) -> str:
    """One line about a finished connection: how it ended, when, and how much it moved."""
    how = "closed" if result.error is None else f"broken ({result.error})"
    return (
        f"{how} after {seconds:.1f} s: {_fmt_bytes(result.sent)} sent, "
        f"{_fmt_bytes(result.received)} received"
    )
