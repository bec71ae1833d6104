"""The client: its coordinator connection, streams, incoming streams and direct channels."""

from __future__ import annotations

import itertools
import logging
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import _tls
from ._config import (
    DEFAULT_IDLE_TIMEOUT,
    KEEPALIVE_FRACTION,
    ClientConfig,
    canonical_id,
    check_client_id,
    load_pem,
)
from ._direct import DirectManager
from ._exceptions import (
    BroadcastNotFoundError,
    CertificateError,
    ChannelError,
    ConecError,
    ConnectError,
    DisconnectedError,
    IdInUseError,
    InvalidIdError,
    PeerNotFoundError,
    ProtocolError,
    RefusedError,
    StreamIdInUseError,
    VersionMismatchError,
)
from ._quic import ConnectionListener, DatagramSocket, QuicConn, QuicEndpoint, make_udp_socket
from ._streams import (
    MessageReceiveChannel,
    MessageSendChannel,
    StreamState,
    StreamTable,
    message_channels,
    read_header,
    write_message,
)
from ._types import BroadcastMessage, IncomingStream, StreamId
from ._util import system_ca_location, unwrap_single_exception, wait_any
from ._wire import control
from ._wire.codes import CloseCode, StreamCode

log = logging.getLogger("conec_trio.client")

# How long a client waits at exit for its cleanly closed streams to be acknowledged.
FLUSH_TIMEOUT = 2.0

_CLOSE_ERRORS: dict[int, type[ConecError]] = {
    CloseCode.VERSION: VersionMismatchError,
    CloseCode.ID_TAKEN: IdInUseError,
    CloseCode.BAD_ID: InvalidIdError,
    CloseCode.CERTIFICATE: CertificateError,
    CloseCode.LIMIT: RefusedError,
    CloseCode.PROTOCOL: ProtocolError,
}


def _close_error(conn: QuicConn, host: str, port: int) -> ConecError:
    """Turn a connection that closed during setup into the error a user can act on."""
    code = conn.close_error_code or 0
    reason = conn.close_reason
    if code in _CLOSE_ERRORS:
        return _CLOSE_ERRORS[code](f"coordinator at {host}:{port} refused this client: {reason}")
    if 0x100 <= code < 0x200:  # a TLS alert, from either side
        return CertificateError(
            f"TLS handshake with the coordinator at {host}:{port} failed: {reason or 'alert'} "
            f"(check the coordinator's certificate, the 'ca' setting and 'coord_host')"
        )
    if reason == "Idle timeout":
        return ConnectError(f"no answer from the coordinator at {host}:{port}")
    return ConnectError(
        f"connection to the coordinator at {host}:{port} closed: {reason or f'code {code:#x}'}"
    )


class _IncomingStreams(trio.abc.ReceiveChannel[IncomingStream]):
    """``client.incoming_streams``: breaks (rather than ends) when the coordinator is lost."""

    def __init__(self, client: Client, recv: trio.MemoryReceiveChannel[IncomingStream]) -> None:
        self._client = client
        self._recv = recv

    async def receive(self) -> IncomingStream:
        """The next stream another party opened to this client.

        Raises ``trio.BrokenResourceError`` once the coordinator connection is lost and no
        stream is left, ``trio.EndOfChannel`` after the client block ended.
        """
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            if self._client._lost is not None:
                raise trio.BrokenResourceError(str(self._client._lost)) from self._client._lost
            raise

    async def aclose(self) -> None:
        await self._recv.aclose()


class _HelloOnHandshake(ConnectionListener):
    """Listens to one connection attempt until its handshake completes."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.local: list[tuple[str, int]] | None = None  # this client's own address view

    def handshake_completed(self, conn: QuicConn) -> None:
        if self.local is None:
            self.local = Client._local_addrs(conn.endpoint, conn.peer_address)
        self._client._say_hello(conn, self.local)


class Client:
    """A client connected to a coordinator (see ``open_client``)."""

    def __init__(self, config: ClientConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.id = check_client_id(config.id)
        self._nursery = nursery
        self._conn: QuicConn | None = None
        self._endpoint: QuicEndpoint | None = None
        self._sockets: list[DatagramSocket] = []
        self._table: StreamTable | None = None
        self._control: StreamState | None = None
        self._lost: ConecError | None = None
        self._rid = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[Any]] = {}
        self._proxied_ids: set[int] = set()
        self._next_proxied = 0
        self.observed_address: tuple[str, int] | None = None
        incoming_send, incoming_recv = trio.open_memory_channel[IncomingStream](math.inf)
        self._incoming_send = incoming_send
        self.incoming_streams: trio.abc.ReceiveChannel[IncomingStream] = _IncomingStreams(
            self, incoming_recv
        )
        cert_pem = load_pem(config.cert_chain)
        key_pem = load_pem(config.private_key)
        self._certificate: x509.Certificate | None = None
        self._certificate_chain: list[x509.Certificate] = []
        self._private_key: PrivateKeyTypes | None = None
        if cert_pem is not None and key_pem is not None:
            chain = _tls.load_cert_chain_pem(cert_pem)
            self._certificate = chain[0]
            self._certificate_chain = chain[1:]
            self._private_key = _tls.load_private_key(key_pem)
        # else: an ephemeral identity, made by _identity() while the first flight is out
        self._ca = load_pem(config.ca)
        self._client_ca = load_pem(config.client_ca)
        self._direct = DirectManager(self)
        self._direct_ids: set[int] = set()
        self._idle_timeout = config.idle_timeout or DEFAULT_IDLE_TIMEOUT

    # -- connecting ------------------------------------------------------------------------------

    def _identity(self) -> tuple[x509.Certificate, list[x509.Certificate], PrivateKeyTypes]:
        """This client's certificate, chain and key; an ephemeral one is made on first use."""
        if self._certificate is None or self._private_key is None:
            self._certificate, self._private_key = _tls.ephemeral_identity_objects(self.id)
            self._certificate_chain = []
        return self._certificate, self._certificate_chain, self._private_key

    def quic_config(
        self, *, is_client: bool, server_name: str | None = None, identity: bool = True
    ) -> QuicConfiguration:
        """A QUIC configuration with this client's windows and idle timeout, and its
        identity unless ``identity`` is False (the connection then asks ``_identity``)."""
        cfg = self.config
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[control.ALPN],
            server_name=server_name,
            idle_timeout=self._idle_timeout,
            max_stream_data=cfg.stream_window,
            max_data=cfg.connection_window,
        )
        if identity:
            config.certificate, config.certificate_chain, config.private_key = self._identity()
        return config

    def _coordinator_quic_config(self) -> QuicConfiguration:
        config = self.quic_config(
            is_client=True, server_name=self.config.coord_host, identity=False
        )
        if self._ca is not None:
            config.cadata = self._ca
        else:
            config.cafile, config.capath = system_ca_location()
        return config

    async def _connect(self) -> None:
        cfg = self.config
        host, port = cfg.coord_host, cfg.coord_port
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ConnectError(f"cannot resolve the coordinator host {host!r}: {exc}") from exc
        errors: list[ConecError] = []
        attempts: list[tuple[trio.CancelScope, QuicEndpoint, QuicConn]] = []
        # Every resolved address is tried at once ("localhost" may be ::1 or 127.0.0.1);
        # the first finished handshake wins.
        # Full socket addresses: an AF_INET6 socket reports senders as 4-tuples, and aioquic
        # only accepts packets from the exact address it dialled.
        for family, addr in dict.fromkeys((info[0], tuple(info[4])) for info in infos):
            bind_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
            try:
                sock = make_udp_socket(family, bind_host, 0)
            except OSError as exc:
                errors.append(ConnectError(f"cannot open a UDP socket towards {addr}: {exc}"))
                continue
            scope = trio.CancelScope()
            endpoint: QuicEndpoint = await self._nursery.start(self._run_endpoint, sock, scope)
            conn = endpoint.connect(
                addr,
                self._coordinator_quic_config(),
                keepalive_interval=self._idle_timeout * KEEPALIVE_FRACTION
                if cfg.keepalive
                else None,
                request_client_certificate=False,
                stream_window=cfg.stream_window,
                connection_window=cfg.connection_window,
                max_streams=cfg.max_streams,
                max_datagram_size=cfg.max_datagram_size,
                identity=self._identity,
            )
            conn.listener = _HelloOnHandshake(self)
            attempts.append((scope, endpoint, conn))
        # The ClientHello carries no certificate: send it, then make an ephemeral identity
        # (and the rest of the hello) while the coordinator answers; a handshake that gets
        # there first makes them itself.
        for _, _, conn in attempts:
            await conn.transmit()
        for _, endpoint, conn in attempts:
            listener = conn.listener
            if isinstance(listener, _HelloOnHandshake) and listener.local is None:
                listener.local = self._local_addrs(endpoint, conn.peer_address)
        self._identity()

        with trio.move_on_after(cfg.connect_timeout):
            async with trio.open_nursery() as watchers:
                for _, _, conn in attempts:
                    watchers.start_soon(self._watch_attempt, conn, attempts, watchers.cancel_scope)
        # The winner (if any) was chosen, and said its hello, when its handshake completed.
        winner = self._conn
        for scope, _, conn in attempts:
            if conn is not winner:
                if conn.is_open:
                    conn.close(int(CloseCode.NORMAL), "another address answered first")
                    await conn.transmit()
                else:
                    errors.append(_close_error(conn, host, port))
                scope.cancel()
        if winner is None:
            raise self._best_error(errors, host, port)
        assert self._endpoint is not None
        self._endpoint.raw_datagram_handler = self._direct.raw_datagram
        if cfg.listen:
            # Direct channels arrive on this same socket (and so through the same NAT mapping
            # the coordinator observed).
            self._endpoint.accept_connections(self._direct.server_config, self._direct.accepted)
        await self._hello()

    @staticmethod
    async def _watch_attempt(
        conn: QuicConn,
        attempts: list[tuple[trio.CancelScope, QuicEndpoint, QuicConn]],
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

    def _say_hello(self, conn: QuicConn, local: list[tuple[str, int]]) -> None:
        """The first attempt whose handshake completes wins: its control stream opens and
        the hello goes out at once, in the same flight as the client's TLS Finished (1-RTT
        data may follow the Finished), so registration costs no round trip of its own.
        The server's certificate was verified before the Finished; the coordinator checks
        ours with the Finished, which it reads before the hello."""
        if self._conn is not None or not conn.is_open:
            return
        self._conn = conn
        self._endpoint = conn.endpoint
        self._table = StreamTable(
            conn,
            window=self.config.stream_window,
            max_message_size=self.config.max_message_size,
            on_new_stream=self._new_stream,
            on_terminated=self._terminated,
            describe_loss=lambda: DisconnectedError(
                f"client {self.id!r} lost its connection to the coordinator"
            ),
        )
        st = self._table.open_stream()
        self._control = st
        write_message(
            st,
            control.encode(
                control.Hello(control.PROTOCOL_VERSION, self.id, self.config.listen, local)
            ),
        )
        conn.expedite()

    async def _hello(self) -> None:
        """Wait for the coordinator's answer to the hello ``_say_hello`` sent."""
        conn, st = self._conn, self._control
        assert conn is not None and st is not None
        host, port = self.config.coord_host, self.config.coord_port
        try:
            with trio.fail_after(self.config.connect_timeout):
                reply = control.decode(await read_header(st))
        except trio.TooSlowError:
            raise ConnectError(
                f"the coordinator at {host}:{port} did not answer the hello"
            ) from None
        except ConecError:
            await trio.lowlevel.checkpoint()
            if not conn.is_open:
                raise _close_error(conn, host, port) from None
            raise
        if isinstance(reply, control.Refused):
            raise ConecError(f"coordinator refused this client: {reply.message}")
        if not isinstance(reply, control.Welcome):
            raise ProtocolError(f"the coordinator answered the hello with {type(reply).__name__}")
        if reply.version != control.PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"protocol version mismatch: the client speaks version {control.PROTOCOL_VERSION},"
                f" the coordinator speaks version {reply.version}"
            )
        self.observed_address = reply.observed_addr
        self._nursery.start_soon(self._control_loop, st)

    @staticmethod
    def _local_addrs(endpoint: QuicEndpoint, peer: tuple[Any, ...]) -> list[tuple[str, int]]:
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

    # -- control stream ----------------------------------------------------------------------------

    async def _control_loop(self, st: StreamState) -> None:
        while True:
            try:
                msg = control.decode(await read_header(st))
            except ConecError as exc:
                if self._conn is not None and self._conn.is_open:
                    log.warning("bad control message from the coordinator: %s", exc)
                    self._conn.close(int(CloseCode.PROTOCOL), f"bad control message: {exc}")
                return
            if isinstance(msg, control.ChannelOffer):
                self._nursery.start_soon(self._direct.on_offer, msg)
                continue
            rid = getattr(msg, "rid", None)
            if rid is not None and rid in self._pending:
                self._pending.pop(rid).send_nowait(msg)

    def _send_control(self, msg: Any) -> None:
        if self._control is not None and self._conn is not None and self._conn.is_open:
            write_message(self._control, control.encode(msg))

    async def _request(self, make: Any) -> Any:
        """Send a control request and wait for its reply (matched by request id)."""
        self._check_alive()
        assert self._control is not None
        rid = next(self._rid)
        send, recv = trio.open_memory_channel[Any](1)
        self._pending[rid] = send
        try:
            write_message(self._control, control.encode(make(rid)))
            while True:
                with trio.move_on_after(0.5):
                    return await recv.receive()
                self._check_alive()
        finally:
            self._pending.pop(rid, None)

    def _check_alive(self) -> None:
        if self._lost is not None:
            raise DisconnectedError(str(self._lost)) from self._lost
        if self._conn is None or not self._conn.is_open:
            raise DisconnectedError(f"client {self.id!r} is not connected to the coordinator")

    def _terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        if self._lost is None:
            self._lost = DisconnectedError(
                f"client {self.id!r} lost its connection to the coordinator: {reason or 'closed'}"
            )
        self._incoming_send.close()
        for send in self._pending.values():
            send.close()
        # The contract: losing the coordinator breaks every stream of this client, direct
        # ones included (their peers were vouched for by a coordinator that is gone).
        self._direct.coordinator_lost()

    # -- incoming streams --------------------------------------------------------------------------

    def _new_stream(self, st: StreamState) -> None:
        self._nursery.start_soon(self._accept_stream, st)

    async def _accept_stream(self, st: StreamState) -> None:
        try:
            msg = control.decode(await read_header(st))
        except ConecError as exc:
            st.fail(ProtocolError(f"bad stream header: {exc}"), StreamCode.PROTOCOL)
            return
        if not isinstance(msg, control.IncomingProxied):
            st.fail(
                ProtocolError(f"unexpected stream header {type(msg).__name__}"), StreamCode.PROTOCOL
            )
            return
        sid = StreamId.proxied(msg.sid)
        send, recv = message_channels(st, msg.peer, sid)
        self._deliver_incoming(IncomingStream(msg.peer, sid, send, recv), st)

    def _deliver_incoming(self, incoming: IncomingStream, st: StreamState) -> None:
        try:
            self._incoming_send.send_nowait(incoming)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            st.fail(ConecError("client is shutting down"), StreamCode.ABORTED)

    # -- opening streams ---------------------------------------------------------------------------

    def _id_in_use(self, wanted: StreamId) -> StreamIdInUseError:
        return StreamIdInUseError(f"stream id {wanted!r} is already in use by {self.id!r}")

    def _take_proxied_id(self, wanted: StreamId | None) -> int:
        if wanted is not None:
            if wanted.n in self._proxied_ids:
                raise self._id_in_use(wanted)
            self._proxied_ids.add(wanted.n)
            return wanted.n
        while self._next_proxied in self._proxied_ids:
            self._next_proxied += 1
        n = self._next_proxied
        self._proxied_ids.add(n)
        self._next_proxied += 1
        return n

    async def _open_with_header(
        self, header: Any, expected: type[Any], what: str, decoder: Any = None
    ) -> tuple[StreamState, Any]:
        """Open a stream to the coordinator, send ``header``, and wait for its answer.

        Returns the stream and the ``expected`` reply; a refusal raises ``PeerNotFoundError``
        or ``RefusedError``, anything else ``ProtocolError``. On any failure, or if cancelled,
        the stream is broken both ways.
        """
        self._check_alive()
        assert self._table is not None
        st = self._table.open_stream()
        if decoder is not None:
            st.decoder = decoder
        write_message(st, control.encode(header))
        try:
            reply = control.decode(await read_header(st))
        except ConecError as exc:
            st.fail(exc, StreamCode.ABORTED)
            self._check_alive()
            raise ProtocolError(f"{what} failed: {exc}") from exc
        except BaseException:
            st.fail(ConecError(f"{what} was cancelled"), StreamCode.ABORTED)
            raise
        if isinstance(reply, control.StreamRefused):
            st.fail(ConecError(reply.message), StreamCode.REFUSED)
            if reply.reason == "no-peer":
                raise PeerNotFoundError(reply.message)
            raise RefusedError(reply.message)
        if not isinstance(reply, expected):
            st.fail(ProtocolError("unexpected reply"), StreamCode.PROTOCOL)
            raise ProtocolError(f"unexpected reply {type(reply).__name__} to {what}")
        return st, reply

    async def _open_proxied(
        self, peer: str | None, n: int
    ) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        st, _ = await self._open_with_header(
            control.OpenProxied(n, peer), control.StreamAccepted, f"opening a stream to {peer!r}"
        )
        # The id is in use until both directions of the stream have ended.
        st.on_done = lambda: self._proxied_ids.discard(n)
        return message_channels(st, peer, StreamId.proxied(n))

    async def new_proxied_stream(
        self, peer: str | None
    ) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        """Open a stream relayed by the coordinator to client ``peer`` (this client itself
        allowed), or to the coordinator when ``peer`` is None.

        Raises ``PeerNotFoundError`` if ``peer`` is not connected, ``DisconnectedError`` if
        this client lost the coordinator.
        """
        self._check_alive()
        n = self._take_proxied_id(None)
        try:
            return await self._open_proxied(peer, n)
        except BaseException:
            self._proxied_ids.discard(n)
            raise

    # -- direct channels ---------------------------------------------------------------------------

    async def new_channel(self, peer: str) -> None:
        """Open a direct QUIC connection to ``peer``, brokered by the coordinator.

        Raises ``ChannelError`` if ``peer`` is this client, does not listen, cannot be
        reached within 10 s, is already connected, or presents another certificate than
        the coordinator vouched for; ``PeerNotFoundError`` if it is not connected.
        """
        self._check_alive()
        await self._direct.open(peer)

    async def close_channel(self, peer: str) -> None:
        """Close the direct channel to ``peer``; its streams break on both sides.

        Raises ``ChannelError`` if there is none. Either side may open a new one at once.
        """
        await self._direct.close(peer)

    async def new_direct_stream(
        self, peer: str
    ) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        """A stream over the open direct channel to ``peer`` (``ChannelError`` if none,
        ``DisconnectedError`` once the coordinator is lost)."""
        await trio.lowlevel.checkpoint()
        self._check_alive()
        return self._direct.new_stream(peer)

    async def _ensure_channel(self, peer: str) -> bool:
        """True if a direct channel to ``peer`` is open now (opening one if it can)."""
        peer = canonical_id(peer)
        if peer in self._direct.channels:
            return True
        if peer == self.id or self._direct.recently_failed(peer):
            return False
        opening = self._direct.opening(peer)
        if opening is not None:  # another task is opening it: use its result
            await opening.wait()
            return peer in self._direct.channels
        try:
            await self._direct.open(peer)
        except ConecError as exc:
            log.info("no direct channel to %r, going through the coordinator: %s", peer, exc)
            return False
        return True

    async def new_stream(self, peer: str) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        """A stream to ``peer``: direct if a channel exists or can be opened now, otherwise
        proxied through the coordinator (for example when the peer does not listen, or sits
        behind a symmetric NAT). Raises ``PeerNotFoundError`` if ``peer`` is not connected."""
        self._check_alive()
        if await self._ensure_channel(peer):
            return self._direct.new_stream(peer)
        return await self.new_proxied_stream(peer)

    async def new_stream_with_id(
        self, peer: str | None, stream_id: StreamId
    ) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        """Like ``new_stream`` with a caller-chosen id (a direct id needs a direct channel).

        Raises ``StreamIdInUseError`` if this client already uses that id.
        """
        self._check_alive()
        if stream_id.is_direct:
            if peer is None:
                raise ChannelError("the coordinator cannot be reached over a direct channel")
            await trio.lowlevel.checkpoint()
            return self._direct.new_stream(peer, stream_id)
        n = self._take_proxied_id(stream_id)
        try:
            return await self._open_proxied(peer, n)
        except BaseException:
            self._proxied_ids.discard(n)
            raise

    # -- broadcast ---------------------------------------------------------------------------------

    async def new_broadcast(
        self, name: str
    ) -> tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[BroadcastMessage[bytes]]]:
        """Join broadcast channel ``name`` (created on first use): ``(send, recv)``."""
        from ._broadcast import join_broadcast

        self._check_alive()
        assert self._table is not None
        return await join_broadcast(self, self._table, name)

    async def broadcast_count(self, name: str) -> tuple[int, int]:
        """``(senders, receivers)`` of broadcast channel ``name`` now.

        Raises ``BroadcastNotFoundError`` if there is no such channel.
        """
        reply = await self._request(lambda rid: control.BroadcastCountRequest(rid, name))
        if isinstance(reply, control.ErrorReply):
            raise BroadcastNotFoundError(reply.message)
        return (reply.senders, reply.receivers)

    # -- shutdown ----------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Leave: deliver what was cleanly closed, then break the rest and say goodbye."""
        conn, table = self._conn, self._table
        self._incoming_send.close()
        tables = [channel.table for channel in self._direct.channels.values()]
        if table is not None:
            tables.append(table)
        with trio.move_on_after(FLUSH_TIMEOUT):
            for t in tables:
                await t.flush()
        for t in tables:
            t.abort_all(StreamCode.ABORTED)
        await self._direct.aclose_all()
        if conn is not None:
            await conn.aclose(int(CloseCode.NORMAL), "client leaving")


@asynccontextmanager
async def open_client(config: ClientConfig) -> AsyncIterator[Client]:
    """Connect to the coordinator; the client lives for the duration of the block.

    Raises a ``ConecError`` subclass if connecting or authenticating fails (``ConnectError``,
    ``CertificateError``, ``IdInUseError``, ``InvalidIdError``, ``VersionMismatchError``,
    ...), before the block runs. Leaving the block closes every stream and channel.
    """
    with unwrap_single_exception():
        client: Client | None = None
        try:
            async with trio.open_nursery() as nursery:
                client = Client(config, nursery)
                try:
                    await client._connect()
                except BaseException:
                    nursery.cancel_scope.cancel()
                    raise
                try:
                    yield client
                finally:
                    with trio.CancelScope(shield=True):
                        await client._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            if client is not None:
                for sock in client._sockets:
                    sock.close()
