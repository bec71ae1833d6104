"""The client: its coordinator connection, streams, incoming streams and direct channels."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import _tls
from ._broadcast import join_broadcast
from ._config import (
    DEFAULT_IDLE_TIMEOUT,
    KEEPALIVE_FRACTION,
    ClientConfig,
    check_client_id,
    load_pem,
)
from ._connect import Dialer, Link
from ._direct import DirectContext, DirectManager
from ._exceptions import (
    BroadcastNotFoundError,
    ChannelError,
    ConecError,
    DisconnectedError,
    PeerNotFoundError,
    ProtocolError,
    RefusedError,
    StreamIdInUseError,
)
from ._messages import MessageReceiveChannel, MessageSendChannel, message_channels
from ._paths import Paths, PathsContext, answer_ping
from ._quic import (
    ConnectionSettings,
    DatagramSocket,
    Identity,
    QuicConn,
    QuicEndpoint,
    TrustStore,
)
from ._rpc import Requests
from ._stats import ClientStatistics
from ._streams import (
    StreamState,
    read_header,
    write_message,
)
from ._types import BroadcastMessage, IncomingStream, PingResult, StreamId
from ._util import system_ca_location, unwrap_single_exception
from ._wire import control
from ._wire.codes import CloseCode, Reason, StreamCode

log = logging.getLogger("conec_trio.client")

# How long a client waits at exit for its cleanly closed streams to be acknowledged.
FLUSH_TIMEOUT = 2.0


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


class Client:
    """A client connected to a coordinator (see ``open_client``)."""

    def __init__(self, config: ClientConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.id = check_client_id(config.id)
        self._nursery = nursery
        self._link: Link | None = None  # the coordinator connection, once connected
        self._sockets: list[DatagramSocket] = []
        self._lost: ConecError | None = None
        self._requests = Requests(self._send_control)
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
        self._direct_ids: set[int] = set()
        self._direct = DirectManager(
            DirectContext(
                id=self.id,
                config=config,
                client_ca=self._client_ca,
                nursery=nursery,
                endpoint=lambda: self._endpoint,
                settings=self._settings,
                request=self._request,
                send_control=self._send_control,
                deliver_incoming=self._deliver_incoming,
                direct_ids=self._direct_ids,
                id_in_use=self._id_in_use,
            )
        )
        self._paths = Paths(
            PathsContext(
                id=self.id,
                config=config,
                nursery=nursery,
                direct=self._direct,
                take_proxied_id=lambda: self._take_proxied_id(None),
                release_proxied_id=self._proxied_ids.discard,
                open_proxied=self._open_proxied,
                open_with_header=self._open_with_header,
                check_alive=self._check_alive,
                lost=lambda: self._lost is not None,
            )
        )
        self._idle_timeout = config.idle_timeout or DEFAULT_IDLE_TIMEOUT

    # -- connecting ------------------------------------------------------------------------------

    def _identity(self) -> Identity:
        """This client's certificate, chain and key; an ephemeral one is made on first use."""
        if self._certificate is None or self._private_key is None:
            self._certificate, self._private_key = _tls.ephemeral_identity_objects(self.id)
            self._certificate_chain = []
        return Identity(self._certificate, tuple(self._certificate_chain), self._private_key)

    def _settings(
        self, *, server_name: str | None = None, trust: TrustStore | None = None
    ) -> ConnectionSettings:
        """Settings with this client's windows, idle timeout and keepalive. Its identity is
        made on demand for the coordinator connection (``trust`` given), and now for a
        direct channel."""
        cfg = self.config
        return ConnectionSettings(
            alpn=control.ALPN,
            idle_timeout=self._idle_timeout,
            stream_window=cfg.stream_window,
            connection_window=cfg.connection_window,
            max_streams=cfg.max_streams,
            max_datagram_size=cfg.max_datagram_size,
            # Either side keeps an idle channel alive, whoever dialled.
            keepalive_interval=self._idle_timeout * KEEPALIVE_FRACTION if cfg.keepalive else None,
            identity=self._identity if trust is not None else self._identity(),
            server_name=server_name,
            trust=trust,
        )

    def _coordinator_settings(self) -> ConnectionSettings:
        if self._ca is not None:
            trust = TrustStore(cadata=self._ca)
        else:
            cafile, capath = system_ca_location()
            trust = TrustStore(cafile=cafile, capath=capath)
        return self._settings(server_name=self.config.coord_host, trust=trust)

    @property
    def _endpoint(self) -> QuicEndpoint | None:
        return self._link.endpoint if self._link is not None else None

    async def _connect(self) -> None:
        dialer = Dialer(
            self.config,
            self.id,
            self._nursery,
            self._coordinator_settings(),
            self._identity,
            self._sockets,
            self._new_stream,
            self._terminated,
        )
        link = await dialer.dial()
        self._link = link
        # Before the welcome: a peer may dial as soon as the coordinator registered us.
        link.endpoint.raw_datagram_handler = self._direct.raw_datagram
        if self.config.listen:
            # Direct channels arrive on this same socket (and so through the same NAT mapping
            # the coordinator observed).
            link.endpoint.accept_connections(self._direct.server_settings, self._direct.accepted)
        await dialer.await_welcome(link)
        self.observed_address = link.observed_address
        self._nursery.start_soon(self._control_loop, link)

    # -- control stream ----------------------------------------------------------------------------

    async def _control_loop(self, link: Link) -> None:
        while True:
            try:
                msg = control.decode(await read_header(link.control))
            except ConecError as exc:
                if link.conn.is_open:
                    log.warning("bad control message from the coordinator: %s", exc)
                    link.conn.close(int(CloseCode.PROTOCOL), f"bad control message: {exc}")
                return
            if isinstance(msg, control.ChannelOffer):
                self._nursery.start_soon(self._direct.on_offer, msg)
                continue
            self._requests.reply(msg)

    def _send_control(self, msg: Any) -> None:
        link = self._link
        if link is not None and link.conn.is_open:
            write_message(link.control, control.encode(msg))

    async def _request(self, make: Any) -> Any:
        """Send a control request and wait for its reply (``DisconnectedError`` if the
        coordinator connection is lost meanwhile)."""
        self._check_alive()
        return await self._requests.request(make)

    def _check_alive(self) -> Link:
        if self._lost is not None:
            raise DisconnectedError(str(self._lost)) from self._lost
        link = self._link
        if link is None or not link.conn.is_open:
            raise DisconnectedError(f"client {self.id!r} is not connected to the coordinator")
        return link

    def _terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        if self._lost is None:
            self._lost = DisconnectedError(
                f"client {self.id!r} lost its connection to the coordinator: {reason or 'closed'}"
            )
        self._incoming_send.close()
        self._requests.connection_lost(self._lost)
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
        if msg.kind == control.PROXIED_PING:
            answer_ping(st)
            return
        sid = StreamId.proxied(msg.sid)
        send, recv = message_channels(st, msg.peer, sid)
        if msg.kind == control.PROXIED_MOVABLE:
            self._paths.incoming_movable(msg.peer, msg.sid, msg.token, st, send, recv)
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
        st = self._check_alive().table.open_stream()
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
            if reply.reason == Reason.NO_PEER:
                raise PeerNotFoundError(reply.message)
            raise RefusedError(reply.message)
        if not isinstance(reply, expected):
            st.fail(ProtocolError("unexpected reply"), StreamCode.PROTOCOL)
            raise ProtocolError(f"unexpected reply {type(reply).__name__} to {what}")
        return st, reply

    async def _open_proxied(
        self, peer: str | None, n: int, kind: int = control.PROXIED_PLAIN, token: int = 0
    ) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        st, _ = await self._open_with_header(
            control.OpenProxied(n, peer, kind, token),
            control.StreamAccepted,
            f"opening a stream to {peer!r}",
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
        if await self._paths.join_attempt(peer):  # new_stream's attempt opened it
            return
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

    async def new_stream(self, peer: str) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        """A stream to ``peer`` by the best path, without waiting out a hole punch: direct if
        a channel is open or opens within ``ClientConfig.direct_head_start``, otherwise
        proxied through the coordinator, moving onto the direct channel once one is up (for
        example never, when the peer does not listen or sits behind a symmetric NAT).
        ``.path`` of either end says where its messages go now. Raises
        ``PeerNotFoundError`` if ``peer`` is not connected."""
        self._check_alive()
        return await self._paths.new_stream(peer)

    async def ping(self, peer: str) -> PingResult:
        """One round trip to ``peer``'s library (no application code answers it), over the
        direct channel if one is open, else through the coordinator: ``PingResult(rtt,
        path)``, ``rtt`` in seconds. Raises ``PeerNotFoundError`` if ``peer`` is not
        connected."""
        return await self._paths.ping(peer)

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
            if peer is None:
                return await self._open_proxied(peer, n)
            return await self._paths.open_movable(peer, n)
        except BaseException:
            self._proxied_ids.discard(n)
            raise

    # -- broadcast ---------------------------------------------------------------------------------

    async def new_broadcast(
        self, name: str
    ) -> tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[BroadcastMessage[bytes]]]:
        """Join broadcast channel ``name`` (created on first use): ``(send, recv)``."""
        return await join_broadcast(self, self._check_alive().table, name)

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
        link = self._link
        self._incoming_send.close()
        tables = [channel.table for channel in self._direct.channels.values()]
        if link is not None:
            tables.append(link.table)
        with trio.move_on_after(FLUSH_TIMEOUT):
            for t in tables:
                await t.flush()
        for t in tables:
            t.abort_all(StreamCode.ABORTED)
        await self._direct.aclose_all()
        if link is not None:
            await link.conn.aclose(int(CloseCode.NORMAL), "client leaving")

    # -- statistics --------------------------------------------------------------------------------

    def statistics(self) -> ClientStatistics:
        """A snapshot of this client: its public address, its connection to the
        coordinator, and its direct channels."""
        link = self._link
        return ClientStatistics(
            id=self.id,
            observed_address=self.observed_address,
            connected=self._lost is None and link is not None and link.conn.is_open,
            channels=self._direct.statistics(),
        )


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
