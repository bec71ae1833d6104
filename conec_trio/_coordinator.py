"""The coordinator: registry of clients, relay of proxied streams, channel broker, broadcast hub.

This module keeps the registry, admission, hellos, the lifecycle and statistics; a client's
session is in ``_session``, the streams clients open through it in ``_proxied``, and their
control requests (channel brokering among them) in ``_requests``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from . import _tls
from ._config import DEFAULT_IDLE_TIMEOUT, CoordConfig, check_client_id, load_pem
from ._exceptions import CertificateError, ConecError, InvalidIdError, ProtocolError
from ._hub import BroadcastHub
from ._peer_memory import PeerMemory
from ._presence import PresenceFeed
from ._proxied import StreamOpener, _IncomingStreams, _Pending
from ._quic import (
    Admission,
    ConnectionSettings,
    Identity,
    QuicConn,
    QuicEndpoint,
    make_udp_socket,
    stateless_reset_key,
)
from ._requests import ControlRequests, control_loop
from ._restart_notes import Note, keep_notes, write_notes
from ._session import ClientSession, _plain_host, _serving
from ._stats import REFUSAL_CODES, CoordinatorStatistics, refusal_name
from ._streams import StreamState, read_header, write_message
from ._util import unwrap_single_exception, wait_any
from ._wire import control
from ._wire.codes import CloseCode, StreamCode

log = logging.getLogger("conec_trio.coordinator")


class Coordinator:
    """A running coordinator (see ``open_coordinator``)."""

    def __init__(self, config: CoordConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self._nursery = nursery
        self._clients: dict[str, ClientSession] = {}
        self._sessions: set[ClientSession] = set()
        self._endpoint: QuicEndpoint | None = None
        self._memory = PeerMemory()
        self._incoming_send, incoming_recv = trio.open_memory_channel[_Pending](
            config.max_pending_opens
        )
        self.incoming_streams = _IncomingStreams(incoming_recv)
        cert_pem = load_pem(config.cert_chain)
        key_pem = load_pem(config.private_key)
        assert cert_pem is not None and key_pem is not None
        chain = _tls.load_cert_chain_pem(cert_pem)
        self._client_ca = load_pem(config.client_ca)
        private_key = _tls.load_private_key(key_pem)
        self._settings = ConnectionSettings(
            alpn=control.ALPN,
            idle_timeout=config.idle_timeout or DEFAULT_IDLE_TIMEOUT,
            stream_window=config.stream_window,
            connection_window=config.connection_window,
            max_streams=config.max_streams_per_client,
            max_datagram_size=config.max_datagram_size,
            identity=Identity(chain[0], tuple(chain[1:]), private_key),
            # a restart with the same key resets its predecessor's connections at once
            reset_key=stateless_reset_key(private_key),
        )
        self.broadcasts = BroadcastHub(
            max_channels=config.max_broadcasts, max_per_client=config.max_broadcasts_per_client
        )
        # For statistics(): totals since the start.
        self._relayed_bytes = 0
        self._refusals: Counter[CloseCode] = Counter()
        self._presence = PresenceFeed(config.stream_window)
        # Connections that have not said hello yet, in all and by source IP address.
        self._pending = 0
        self._pending_by_host: Counter[str] = Counter()
        self._opener = StreamOpener(config, self._clients, self._incoming_send, self._count_relayed)
        self._requests = ControlRequests(
            clients=self._clients,
            broadcasts=self.broadcasts,
            presence=self._presence,
            memory=self._memory,
            spawn=self._start_guarded,
        )

    # -- public, non-blocking queries -------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the coordinator is bound to."""
        assert self._endpoint is not None
        addr = self._endpoint.local_address
        return (str(addr[0]), int(addr[1]))

    @property
    def num_clients(self) -> int:
        """Clients connected now."""
        return len(self._clients)

    @property
    def num_broadcasts(self) -> int:
        """Broadcast channels alive now."""
        return self.broadcasts.count

    def client_ids(self) -> list[str]:
        """Ids of the clients connected now, sorted."""
        return sorted(self._clients)

    # -- lifecycle --------------------------------------------------------------------------------

    async def _start(self) -> None:
        host, port = self.config.host, self.config.port
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, *_, sockaddr = infos[0]
        sock = make_udp_socket(family, str(sockaddr[0]), int(sockaddr[1]))
        self._endpoint = QuicEndpoint(sock, self._nursery)
        self._endpoint.accept_connections(
            self._server_settings,
            self._accepted,
            stateless_retry=self.config.stateless_retry,
            admit=self._admit,
        )
        await self._nursery.start(self._endpoint.run)
        if self.config.restart_notes is not None:
            self._nursery.start_soon(
                keep_notes,
                Path(self.config.restart_notes),
                self._endpoint,
                self._notes,
                self._clients.__contains__,
            )

    def _notes(self) -> list[Note]:
        """Where each client that said hello is, and the connection id it last used."""
        return [
            (_plain_host(s.conn.peer_address), int(s.conn.peer_address[1]), s.conn.last_cid, id_)
            for id_, s in self._clients.items()
            if s.conn.last_cid is not None and s.conn.is_open
        ]

    def _server_settings(self) -> ConnectionSettings:
        return self._settings

    def _admit(self, address: tuple[Any, ...], validated: bool) -> Admission:
        """Whether a new connection from ``address`` may make state now (see
        ``CoordConfig.max_pending_connections``)."""
        config = self.config
        if (
            self._pending >= config.max_pending_connections
            or self._pending_by_host[_plain_host(address)]
            >= config.max_pending_connections_per_address
        ):
            return Admission.DROP
        if not validated and self._pending >= config.retry_above_pending:
            return Admission.RETRY
        return Admission.ACCEPT

    def _accepted(self, conn: QuicConn) -> None:
        session = ClientSession(self, conn)
        self._sessions.add(session)
        host = _plain_host(conn.peer_address)
        session.pending_host = host
        self._pending += 1
        self._pending_by_host[host] += 1
        self._nursery.start_soon(self._expect_hello, session)

    def _settle(self, session: ClientSession) -> None:
        """``session`` said hello or is gone: it no longer counts as pending."""
        host = session.pending_host
        if host is None:
            return
        session.pending_host = None
        self._pending -= 1
        self._pending_by_host[host] -= 1
        if not self._pending_by_host[host]:
            del self._pending_by_host[host]

    async def _expect_hello(self, session: ClientSession) -> None:
        try:
            with trio.move_on_after(self.config.hello_timeout):
                await wait_any(session.hello_seen, session.conn.closed)
                return
            if session.conn.is_open:
                session.refuse(CloseCode.PROTOCOL, "no hello within the allowed time")
        finally:
            self._settle(session)

    async def _shutdown(self) -> None:
        self._incoming_send.close()
        self._presence.clear()
        for session in list(self._sessions):
            session.conn.close_now(int(CloseCode.SHUTDOWN), "coordinator shutting down")
        if self.config.restart_notes is not None:
            # They were all told: a successor has nobody to tell.
            with contextlib.suppress(OSError):
                write_notes(Path(self.config.restart_notes), "")
        await trio.lowlevel.checkpoint()

    def _client_gone(self, session: ClientSession, reason: str) -> None:
        self._sessions.discard(session)
        self._presence.unsubscribe(session)
        self._settle(session)
        if session.id is not None and self._clients.get(session.id) is session:
            del self._clients[session.id]
            log.info("client %r left: %s", session.id, reason or "closed")
            self._presence.publish(session.id, False)

    async def _guarded(self, session: ClientSession, task: Any, *args: Any) -> None:
        """Run a task on behalf of one client (see ``_serving``)."""
        with _serving(session):
            await task(session, *args)

    def _start_guarded(
        self, session: ClientSession, task: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        self._nursery.start_soon(self._guarded, session, task, *args)

    # -- what a session asks of its coordinator (see _session.SessionOwner) ----------------------

    def _stream_opened(self, session: ClientSession, st: StreamState) -> None:
        if session.control is None and not session.hello_seen.is_set() and st.messages:
            # The hello came whole with the handshake's last flight (as clients send it):
            # answer it now, so the welcome leaves with the handshake confirmation.
            self._hello_now(session, st)
            return
        self._start_guarded(session, self._handle_stream, st)

    def _count_refusal(self, code: CloseCode) -> None:
        self._refusals[code] += 1

    # -- streams ----------------------------------------------------------------------------------

    async def _handle_stream(self, session: ClientSession, st: StreamState) -> None:
        try:
            with trio.fail_after(self.config.hello_timeout):
                header = await read_header(st)
        except (ConecError, trio.TooSlowError):
            st.fail(ProtocolError("no valid stream header"), StreamCode.PROTOCOL)
            return
        if session.control is None:
            if session.id is None and not session.hello_seen.is_set():
                if self._handle_hello(session, st, header):
                    await self._control_loop(session, st)
            else:
                st.fail(ProtocolError("stream before hello"), StreamCode.PROTOCOL)
            return
        try:
            msg = control.decode(header)
        except ProtocolError as exc:
            st.fail(exc, StreamCode.PROTOCOL)
            return
        if isinstance(msg, control.OpenProxied):
            await self._opener.open_proxied(session, st, msg)
        elif isinstance(msg, control.JoinBroadcast):
            await self.broadcasts.join(session, st, msg.name)
        else:
            st.fail(
                ProtocolError(f"unexpected stream header {type(msg).__name__}"), StreamCode.PROTOCOL
            )

    def _hello_now(self, session: ClientSession, st: StreamState) -> None:
        """``_handle_stream`` for a hello that is already here, without waiting for a task."""
        registered = False
        with _serving(session):
            registered = self._handle_hello(session, st, st.take_message())
        if registered:
            self._start_guarded(session, self._control_loop, st)

    def _handle_hello(self, session: ClientSession, st: StreamState, header: bytes) -> bool:
        """Check a hello and register the client (True), or refuse it (False)."""
        session.hello_seen.set()
        try:
            version = control.decode_hello_version(header)
        except ProtocolError as exc:
            session.refuse(CloseCode.PROTOCOL, f"bad hello: {exc}")
            return False
        if version != control.PROTOCOL_VERSION:
            session.refuse(
                CloseCode.VERSION,
                f"protocol version mismatch: the coordinator speaks version "
                f"{control.PROTOCOL_VERSION}, the client speaks version {version}",
            )
            return False
        try:
            hello = control.decode(header)
            assert isinstance(hello, control.Hello)
            client_id = check_client_id(hello.client_id)
        except (ProtocolError, AssertionError) as exc:
            session.refuse(CloseCode.PROTOCOL, f"bad hello: {exc}")
            return False
        except InvalidIdError as exc:
            session.refuse(CloseCode.BAD_ID, str(exc))
            return False
        session.id = client_id
        cert = session.conn.peer_certificate
        if cert is None:
            session.refuse(CloseCode.CERTIFICATE, "the client presented no certificate")
            return False
        try:
            _tls.verify_client_cert(
                cert, session.conn.peer_certificate_chain, client_id, self._client_ca
            )
        except CertificateError as exc:
            session.refuse(CloseCode.CERTIFICATE, str(exc))
            return False
        cert_der = _tls.cert_der(cert)
        stale = self._clients.get(client_id)
        if stale is not None and stale.cert_der != cert_der:
            session.id = None  # must not unregister the client that holds the name
            session.refuse(
                CloseCode.ID_TAKEN,
                f"client id {client_id!r} is already connected (with another certificate)",
                client_id,
            )
            return False
        if stale is None and len(self._clients) >= self.config.max_clients:
            session.id = None
            session.refuse(
                CloseCode.LIMIT,
                f"the coordinator holds its maximum of {self.config.max_clients} clients",
                client_id,
            )
            return False
        if not session.conn.is_open:
            return False
        if stale is not None:
            # The same id and certificate: the same client, connecting again while its old
            # connection has not timed out here yet (it restarted, or its network changed).
            log.info("client %r connected again: replacing its stale session", client_id)
            del self._clients[client_id]
            self._presence.publish(client_id, False)  # watchers see the leave, then the join
            stale.conn.close(int(CloseCode.REPLACED), "replaced by a newer connection")
        session.listen = hello.listen
        session.local_addrs = list(hello.local_addrs)
        session.control = st
        self._clients[client_id] = session
        write_message(
            st, control.encode(control.Welcome(control.PROTOCOL_VERSION, session.observed_addr))
        )
        session.conn.expedite()
        log.info("client %r connected from %s", client_id, session.observed_addr)
        self._certificate_seen(client_id, cert_der)
        self._presence.publish(client_id, True)
        return True

    def _certificate_seen(self, client_id: str, cert_der: bytes) -> None:
        """Tell the clients that had channels brokered with ``client_id`` if it came back
        with another certificate: their channels to it are stale."""
        digest = hashlib.sha256(cert_der).digest()
        notice = control.encode(control.PeerCertificateChanged(client_id, digest))
        for peer in self._memory.registered(client_id, digest):
            target = self._clients.get(peer)
            if target is not None and target.control is not None and target.conn.is_open:
                write_message(target.control, notice)

    async def _control_loop(self, session: ClientSession, st: StreamState) -> None:
        await control_loop(session, st, self._control_message)

    async def _control_message(self, session: ClientSession, st: StreamState, msg: Any) -> None:
        await self._requests.handle(session, st, msg)

    # -- statistics -------------------------------------------------------------------------------

    def _count_relayed(self, nbytes: int) -> None:
        self._relayed_bytes += nbytes

    def statistics(self) -> CoordinatorStatistics:
        """A snapshot of what the coordinator serves now, and totals since it started."""
        # Both halves of every relayed stream that has not ended both ways.
        halves = [
            st
            for session in self._sessions
            for st in session.table.streams.values()
            if st.linked is not None
        ]
        return CoordinatorStatistics(
            clients=self.num_clients,
            broadcasts=self.num_broadcasts,
            relayed_streams=len({frozenset((st, st.linked)) for st in halves}),
            relayed_bytes=self._relayed_bytes,
            held_bytes=sum(st.held + st.conn.send_backlog(st.stream_id) for st in halves),
            pending_connections=self._pending,
            reply_backlog=sum(
                session.conn.send_backlog(session.control.stream_id)
                for session in self._sessions
                if session.control is not None
            ),
            refused={refusal_name(code): self._refusals[code] for code in REFUSAL_CODES},
        )


@asynccontextmanager
async def open_coordinator(config: CoordConfig) -> AsyncIterator[Coordinator]:
    """Run a coordinator for the duration of the block.

    Raises ``OSError`` if the address cannot be bound, ``ConecError`` for a bad config.
    Leaving the block disconnects every client (they see their streams break at once).
    """
    with unwrap_single_exception():
        coord: Coordinator | None = None
        try:
            async with trio.open_nursery() as nursery:
                coord = Coordinator(config, nursery)
                await coord._start()
                try:
                    yield coord
                finally:
                    with trio.CancelScope(shield=True):
                        await coord._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            if coord is not None and coord._endpoint is not None:
                coord._endpoint.sock.close()
