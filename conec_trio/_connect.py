"""Connecting to the coordinator: resolve, race every address, the hello and its answer.

``Dialer.dial`` returns a ``Link``: the one QUIC connection to the coordinator that won, its
stream table and its control stream. The client decides what to do with it; nothing here
knows the ``Client`` class.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ._config import ClientConfig
from ._exceptions import (
    CertificateError,
    ConecError,
    ConnectError,
    DisconnectedError,
    IdInUseError,
    InvalidIdError,
    ProtocolError,
    RefusedError,
    VersionMismatchError,
)
from ._quic import (
    ConnectionListener,
    ConnectionSettings,
    DatagramSocket,
    QuicConn,
    QuicEndpoint,
    make_udp_socket,
)
from ._streams import StreamState, StreamTable, read_header, write_message
from ._util import wait_any
from ._wire import control
from ._wire.codes import CloseCode

Address = tuple[Any, ...]

_CLOSE_ERRORS: dict[int, type[ConecError]] = {
    CloseCode.VERSION: VersionMismatchError,
    CloseCode.ID_TAKEN: IdInUseError,
    CloseCode.BAD_ID: InvalidIdError,
    CloseCode.CERTIFICATE: CertificateError,
    CloseCode.LIMIT: RefusedError,
    CloseCode.PROTOCOL: ProtocolError,
}


def close_error(conn: QuicConn, host: str, port: int) -> ConecError:
    """Turn a connection that closed during setup into the error a user can act on."""
    code = conn.close_error_code or 0
    reason = conn.close_reason
    if code in _CLOSE_ERRORS:
        return _CLOSE_ERRORS[code](f"coordinator at {host}:{port} refused this client: {reason}")
    if 0x100 <= code < 0x200:  # a TLS alert, from either side
        return CertificateError(
            f"TLS handshake with the coordinator at {host}:{port} failed: {reason or 'alert'} "
            f"(check the coordinator's certificate, the 'ca' setting (--ca) and 'coord_host' "
            "(--coord))"
        )
    if reason == "Idle timeout":
        return ConnectError(f"no answer from the coordinator at {host}:{port}")
    return ConnectError(
        f"connection to the coordinator at {host}:{port} closed: {reason or f'code {code:#x}'}"
    )


def local_addrs(endpoint: QuicEndpoint, peer: Address) -> list[tuple[str, int]]:
    """This client's own view of its address (a peer on the same LAN can use it)."""
    host, port = endpoint.local_address[:2]
    if host not in ("0.0.0.0", "::"):
        return [(str(host), int(port))]
    # The address the OS would send from towards the coordinator (no packet is sent).
    probe = socket.socket(endpoint.sock.family, socket.SOCK_DGRAM)
    try:
        probe.connect(peer[:2])
        return [(str(probe.getsockname()[0]), int(port))]
    except OSError:
        return []
    finally:
        probe.close()


@dataclass
class Link:
    """The coordinator connection that won: connection, socket endpoint, streams, control
    stream, and the address the coordinator sees this client at."""

    conn: QuicConn
    endpoint: QuicEndpoint
    table: StreamTable
    control: StreamState
    observed_address: tuple[str, int] | None = None


class _HelloOnHandshake(ConnectionListener):
    """Listens to one connection attempt until its handshake completes."""

    def __init__(self, dialer: Dialer, endpoint: QuicEndpoint) -> None:
        self._dialer = dialer
        self.endpoint = endpoint
        self.local: list[tuple[str, int]] | None = None  # this client's own address view

    def handshake_completed(self, conn: QuicConn) -> None:
        if self.local is None:
            self.local = local_addrs(self.endpoint, conn.peer_address)
        self._dialer.say_hello(conn, self.local, self.endpoint)


class Dialer:
    """One attempt to connect to the coordinator (see the module docstring)."""

    def __init__(
        self,
        config: ClientConfig,
        client_id: str,
        nursery: trio.Nursery,
        settings: ConnectionSettings,
        make_identity: Callable[[], object],
        sockets: list[DatagramSocket],
        on_new_stream: Callable[[StreamState], None],
        on_terminated: Callable[[QuicConn, int, str], None],
    ) -> None:
        self.config = config
        self.id = client_id
        self._nursery = nursery
        self._settings = settings
        self._make_identity = make_identity
        self._sockets = sockets  # every socket opened, for the client to close at the end
        self._on_new_stream = on_new_stream
        self._on_terminated = on_terminated
        self._link: Link | None = None
        self._deadline = math.inf  # set by dial: when connecting gives up

    async def dial(
        self, endpoint: QuicEndpoint | None = None, handshake_timeout: float | None = None
    ) -> Link:
        """Connect and say hello (then ``await_welcome``); raises a ``ConecError`` subclass
        that says what went wrong.

        With ``endpoint`` (a reconnect), every attempt goes out from that one socket: direct
        channels live on it, and so does the NAT mapping peers know this client by.
        ``handshake_timeout`` bounds this attempt (default: the config's ``connect_timeout``).
        """
        cfg = self.config
        host, port = cfg.coord_host, cfg.coord_port
        # One deadline for the whole of connecting: resolution, handshake, welcome.
        timeout = cfg.connect_timeout if handshake_timeout is None else handshake_timeout
        self._deadline = trio.current_time() + timeout
        infos = None
        # trio resolves in a worker thread that it abandons when cancelled, so a resolver
        # that hangs cannot hold open_client past connect_timeout.
        with trio.move_on_at(self._deadline):
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                raise ConnectError(f"cannot resolve the coordinator host {host!r}: {exc}") from exc
        if infos is None:
            raise ConnectError(f"resolving {host} took longer than connect_timeout ({timeout:g} s)")
        errors: list[ConecError] = []
        # (the scope of the endpoint's task, or None for the given endpoint; endpoint; conn)
        attempts: list[tuple[trio.CancelScope | None, QuicEndpoint, QuicConn]] = []
        # Every resolved address is tried at once ("localhost" may be ::1 or 127.0.0.1);
        # the first finished handshake wins.
        # Full socket addresses: an AF_INET6 socket reports senders as 4-tuples, and aioquic
        # only accepts packets from the exact address it dialled.
        for family, addr in dict.fromkeys((info[0], tuple(info[4])) for info in infos):
            if endpoint is not None:
                if family == endpoint.sock.family:
                    try:
                        conn = endpoint.connect(addr, self._settings)
                    except trio.ClosedResourceError:
                        raise ConnectError("this client's socket has closed") from None
                    conn.listener = _HelloOnHandshake(self, endpoint)
                    attempts.append((None, endpoint, conn))
                continue
            bind_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
            try:
                sock = make_udp_socket(family, bind_host, 0)
            except OSError as exc:
                errors.append(ConnectError(f"cannot open a UDP socket towards {addr}: {exc}"))
                continue
            scope = trio.CancelScope()
            new_endpoint: QuicEndpoint = await self._nursery.start(self._run_endpoint, sock, scope)
            conn = new_endpoint.connect(addr, self._settings)
            conn.listener = _HelloOnHandshake(self, new_endpoint)
            attempts.append((scope, new_endpoint, conn))
        if endpoint is not None and not attempts:
            raise ConnectError(
                f"the coordinator host {host!r} has no address of this client's socket's family"
            )
        # The ClientHello carries no certificate: send it, then make an ephemeral identity
        # (and the rest of the hello) while the coordinator answers; a handshake that gets
        # there first makes them itself.
        for _, _, conn in attempts:
            await conn.transmit()
        for _, attempt_endpoint, conn in attempts:
            listener = conn.listener
            if isinstance(listener, _HelloOnHandshake) and listener.local is None:
                listener.local = local_addrs(attempt_endpoint, conn.peer_address)
        self._make_identity()

        with trio.move_on_at(self._deadline):
            async with trio.open_nursery() as watchers:
                for _, _, conn in attempts:
                    watchers.start_soon(self._watch_attempt, conn, attempts, watchers.cancel_scope)
        # The winner (if any) was chosen, and said its hello, when its handshake completed.
        link = self._link
        for attempt_scope, _, conn in attempts:
            if link is None or conn is not link.conn:
                if conn.is_open:
                    conn.close(int(CloseCode.NORMAL), "another address answered first")
                    await conn.transmit()
                else:
                    errors.append(close_error(conn, host, port))
                if attempt_scope is not None:
                    attempt_scope.cancel()
        if link is None:
            raise self._best_error(errors, host, port)
        return link

    @staticmethod
    async def _watch_attempt(
        conn: QuicConn,
        attempts: list[tuple[trio.CancelScope | None, QuicEndpoint, QuicConn]],
        done: trio.CancelScope,
    ) -> None:
        await wait_any(conn.handshake_complete, conn.closed)
        if conn.handshake_complete.is_set() or all(not c.is_open for _, _, c in attempts):
            done.cancel()

    async def _run_endpoint(
        self,
        sock: DatagramSocket,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[QuicEndpoint] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # The socket outlives this task: open_client closes it last, after the goodbyes.
        self._sockets.append(sock)
        with scope:
            async with trio.open_nursery() as nursery:
                endpoint = QuicEndpoint(sock, nursery)
                # No need to wait for the receive loop: datagrams wait in the socket.
                nursery.start_soon(endpoint.run)
                task_status.started(endpoint)

    def _best_error(self, errors: list[ConecError], host: str, port: int) -> ConecError:
        # A certificate problem or a refusal says more than a silence.
        for err in errors:
            if not isinstance(err, ConnectError):
                return err
        return ConnectError(
            f"no answer from the coordinator at {host}:{port} within "
            f"{self.config.connect_timeout:g} s (is it running, and are host and port right?)"
        )

    def say_hello(
        self, conn: QuicConn, local: list[tuple[str, int]], endpoint: QuicEndpoint
    ) -> None:
        """The first attempt whose handshake completes wins: its control stream opens and
        the hello goes out at once, in the same flight as the client's TLS Finished (1-RTT
        data may follow the Finished), so registration costs no round trip of its own.
        The server's certificate was verified before the Finished; the coordinator checks
        ours with the Finished, which it reads before the hello."""
        if self._link is not None or not conn.is_open:
            return
        table = StreamTable(
            conn,
            window=self.config.stream_window,
            max_message_size=self.config.max_message_size,
            on_new_stream=self._on_new_stream,
            on_terminated=self._on_terminated,
            describe_loss=lambda: DisconnectedError(
                f"client {self.id!r} lost its connection to the coordinator"
            ),
        )
        st = table.open_stream()
        self._link = Link(conn, endpoint, table, st)
        write_message(
            st,
            control.encode(
                control.Hello(control.PROTOCOL_VERSION, self.id, self.config.listen, local)
            ),
        )
        conn.expedite()

    async def await_welcome(self, link: Link) -> None:
        """Wait for the coordinator's answer to the hello ``say_hello`` sent."""
        conn, st = link.conn, link.control
        host, port = self.config.coord_host, self.config.coord_port
        try:
            with trio.fail_at(self._deadline):
                reply = control.decode(await read_header(st))
        except trio.TooSlowError:
            raise ConnectError(
                f"the coordinator at {host}:{port} did not answer the hello"
            ) from None
        except ConecError:
            await trio.lowlevel.checkpoint()
            if not conn.is_open:
                raise close_error(conn, host, port) from None
            raise
        if not isinstance(reply, control.Welcome):
            raise ProtocolError(f"the coordinator answered the hello with {type(reply).__name__}")
        if reply.version != control.PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"protocol version mismatch: the client speaks version {control.PROTOCOL_VERSION},"
                f" the coordinator speaks version {reply.version}"
            )
        link.observed_address = reply.observed_addr
