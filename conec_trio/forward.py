"""TCP port forwarding over conec channels: ``conec-trio forward`` and ``conec-trio expose``.

The port forwarding of the PTTH QUIC relay, built on conec::

    TCP client -> forward (client proxy) -> coordinator (relay)
               -> expose (server proxy) -> TCP server

``forward`` listens on ``127.0.0.1:LOCAL_PORT``; each TCP connection it accepts becomes one conec
stream to the ``expose`` peer, opened with ``client.new_stream`` (direct when a channel can be
made, otherwise relayed by the coordinator). On that stream:

1. forward -> expose: one CBOR message ``{"host": str, "port": int}``, the target;
2. expose -> forward: one CBOR message, ``{"ok": True}``, or ``{"ok": False, "reason": str}``
   followed by the end of the stream (``expose`` admits only its listed peers and targets);
3. then the TCP bytes both ways, one message per read (at most 64 KiB each). A TCP half-close
   is the stream's clean end (``aclose`` -> ``EndOfChannel`` -> ``send_eof``); a TCP reset, or
   a broken stream, breaks the other side too (stream reset, TCP RST).

Backpressure holds end to end with bounded memory: each direction of a connection moves one
chunk at a time, so a TCP reader that stops reading fills its socket buffers, which stops the
pump writing to it, which stops reading the stream, whose flow control blocks the far pump's
``send``, which stops reading the far TCP socket.

Resilience (PTTH's "sadder cases"): both programs keep a client connected to the coordinator
and, whenever it is lost (or not there yet), connect again with backoff (0.2 s doubling to 5 s,
with jitter). Each connection of a client is a *session*; TCP connections belong to the session
that carried them, and a lost session lets its connections run to their end (those over a
direct channel do not need the coordinator) while the next session takes new ones. While
``forward`` has no coordinator, it closes new TCP connections at once, saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import logging
import random
import signal
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ._client import Client, open_client
from ._config import ClientConfig, check_client_id, read_pem_option
from ._console import error as _error
from ._console import format_address as _format_address
from ._console import say as _say
from ._console import setup_logging as _setup_logging
from ._exceptions import (
    ConecError,
    DisconnectedError,
    IdInUseError,
    InvalidIdError,
    PeerNotFoundError,
    ProtocolError,
)
from ._streams import MessageReceiveChannel, MessageSendChannel
from ._types import IncomingStream
from .adapters import CborReceiveChannel, CborSendChannel

__all__ = [
    "Backoff",
    "CoordinatorLink",
    "Exposer",
    "Forwarder",
    "Mapping",
    "Session",
    "SpliceResult",
    "Target",
    "add_expose_command",
    "add_forward_command",
    "parse_host_port",
    "parse_mapping",
    "splice",
]

log = logging.getLogger("conec_trio.forward")

# The most TCP bytes one stream message carries.
CHUNK = 64 * 1024
# expose: how long a new stream may take to send its request, and a target to accept.
REQUEST_TIMEOUT = 10.0
TARGET_CONNECT_TIMEOUT = 10.0
# forward: how long opening a stream may take (a direct channel needs up to 10 s to fail),
# and how long the answer may take (it waits for expose's connection to the target).
OPEN_TIMEOUT = 15.0
REPLY_TIMEOUT = TARGET_CONNECT_TIMEOUT + 10.0
# How long one attempt to reach the coordinator may take before the next one, after a pause.
COORD_CONNECT_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
# accept() errors that mean "out of resources for now": wait a moment and go on accepting.
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def _fmt_bytes(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"


# --- addresses and mappings -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A TCP address, ``host:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return _format_address(self.host, self.port)

    @property
    def key(self) -> tuple[str, int]:
        """What ``--allow`` compares: the host name (any case) and the port, exactly."""
        return (self.host.lower(), self.port)


@dataclass(frozen=True)
class Mapping:
    """``LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT``: what one ``forward`` listener does."""

    local_port: int
    peer: str
    target: Target

    def __str__(self) -> str:
        return f"{self.local_port}:{self.peer}:{self.target}"


def _parse_port(text: str, whole: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not text.isdigit() or not low <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: the port must be a number from {low} to 65535")
    return int(text)


def parse_host_port(text: str) -> Target:
    """``HOST:PORT`` (an IPv6 address in brackets, ``[::1]:8080``) as a :class:`Target`.

    Raises ``ValueError`` saying what is wrong.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [{host}]:{port_text}")
    if not host:
        raise ValueError(f"{text!r} has no host")
    return Target(host, _parse_port(port_text, text))


def parse_mapping(text: str) -> Mapping:
    """``LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT`` as a :class:`Mapping` (LOCAL_PORT 0: any
    free port). Raises ``ValueError`` saying what is wrong."""
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT")
    local_text, peer, rest = parts
    local_port = _parse_port(local_text, text, allow_zero=True)
    try:
        check_client_id(peer)
    except InvalidIdError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    try:
        target = parse_host_port(rest)
    except ValueError as exc:
        raise ValueError(f"{text!r}: the target {exc}") from None
    return Mapping(local_port, peer, target)


# --- reconnecting to the coordinator ---------------------------------------------------------


class Backoff:
    """Pauses between attempts: ``initial`` doubling up to ``maximum``, each with jitter (a
    random half to all of it), so that many clients of a restarted coordinator spread out."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        maximum: float = BACKOFF_MAX,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        base = self._next
        self._next = min(self.maximum, base * 2)
        return base * (0.5 + 0.5 * self._rng.random())


@dataclass(eq=False)
class Session:
    """One connection of the client to the coordinator, and the TCP connections it carries."""

    number: int
    client: Client
    nursery: trio.Nursery  # the connections' tasks: the session ends after the last one
    _locks: dict[str, trio.Lock] = field(default_factory=dict)

    def lock(self, peer: str) -> trio.Lock:
        """Held while opening a stream to ``peer``: the first one may open a direct channel,
        and the others should wait for it rather than go through the coordinator."""
        return self._locks.setdefault(peer, trio.Lock())


class CoordinatorLink:
    """Keeps a client connected to the coordinator, reconnecting with backoff, forever.

    ``current`` is the live session, or None while there is none. ``on_incoming`` is called
    (synchronously) with each stream another party opens to the client.
    """

    def __init__(
        self, config: ClientConfig, on_incoming: Callable[[Session, IncomingStream], None]
    ) -> None:
        self.config = config
        self.current: Session | None = None
        self._on_incoming = on_incoming
        self._numbers = itertools.count(1)
        self.backoff = Backoff()

    @property
    def where(self) -> str:
        return _format_address(self.config.coord_host, self.config.coord_port)

    async def run(self) -> None:
        """Connect, and connect again whenever the connection is lost (never returns)."""
        async with trio.open_nursery() as sessions:
            while True:
                lost = trio.Event()
                try:
                    await sessions.start(self._session, lost)
                except (ConecError, OSError) as exc:
                    delay = self.backoff.next_delay()
                    if isinstance(exc, IdInUseError):
                        why = (
                            f"the coordinator still has a client named {self.config.id!r} "
                            "(an earlier run of this program, until it times out?)"
                        )
                    else:
                        why = str(exc)
                    _say(
                        f"cannot connect to the coordinator at {self.where}: {why}; "
                        f"retrying in {delay:.1f} s"
                    )
                    await trio.sleep(delay)
                    continue
                self.backoff.reset()
                await lost.wait()
                await trio.sleep(self.backoff.next_delay())

    async def _session(
        self, lost: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        number = next(self._numbers)
        started = False
        try:
            async with open_client(self.config) as client, trio.open_nursery() as nursery:
                session = Session(number, client, nursery)
                self.current = session
                started = True
                task_status.started()
                _say(f"connected to the coordinator at {self.where} as {client.id!r}")
                reason = "the client closed"
                try:
                    async for incoming in client.incoming_streams:
                        self._on_incoming(session, incoming)
                except trio.BrokenResourceError as exc:
                    reason = str(exc) or "connection lost"
                finally:
                    if self.current is session:
                        self.current = None
                    lost.set()
                _say(f"lost the coordinator ({reason}); reconnecting")
                if nursery.child_tasks:
                    _say(
                        f"{len(nursery.child_tasks)} connection(s) of the lost session go on "
                        "until they end"
                    )
                # Leaving the nursery waits for this session's connections: those over a
                # direct channel go on without the coordinator.
        except Exception:
            if not started:
                raise
            # Leaving a lost client's block raises nothing by contract; anything else is a
            # bug, and must not take the program (and every other connection) down.
            log.exception("session %d ended with an unexpected error", number)
        finally:
            lost.set()


# --- moving bytes ----------------------------------------------------------------------------


@dataclass
class SpliceResult:
    """What :func:`splice` did: bytes each way, and why it was cut short (None: clean end)."""

    sent: int = 0  # from the TCP socket into the stream
    received: int = 0  # from the stream out to the TCP socket
    error: str | None = None


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc)
    if cause is not None and isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return text or type(exc).__name__


async def _abort_stream(send: trio.abc.SendChannel[bytes]) -> None:
    """Reset a stream both ways, so the peer sees ``BrokenResourceError`` and not a clean end
    (which it would take for a TCP half-close)."""
    if isinstance(send, MessageSendChannel):
        await send.abort()
    else:
        await send.aclose()


def _reset_tcp(tcp: trio.SocketStream) -> None:
    """Make the coming close a TCP reset (RST), not an orderly end (FIN)."""
    with contextlib.suppress(OSError):
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _close_all(
    tcp: trio.SocketStream,
    send: trio.abc.SendChannel[bytes],
    recv: trio.abc.ReceiveChannel[bytes],
    error: str | None,
) -> None:
    """Close the TCP connection and both stream ends: cleanly, or as resets after ``error``."""
    with trio.CancelScope(shield=True):
        if error is not None:
            await _abort_stream(send)
            _reset_tcp(tcp)
        for resource in (send, recv, tcp):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await resource.aclose()


async def splice(
    tcp: trio.SocketStream,
    send: trio.abc.SendChannel[bytes],
    recv: trio.abc.ReceiveChannel[bytes],
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
                        abort(f"TCP connection broke: {_why(exc)}")
                        return
                    if not data:
                        break
                    try:
                        await send.send(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        abort(f"stream broke: {_why(exc)}")
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
                        abort(f"stream broke: {_why(exc)}")
                        return
                    try:
                        await tcp.send_all(data)
                    except trio.BrokenResourceError as exc:
                        abort(f"TCP connection broke: {_why(exc)}")
                        return
                    result.received += len(data)
                try:
                    await tcp.send_eof()
                except trio.BrokenResourceError as exc:
                    abort(f"TCP connection broke: {_why(exc)}")

            nursery.start_soon(tcp_to_stream)
            nursery.start_soon(stream_to_tcp)
    except BaseException:
        if result.error is None:
            result.error = "cancelled"
        raise
    finally:
        await _close_all(tcp, send, recv, result.error)
    return result


def _tcp_peer(tcp: trio.SocketStream) -> str:
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "?"
    return _format_address(str(host), int(port))


def _summary(result: SpliceResult, seconds: float) -> str:
    how = "closed" if result.error is None else f"broken ({result.error})"
    return (
        f"{how} after {seconds:.1f} s: {_fmt_bytes(result.sent)} sent, "
        f"{_fmt_bytes(result.received)} received"
    )


# --- forward ---------------------------------------------------------------------------------


class Forwarder:
    """``conec-trio forward``: local TCP listeners whose connections go to peers' targets."""

    def __init__(self, config: ClientConfig, mappings: Sequence[Mapping]) -> None:
        self.config = config
        self.mappings = list(mappings)
        self.link = CoordinatorLink(config, self._refuse_incoming)
        self._ids = itertools.count(1)

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[list[tuple[Mapping, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen (raising ``OSError`` if a port cannot be bound), report ``(mapping,
        bound port)`` pairs to ``task_status``, then serve until cancelled."""
        bound: list[tuple[Mapping, trio.SocketListener]] = []
        try:
            for mapping in self.mappings:
                try:
                    listeners = await trio.open_tcp_listeners(mapping.local_port, host="127.0.0.1")
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"cannot listen on 127.0.0.1:{mapping.local_port}: {exc.strerror or exc}",
                    ) from exc
                for listener in listeners:
                    assert isinstance(listener, trio.SocketListener)
                    bound.append((mapping, listener))
            async with trio.open_nursery() as nursery:
                for mapping, listener in bound:
                    nursery.start_soon(self._accept_loop, listener, mapping, nursery)
                ports = [int(listener.socket.getsockname()[1]) for _, listener in bound]
                task_status.started([(m, p) for (m, _), p in zip(bound, ports, strict=True)])
                await self.link.run()
        finally:
            for _, listener in bound:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    def _refuse_incoming(self, session: Session, incoming: IncomingStream) -> None:
        log.warning("refusing a stream from %r: this program only forwards", incoming.peer)
        session.nursery.start_soon(_close_quietly, incoming.send, incoming.recv)

    async def _accept_loop(
        self, listener: trio.SocketListener, mapping: Mapping, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                tcp = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.error("cannot accept on port %d: %s; retrying", mapping.local_port, exc)
                await trio.sleep(0.1)
                continue
            cid = next(self._ids)
            label = f"#{cid} {_tcp_peer(tcp)} -> {mapping.peer} -> {mapping.target}"
            session = self.link.current
            if session is None:
                log.warning(
                    "%s: refused: not connected to the coordinator at %s (reconnecting)",
                    label,
                    self.link.where,
                )
                nursery.start_soon(_close_quietly, tcp)
                continue
            session.nursery.start_soon(self._connection, session, tcp, mapping, label)

    async def _connection(
        self, session: Session, tcp: trio.SocketStream, mapping: Mapping, label: str
    ) -> None:
        started = trio.current_time()
        log.info("%s: new connection", label)
        try:
            opened = await self._open(session, mapping, label)
            if opened is None:
                return
            send, recv = opened
            how = "direct" if send.stream_id.is_direct else "through the coordinator"
            log.info("%s: connected (%s)", label, how)
            result = await splice(tcp, send, recv)
            log.info("%s: %s", label, _summary(result, trio.current_time() - started))
        except Exception:
            log.exception("%s: unexpected error", label)
        finally:
            with trio.CancelScope(shield=True):
                await tcp.aclose()

    async def _open(
        self, session: Session, mapping: Mapping, label: str
    ) -> tuple[MessageSendChannel, MessageReceiveChannel] | None:
        """A stream to ``mapping.peer`` that accepted our request, or None (said why)."""
        peer = mapping.peer
        request = {"host": mapping.target.host, "port": mapping.target.port}
        proxied = False
        for attempt in (1, 2):
            try:
                with trio.fail_after(OPEN_TIMEOUT):
                    async with session.lock(peer):
                        if proxied:
                            send, recv = await session.client.new_proxied_stream(peer)
                        else:
                            send, recv = await session.client.new_stream(peer)
            except PeerNotFoundError:
                log.warning("%s: refused: peer %r is not connected to the coordinator", label, peer)
                return None
            except DisconnectedError:
                log.warning("%s: refused: lost the coordinator", label)
                return None
            except ConecError as exc:
                log.warning("%s: refused: cannot open a stream to %r: %s", label, peer, exc)
                return None
            except trio.TooSlowError:
                log.warning("%s: refused: no stream to %r within %g s", label, peer, OPEN_TIMEOUT)
                return None
            try:
                await CborSendChannel(send).send(request)
                with trio.fail_after(REPLY_TIMEOUT):
                    reply = await CborReceiveChannel(recv).receive()
            except trio.BrokenResourceError as exc:
                await _abort_stream(send)
                await _close_quietly(send, recv)
                if attempt == 1 and send.stream_id.is_direct:
                    # A direct channel to a peer that restarted breaks only now: try again
                    # through the coordinator, which knows the peer's current connection.
                    log.info(
                        "%s: the direct channel broke before the answer (%s); "
                        "retrying through the coordinator",
                        label,
                        _why(exc),
                    )
                    proxied = True
                    continue
                log.warning("%s: refused: the stream broke before the answer: %s", label, _why(exc))
                return None
            except (trio.EndOfChannel, trio.TooSlowError, ProtocolError) as exc:
                await _abort_stream(send)
                await _close_quietly(send, recv)
                why = {
                    trio.EndOfChannel: f"{peer!r} ended the stream without an answer",
                    trio.TooSlowError: f"no answer from {peer!r} within {REPLY_TIMEOUT:g} s",
                }.get(type(exc), f"bad answer from {peer!r}: {exc}")
                log.warning("%s: refused: %s", label, why)
                return None
            if isinstance(reply, dict) and reply.get("ok") is True:
                return send, recv
            reason = reply.get("reason") if isinstance(reply, dict) else None
            if not isinstance(reason, str):
                reason = f"unexpected answer {reply!r:.100}"
            log.warning("%s: refused by %r: %s", label, peer, reason)
            await _close_quietly(send, recv)
            return None
        return None  # pragma: no cover (the second attempt always returns)


async def _close_quietly(*resources: trio.abc.AsyncResource) -> None:
    with trio.CancelScope(shield=True):
        for resource in resources:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await resource.aclose()


# --- expose ----------------------------------------------------------------------------------


class Exposer:
    """``conec-trio expose``: connects streams from allowed peers to allowed TCP targets."""

    def __init__(
        self, config: ClientConfig, allow: Sequence[Target], peers: Sequence[str] = ()
    ) -> None:
        self.config = config
        self.allowed = {target.key for target in allow}
        self.peers = frozenset(peers)
        self.link = CoordinatorLink(config, self._incoming)
        self._ids = itertools.count(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        task_status.started()
        await self.link.run()

    def _incoming(self, session: Session, incoming: IncomingStream) -> None:
        how = "direct" if incoming.stream_id.is_direct else "through the coordinator"
        label = f"#{next(self._ids)} from {incoming.peer} ({how})"
        session.nursery.start_soon(self._serve, incoming, label)

    async def _serve(self, incoming: IncomingStream, label: str) -> None:
        send, recv = incoming.send, incoming.recv
        try:
            await self._serve_stream(incoming.peer, send, recv, label)
        except Exception:
            log.exception("%s: unexpected error", label)
            await _abort_stream(send)
            await _close_quietly(send, recv)

    async def _serve_stream(
        self,
        peer: str | None,
        send: trio.abc.SendChannel[bytes],
        recv: trio.abc.ReceiveChannel[bytes],
        label: str,
    ) -> None:
        started = trio.current_time()
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await CborReceiveChannel(recv).receive()
        except (trio.EndOfChannel, trio.BrokenResourceError):
            log.info("%s: the stream ended before its request", label)
            await _close_quietly(send, recv)
            return
        except ProtocolError as exc:
            await _refuse(send, recv, label, f"bad request: {exc}")
            return
        except trio.TooSlowError:
            await _refuse(send, recv, label, f"no request within {REQUEST_TIMEOUT:g} s")
            return
        target = _parse_request(request)
        if target is None:
            await _refuse(send, recv, label, f"bad request {request!r:.100}")
            return
        label = f"{label} -> {target}"
        if self.peers and peer not in self.peers:
            await _refuse(send, recv, label, f"peer {peer!r} may not use this exposer")
            return
        if target.key not in self.allowed:
            await _refuse(send, recv, label, f"target {target} is not allowed")
            return
        try:
            with trio.fail_after(TARGET_CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(target.host, target.port)
        except OSError as exc:
            await _refuse(send, recv, label, f"cannot connect to {target}: {_connect_error(exc)}")
            return
        except trio.TooSlowError:
            await _refuse(
                send,
                recv,
                label,
                f"cannot connect to {target}: no answer within {TARGET_CONNECT_TIMEOUT:g} s",
            )
            return
        try:
            await CborSendChannel(send).send({"ok": True})
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: the stream broke before the answer: %s", label, _why(exc))
            await _close_all(tcp, send, recv, "stream broke")
            return
        log.info("%s: connected", label)
        result = await splice(tcp, send, recv)
        log.info("%s: %s", label, _summary(result, trio.current_time() - started))


def _connect_error(exc: OSError) -> str:
    """Why ``trio.open_tcp_stream`` failed, in the OS's words ("Connection refused"): it
    raises one OSError for all its attempts, with each attempt's error in a group."""
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):
        reasons = [e.strerror for e in group.exceptions if isinstance(e, OSError) and e.strerror]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return exc.strerror or str(exc)


def _parse_request(request: Any) -> Target | None:
    if not isinstance(request, dict):
        return None
    host, port = request.get("host"), request.get("port")
    if not isinstance(host, str) or not 0 < len(host) <= 255:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
        return None
    return Target(host, port)


async def _refuse(
    send: trio.abc.SendChannel[bytes],
    recv: trio.abc.ReceiveChannel[bytes],
    label: str,
    reason: str,
) -> None:
    log.warning("%s: refused: %s", label, reason)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await CborSendChannel(send).send({"ok": False, "reason": reason})
    await _close_quietly(send, recv)


# --- command line ----------------------------------------------------------------------------


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _peer_id(text: str) -> str:
    try:
        return check_client_id(text)
    except InvalidIdError as exc:
        raise ValueError(str(exc)) from None


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", required=True, metavar="NAME", help="this client's id")
    parser.add_argument(
        "--coord",
        required=True,
        metavar="HOST:PORT",
        type=_argtype(parse_host_port),
        help="the coordinator (HOST is also the name its certificate must be valid for)",
    )
    parser.add_argument(
        "--ca",
        metavar="PEM",
        type=Path,
        help="CA of the coordinator's certificate (default: "
        "the system trust store); a coordinator's self-signed certificate works too",
    )
    parser.add_argument("--cert", metavar="PEM", type=Path, help="this client's certificate")
    parser.add_argument("--key", metavar="PEM", type=Path, help="private key of --cert")
    parser.add_argument(
        "--client-ca",
        metavar="PEM",
        type=Path,
        help="CA that peers' certificates must chain to for direct channels",
    )
    parser.add_argument(
        "--no-listen",
        action="store_true",
        help="accept no direct channels (streams to this client go through the coordinator)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="drop a silent connection after this long (the lower of both sides' settings "
        "counts); a lost coordinator or peer is noticed within it",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log every connection: who, to what, how many bytes, why it ended (-vv: debug)",
    )


def add_forward_command(subparsers: Any) -> None:
    """Register ``conec-trio forward``."""
    parser = subparsers.add_parser(
        "forward",
        help="forward local TCP ports to targets behind other clients",
        description="Listen on 127.0.0.1:LOCAL_PORT for each mapping; each TCP connection "
        "becomes one stream to PEER (direct when a channel can be made, else through the "
        "coordinator), whose 'conec-trio expose' connects it to TARGET_HOST:TARGET_PORT. "
        "Bytes flow both ways until both sides closed, half-close included. The coordinator "
        "is retried with backoff at start and after any loss; meanwhile new TCP connections "
        "are closed at once. Prints 'forwarding 127.0.0.1:PORT -> PEER -> TARGET' for each "
        "mapping once listening (LOCAL_PORT 0 picks a free port). Ctrl-C exits with status 0.",
    )
    parser.add_argument(
        "mappings",
        nargs="+",
        metavar="LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT",
        type=_argtype(parse_mapping),
    )
    _add_client_options(parser)
    parser.set_defaults(run=run_forward_command)


def add_expose_command(subparsers: Any) -> None:
    """Register ``conec-trio expose``."""
    parser = subparsers.add_parser(
        "expose",
        help="connect forwarding streams from other clients to local TCP targets",
        description="The server side of TCP port forwarding: accept streams from "
        "'conec-trio forward' clients (only the --peer ones, if any are given) and connect "
        "each to its target if --allow lists it (the same host name and port, exactly); "
        "anything else is refused with a reason the forwarding side logs. The coordinator "
        "is retried with backoff at start and after any loss. Ctrl-C exits with status 0.",
    )
    parser.add_argument(
        "--allow",
        action="append",
        required=True,
        metavar="HOST:PORT",
        type=_argtype(parse_host_port),
        help="a target peers may reach (repeatable)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME",
        type=_argtype(_peer_id),
        help="a client id that may use this exposer (repeatable; default: any client)",
    )
    _add_client_options(parser)
    parser.set_defaults(run=run_expose_command)


def _client_config(args: argparse.Namespace) -> ClientConfig:
    """The client settings the options give; ``ValueError`` / ``ConecError`` if they are bad."""
    check_client_id(args.id)
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together: give both, or neither")
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        raise ValueError("--idle-timeout must be a positive number of seconds")
    coord: Target = args.coord
    return ClientConfig(
        id=args.id,
        coord_host=coord.host,
        coord_port=coord.port,
        ca=read_pem_option(args.ca, "--ca"),
        cert_chain=read_pem_option(args.cert, "--cert"),
        private_key=read_pem_option(args.key, "--key"),
        client_ca=read_pem_option(args.client_ca, "--client-ca"),
        listen=not args.no_listen,
        idle_timeout=args.idle_timeout,
        connect_timeout=COORD_CONNECT_TIMEOUT,
    )


def _run_until_signal(
    serve: Callable[..., Any], on_started: Callable[[Any], None], name: str
) -> int:
    """Run ``serve`` (started with ``nursery.start``) until SIGINT or SIGTERM: exit status 0
    then, 1 if it failed."""

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    info = await nursery.start(serve)
                except OSError as exc:
                    return _error(str(exc.strerror or exc))
                on_started(info)
                async for signum in signals:
                    _say(f"{name} stopped ({signal.Signals(signum).name})")
                    nursery.cancel_scope.cancel()
                    break
        return 0

    try:
        return trio.run(main)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was in place
        _say(f"{name} stopped")
        return 0


def run_forward_command(args: argparse.Namespace) -> int:
    """``conec-trio forward``: returns the exit status."""
    _setup_logging(args.verbose)
    try:
        config = _client_config(args)
    except (ValueError, ConecError) as exc:
        return _error(str(exc))
    forwarder = Forwarder(config, args.mappings)

    def started(bound: list[tuple[Mapping, int]]) -> None:
        for mapping, port in bound:
            _say(f"forwarding 127.0.0.1:{port} -> {mapping.peer} -> {mapping.target}")

    return _run_until_signal(forwarder.run, started, "forward")


def run_expose_command(args: argparse.Namespace) -> int:
    """``conec-trio expose``: returns the exit status."""
    _setup_logging(args.verbose)
    try:
        config = _client_config(args)
    except (ValueError, ConecError) as exc:
        return _error(str(exc))
    exposer = Exposer(config, args.allow, args.peer)
    peers = ", ".join(exposer.peers) if exposer.peers else "any client"

    def started(_: object) -> None:
        _say(f"exposing {', '.join(str(t) for t in args.allow)} to {peers} as {config.id!r}")

    return _run_until_signal(exposer.run, started, "expose")
