"""The client: its coordinator connection, streams, incoming streams and direct channels."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import _tls
from ._backoff import Backoff
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
    CertificateError,
    ChannelError,
    ConecError,
    DisconnectedError,
    IdInUseError,
    InvalidIdError,
    PeerNotFoundError,
    ProtocolError,
    RefusedError,
    StreamIdInUseError,
    VersionMismatchError,
)
from ._messages import MessageReceiveChannel, MessageSendChannel, message_channels
from ._paths import Paths, PathsContext, answer_ping
from ._presence import PeerEvent, Presence
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
# How long one reconnect attempt waits for a handshake: short, because QUIC's own
# retransmissions of the first packet slow down within an attempt, and a new attempt finds a
# coordinator that came back sooner.
RECONNECT_ATTEMPT_TIMEOUT = 3.0
# Refusals that retrying cannot cure: reconnecting stops (see "Staying connected").
INCURABLE = (CertificateError, IdInUseError, InvalidIdError, VersionMismatchError)


class _IncomingStreams(trio.abc.ReceiveChannel[IncomingStream]):
    """``client.incoming_streams``: breaks (rather than ends) when the coordinator is lost
    for good (with reconnecting off, or after an incurable refusal)."""

    def __init__(self, client: Client, recv: trio.MemoryReceiveChannel[IncomingStream]) -> None:
        self._client = client
        self._recv = recv

    async def receive(self) -> IncomingStream:
        """The next stream another party opened to this client.

        Raises ``trio.BrokenResourceError`` once the coordinator connection is lost for good
        and no stream is left, ``trio.EndOfChannel`` after the client block ended.
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
        self._link: Link | None = None  # the coordinator connection, while it is up
        self._socket: QuicEndpoint | None = None  # the one socket, from the first connection
        self._sockets: list[DatagramSocket] = []
        # Set when the coordinator is lost for good: reconnecting is off, or an incurable
        # refusal (kept in _refusal for wait_connected) stopped it.
        self._lost: ConecError | None = None
        self._refusal: ConecError | None = None
        self._closing = False  # the block is exiting
        self._link_up = trio.Event()  # set on (re)connecting, giving up, and closing
        self._reconnecting: trio.CancelScope | None = None
        self._requests = Requests(self._send_control)  # a new one for each connection
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
                check_alive=self._raise_if_lost,
                lost=lambda: self._lost is not None,
            )
        )
        self._idle_timeout = config.idle_timeout or DEFAULT_IDLE_TIMEOUT
        self._presence = Presence(self._send_control)

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
        return self._socket

    async def _connect(self) -> None:
        """The first connection (``open_client`` raises its failure)."""
        self._adopt(await self._dial(None, None))

    async def _dial(self, endpoint: QuicEndpoint | None, handshake_timeout: float | None) -> Link:
        """Connect, from ``endpoint`` if given, and wait for the welcome."""
        dialer = Dialer(
            self.config,
            self.id,
            self._nursery,
            self._coordinator_settings(),
            self._identity,
            self._sockets,
            self._new_stream,
            self._link_terminated,
        )
        link = await dialer.dial(endpoint, handshake_timeout)
        if self._socket is None:
            self._socket = link.endpoint
            # Before the welcome: a peer may dial as soon as the coordinator registered us.
            link.endpoint.raw_datagram_handler = self._direct.raw_datagram
            if self.config.listen:
                # Direct channels arrive on this same socket (and so through the same NAT
                # mapping the coordinator observed).
                link.endpoint.accept_connections(
                    self._direct.server_settings, self._direct.accepted
                )
        try:
            await dialer.await_welcome(link)
        except BaseException:
            if link.conn.is_open:
                link.conn.close(int(CloseCode.NORMAL), "no welcome")
            raise
        return link

    def _adopt(self, link: Link) -> None:
        """Make a welcomed connection the client's coordinator connection."""
        self.observed_address = link.observed_address
        self._link = link
        requests = self._requests = Requests(lambda msg: self._send_on(link, msg))
        self._nursery.start_soon(self._control_loop, link, requests)
        self._on_link_up(link)
        self._link_up.set()
        if not link.conn.is_open:  # closed right after its welcome
            self._link_terminated(
                link.conn, link.conn.close_error_code or 0, link.conn.close_reason
            )

    def _link_terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        link = self._link
        if link is None or conn is not link.conn:
            return  # an attempt that was never welcomed (its dial raises), or an old link
        self._link = None
        if self._link_up.is_set():
            self._link_up = trio.Event()
        cause = DisconnectedError(
            f"client {self.id!r} lost its connection to the coordinator: {reason or 'closed'}"
        )
        # Requests waiting on this connection ask again on the next one (see _request).
        self._requests.connection_lost(cause)
        self._presence.link_down()
        if self._closing:
            return
        if error_code == CloseCode.REPLACED:
            # Not stale: another process connected with this id and certificate.
            self._give_up(
                cause,
                IdInUseError(
                    f"client {self.id!r} was replaced at the coordinator by another connection "
                    f"with the same id and certificate: {reason}"
                ),
            )
        elif not self.config.reconnect:
            self._give_up(cause, None)
        else:
            log.warning(
                "client %r lost the coordinator (%s); reconnecting", self.id, reason or "closed"
            )
            self._nursery.start_soon(self._reconnect)

    async def _reconnect(self) -> None:
        """Connect again from the same socket, with backoff, until connected, refused for
        good, or the block exits."""
        assert self._socket is not None
        backoff = Backoff()
        timeout = min(self.config.connect_timeout, RECONNECT_ATTEMPT_TIMEOUT)
        with trio.CancelScope() as self._reconnecting:
            while not self._closing:
                await trio.sleep(backoff.next_delay())
                try:
                    link = await self._dial(self._socket, timeout)
                except INCURABLE as exc:
                    log.error("client %r stops reconnecting: %s", self.id, exc)
                    self._give_up(
                        DisconnectedError(
                            f"client {self.id!r} lost the coordinator and stopped reconnecting: "
                            f"{exc}"
                        ),
                        exc,
                    )
                    return
                except (ConecError, OSError) as exc:
                    log.info("client %r: no coordinator yet: %s", self.id, exc)
                    continue
                self._adopt(link)
                log.warning("client %r reconnected to the coordinator", self.id)
                return

    def _give_up(self, cause: ConecError, refusal: ConecError | None) -> None:
        """The coordinator is lost for good: every stream of this client breaks, direct
        ones included, and calls raise ``DisconnectedError``."""
        if self._lost is None:
            self._lost = cause
            self._refusal = refusal
        self._incoming_send.close()
        self._requests.connection_lost(self._lost)
        self._direct.coordinator_lost()
        self._presence.close(self._lost)
        self._link_up.set()  # wakes the calls waiting for a connection: they raise

    # -- control stream ----------------------------------------------------------------------------

    async def _control_loop(self, link: Link, requests: Requests) -> None:
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
            if isinstance(
                msg, control.PresenceSnapshot | control.PresenceEvent | control.PresenceDropped
            ):
                self._presence.on_message(msg)  # here, in arrival order: see _presence
                continue
            if isinstance(msg, control.PeerCertificateChanged):
                self._direct.peer_certificate_changed(msg.peer, msg.cert_sha256)
                continue
            requests.reply(msg)

    def _send_control(self, msg: Any) -> None:
        link = self._link
        if link is not None:
            self._send_on(link, msg)

    @staticmethod
    def _send_on(link: Link, msg: Any) -> None:
        if link.conn.is_open:
            write_message(link.control, control.encode(msg))

    async def _request(self, make: Any) -> Any:
        """Send a control request and wait for its reply. A request whose connection is lost
        before the reply is asked again on the next one; ``DisconnectedError`` once the
        coordinator is lost for good."""
        while True:
            await self._wait_link()
            try:
                return await self._requests.request(make)
            except DisconnectedError:
                self._raise_if_lost()

    def _raise_if_lost(self) -> None:
        """``DisconnectedError`` if the coordinator is lost for good or the block ended."""
        if self._lost is not None:
            raise DisconnectedError(str(self._lost)) from self._lost
        if self._closing:
            raise DisconnectedError(f"client {self.id!r} has left (its block ended)")

    async def _wait_link(self) -> Link:
        """The coordinator connection, waiting for a reconnect if it is down now."""
        while True:
            self._raise_if_lost()
            link = self._link
            if link is not None and link.conn.is_open:
                return link
            await self._link_up.wait()

    @property
    def connected(self) -> bool:
        """The coordinator connection is up now."""
        link = self._link
        return self._lost is None and link is not None and link.conn.is_open

    async def wait_connected(self) -> None:
        """Return once the coordinator connection is up (at once if it is).

        Raises the ``ConecError`` of an incurable refusal that stopped reconnecting, or
        ``DisconnectedError`` when the coordinator is lost with reconnecting off.
        """
        while True:
            refusal = self._refusal
            if refusal is not None:
                raise type(refusal)(*refusal.args) from refusal
            self._raise_if_lost()
            if self.connected:
                await trio.lowlevel.checkpoint()
                return
            await self._link_up.wait()

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
        while True:
            link = await self._wait_link()
            st = link.table.open_stream()
            if decoder is not None:
                st.decoder = decoder
            write_message(st, control.encode(header))
            try:
                reply = control.decode(await read_header(st))
            except ConecError as exc:
                st.fail(exc, StreamCode.ABORTED)
                if not link.conn.is_open:
                    # Lost before the answer: nothing was opened; ask the next connection.
                    self._raise_if_lost()
                    continue
                raise ProtocolError(f"{what} failed: {exc}") from exc
            except BaseException:
                st.fail(ConecError(f"{what} was cancelled"), StreamCode.ABORTED)
                raise
            break
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

        Waits while the client reconnects. Raises ``PeerNotFoundError`` if ``peer`` is not
        connected, ``DisconnectedError`` if this client lost the coordinator for good.
        """
        self._raise_if_lost()
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
        self._raise_if_lost()
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
        ``DisconnectedError`` once the coordinator is lost for good). Never waits for the
        coordinator."""
        await trio.lowlevel.checkpoint()
        self._raise_if_lost()
        return self._direct.new_stream(peer)

    async def new_stream(self, peer: str) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        """A stream to ``peer`` by the best path, without waiting out a hole punch: direct if
        a channel is open or opens within ``ClientConfig.direct_head_start``, otherwise
        proxied through the coordinator, moving onto the direct channel once one is up (for
        example never, when the peer does not listen or sits behind a symmetric NAT).
        ``.path`` of either end says where its messages go now. Raises
        ``PeerNotFoundError`` if ``peer`` is not connected."""
        self._raise_if_lost()
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
        self._raise_if_lost()
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
        return await join_broadcast(self, (await self._wait_link()).table, name)

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
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        self._link_up.set()  # calls waiting for a reconnect raise
        link = self._link
        self._incoming_send.close()
        self._presence.close(None)
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
        return ClientStatistics(
            id=self.id,
            observed_address=self.observed_address,
            connected=self.connected,
            channels=self._direct.statistics(),
        )

    # -- presence ----------------------------------------------------------------------------------

    def _on_link_up(self, link: Link) -> None:
        """Called after every successful connect and reconnect, once welcomed: watchers of
        peers subscribe on the new link and catch up with its snapshot."""
        self._presence.link_up()

    async def list_peers(self) -> frozenset[str]:
        """Ids of the clients connected to the coordinator now, this one included."""
        reply = await self._request(control.PeerListRequest)
        if not isinstance(reply, control.PeerListReply):
            raise ProtocolError(f"unexpected reply {type(reply).__name__} to a peer list request")
        return frozenset(reply.peers)

    async def wait_for_peer(self, peer: str) -> None:
        """Return once client ``peer`` is connected to the coordinator (at once if it is).

        Raises ``DisconnectedError`` if this client loses the coordinator meanwhile.
        """
        await self._presence.wait_for(peer)

    def watch_peers(self) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[PeerEvent]]:
        """``async with client.watch_peers() as events:`` a ``PeerEvent(peer, joined=True)``
        for every client connected now (this one included), then each join and leave.

        Events wait unread in the channel; past a thousand or so unread, they are merged
        per peer (a join and a leave unread cancel out), so a reader that falls behind costs
        memory in proportion to the number of peers, and its running set is right when it
        reads on. After a reconnect the channel catches up: it yields the leaves and joins
        that make its running set equal to the coordinator's again.
        """
        return self._presence.watch()

    async def broadcast_members(self, name: str) -> tuple[frozenset[str], frozenset[str]]:
        """``(senders, receivers)`` of broadcast channel ``name`` now, as client ids.

        Raises ``BroadcastNotFoundError`` if there is no such channel.
        """
        reply = await self._request(lambda rid: control.BroadcastMembersRequest(rid, name))
        if isinstance(reply, control.ErrorReply):
            raise BroadcastNotFoundError(reply.message)
        if not isinstance(reply, control.BroadcastMembersReply):
            raise ProtocolError(
                f"unexpected reply {type(reply).__name__} to a broadcast members request"
            )
        return (frozenset(reply.senders), frozenset(reply.receivers))

    async def list_broadcasts(self) -> frozenset[str]:
        """The names of the broadcast channels that exist now."""
        reply = await self._request(lambda rid: control.BroadcastListRequest(rid))
        if not isinstance(reply, control.BroadcastListReply):
            raise ProtocolError(f"unexpected reply {type(reply).__name__} to a broadcast list")
        return frozenset(reply.names)


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
