"""The client's connection to the coordinator: connecting, reconnecting, the control stream,
requests, and opening streams through the coordinator. ``Client`` (``_client``) is built on it
and adds the public API.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import _tls
from ._backoff import Backoff
from ._config import (
    DEFAULT_IDLE_TIMEOUT,
    KEEPALIVE_FRACTION,
    ClientConfig,
    check_client_id,
    load_pem,
)
from ._connect import Dialer, Link
from ._direct import DirectManager
from ._exceptions import (
    CertificateError,
    ConecError,
    DisconnectedError,
    IdInUseError,
    InvalidIdError,
    ProtocolError,
    VersionMismatchError,
)
from ._messages import message_channels
from ._paths import Paths, answer_ping
from ._presence import Presence
from ._quic import (
    ConnectionSettings,
    DatagramSocket,
    Identity,
    QuicConn,
    QuicEndpoint,
    TrustStore,
)
from ._rpc import Requests
from ._streams import StreamState, read_header, write_message
from ._types import IncomingStream, StreamId
from ._util import system_ca_location
from ._wire import control
from ._wire.codes import CloseCode, StreamCode

log = logging.getLogger("conec_trio.client")

# How long one reconnect attempt waits for a handshake: short, because QUIC's own
# retransmissions of the first packet slow down within an attempt, and a new attempt finds a
# coordinator that came back sooner.
RECONNECT_ATTEMPT_TIMEOUT = 3.0
# Refusals that retrying cannot cure: reconnecting stops (see "Staying connected").
INCURABLE = (CertificateError, IdInUseError, InvalidIdError, VersionMismatchError)


class IncomingStreams(trio.abc.ReceiveChannel[IncomingStream]):
    """``client.incoming_streams``: breaks (rather than ends) when the coordinator is lost
    for good (with reconnecting off, or after an incurable refusal)."""

    def __init__(
        self, client: CoordinatorConnection, recv: trio.MemoryReceiveChannel[IncomingStream]
    ) -> None:
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


class CoordinatorConnection:
    """The coordinator connection of a ``Client``: the part of it that talks to the
    coordinator (see the module docstring)."""

    # Made by Client, used here: direct channels, paths and presence all go on through a
    # reconnect, and hear of the connection's ups and downs.
    _direct: DirectManager
    _paths: Paths
    _presence: Presence

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
        self.incoming_streams: trio.abc.ReceiveChannel[IncomingStream] = IncomingStreams(
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
        self._idle_timeout = config.idle_timeout or DEFAULT_IDLE_TIMEOUT

    def _on_link_up(self, link: Link) -> None:
        """After every connection and reconnection, once the welcome arrived (Client)."""

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
        if self._closing or trio.current_effective_deadline() == -math.inf:
            # Leaving: the block exits, or a scope around it was cancelled and our own
            # endpoint closed the connection on its way out. Nothing to reconnect.
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
            # A stateless reset says the coordinator is up and has forgotten us (it
            # restarted, and paces the clients it tells): try again at once.
            self._nursery.start_soon(self._reconnect, conn.reset_by_peer)

    async def _reconnect(self, at_once: bool) -> None:
        """Connect again from the same socket, with backoff, until connected, refused for
        good, or the block exits."""
        assert self._socket is not None
        backoff = Backoff()
        timeout = min(self.config.connect_timeout, RECONNECT_ATTEMPT_TIMEOUT)
        with trio.CancelScope() as self._reconnecting:
            while not self._closing:
                if at_once:
                    at_once = False
                else:
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
                self._direct.offer(msg)
                continue
            if isinstance(
                msg, control.PresenceSnapshot | control.PresenceEvent | control.PresenceDropped
            ):
                self._presence.on_message(msg)  # here, in arrival order: see _presence
                continue
            if isinstance(msg, control.PeerCertificateChanged):
                self._direct.peer_certificate_changed(msg.peer, msg.cert_sha256)
                continue
            if isinstance(msg, control.PeerAddress):
                self._direct.peer_address(msg.peer, msg.addr)
                continue
            if isinstance(msg, control.ChannelRefused):
                self._direct.refused(msg.peer, msg.token, msg.message)
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
            if isinstance(msg, control.ChannelRequest):
                link.conn.expedite()  # the opener waits on it: no rounds for more writes

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
