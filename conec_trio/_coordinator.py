"""The coordinator: registry of clients, relay of proxied streams, channel broker, broadcast hub."""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import socket
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeAlias

import trio

from . import _tls
from ._config import DEFAULT_IDLE_TIMEOUT, CoordConfig, canonical_id, check_client_id, load_pem
from ._exceptions import CertificateError, ConecError, InvalidIdError, ProtocolError
from ._hub import BroadcastHub
from ._messages import message_channels
from ._presence import PresenceFeed
from ._punch import candidates_for
from ._quic import (
    Admission,
    ConnectionSettings,
    Identity,
    QuicConn,
    QuicEndpoint,
    make_udp_socket,
    stateless_reset_key,
)
from ._stats import REFUSAL_CODES, CoordinatorStatistics, refusal_name
from ._streams import (
    StreamState,
    StreamTable,
    read_header,
    relay,
    write_message,
)
from ._types import IncomingStream, StreamId
from ._util import TokenBucket, unwrap_single_exception, wait_any
from ._wire import control
from ._wire.codes import CloseCode, Reason, StreamCode

log = logging.getLogger("conec_trio.coordinator")

# How long the target of a channel offer has to answer it.
OFFER_TIMEOUT = 5.0
# What the coordinator remembers of ids across their sessions (see PeerMemory): that many
# ids' last certificates, and ids with which each had channels brokered, per id and in all.
MAX_REMEMBERED_IDS = 100_000
MAX_BROKERED_PER_ID = 1_000
MAX_BROKERED_PAIRS = 200_000


# Requests answered with a list that may be long (ids, names).
_ListRequest = (
    control.PeerListRequest | control.BroadcastMembersRequest | control.BroadcastListRequest
)

# Channel requests a client may make: a burst, then this many a second. Each one makes its
# target punch (see _punch for the bounds on that), so they are limited at the source too.
CHANNEL_REQUEST_BURST = 20
CHANNEL_REQUEST_RATE = 5.0

# A client's control requests are not read while this many bytes of replies to it are
# unacknowledged (a client that grants no credit on its control stream stops being served,
# and its unread requests then hold back its own sending).
CONTROL_REPLY_BACKLOG = 64 * 1024


def _shown(name: object, limit: int = 100) -> str:
    """A client-chosen name for a message: repr'd, and cut short if long (replies have a
    length limit, and a name's repr can be four times the name)."""
    text = repr(name)
    return text if len(text) <= limit else text[:limit] + "..."


def _clip(text: str) -> str:
    limit = control.MAX_MESSAGE_LEN
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain_host(address: tuple[Any, ...]) -> str:
    host = str(address[0])
    if host.startswith("::ffff:"):  # an IPv4 client on a dual-stack socket
        host = host[len("::ffff:") :]
    return host


def _refuse_stream(st: StreamState, reason: Reason, message: str) -> None:
    """Answer a stream's header with a refusal and end the stream both ways."""
    write_message(st, control.encode(control.StreamRefused(reason, message)))
    st.finish_send()
    st.stop_receiving(StreamCode.REFUSED)


class ClientSession:
    """One connected (or connecting) client, as the coordinator sees it."""

    def __init__(self, coord: Coordinator, conn: QuicConn) -> None:
        self.coord = coord
        self.conn = conn
        self.id: str | None = None
        self.listen = False
        self.local_addrs: list[tuple[str, int]] = []
        self.control: StreamState | None = None
        self.hello_seen = trio.Event()
        self.offers: dict[int, trio.MemorySendChannel[control.ChannelOfferReply]] = {}
        self.channel_requests = TokenBucket(CHANNEL_REQUEST_RATE, CHANNEL_REQUEST_BURST)
        # Counted against its quotas: streams it opened through the coordinator that have
        # not ended both ways, and those of them to the coordinator not yet taken by the
        # application (see _IncomingStreams).
        self.open_streams = 0
        self.pending_opens = 0
        # Counted under CoordConfig.max_pending_connections until its hello (or its end).
        self.pending_host: str | None = None
        self.table = StreamTable(
            conn,
            window=coord.config.stream_window,
            max_message_size=coord.config.max_message_size,
            on_new_stream=self._new_stream,
            on_terminated=self._terminated,
            describe_loss=self._describe_loss,
            relay_budget=coord.config.connection_window,
        )

    @property
    def cert_der(self) -> bytes:
        cert = self.conn.peer_certificate
        return _tls.cert_der(cert) if cert is not None else b""

    @property
    def observed_addr(self) -> tuple[str, int]:
        return (_plain_host(self.conn.peer_address), int(self.conn.peer_address[1]))

    @property
    def candidates(self) -> list[tuple[str, int]]:
        """Where peers may reach this client: as the coordinator sees it, then its own view."""
        # dict.fromkeys: the first of equal addresses, in order, in linear time
        return list(dict.fromkeys([self.observed_addr, *self.local_addrs]))

    def candidates_for(self, viewer: ClientSession) -> list[tuple[str, int]]:
        """Where ``viewer`` may punch and dial this client: the observed address, and this
        client's own private-range addresses only if both share a public IP (see _punch)."""
        return candidates_for(self.observed_addr, self.local_addrs, viewer.observed_addr[0])

    def _describe_loss(self) -> ConecError:
        return ConecError(f"client {self.id!r} disconnected")

    def _new_stream(self, st: StreamState) -> None:
        if self.control is None and not self.hello_seen.is_set() and st.messages:
            # The hello came whole with the handshake's last flight (as clients send it):
            # answer it now, so the welcome leaves with the handshake confirmation.
            self.coord._hello_now(self, st)
            return
        self.coord._nursery.start_soon(self.coord._guarded, self, self.coord._handle_stream, st)

    def _terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        self.coord._client_gone(self, reason)

    def refuse(self, code: CloseCode, message: str, claimed: str | None = None) -> None:
        """Close the connection saying why; the log names the client by its id (``claimed``
        when the id is not, or no longer, this session's) and always by its address."""
        name = claimed if claimed is not None else self.id
        host, port = self.observed_addr
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        who = where if name is None else f"{_shown(name)} ({where})"
        log.info("refusing client %s: %s", who, message)
        self.coord._refusals[code] += 1
        self.conn.close(int(code), message)


_Pending: TypeAlias = tuple[ClientSession, IncomingStream]


class PeerMemory:
    """What the coordinator remembers of ids across their sessions, within bounds (the least
    recently used go first): each id's last certificate (a SHA-256), and the ids it had
    direct channels brokered with, so they hear when it comes back with another certificate
    (their channel to it leads to a process that is gone)."""

    def __init__(
        self,
        max_ids: int = MAX_REMEMBERED_IDS,
        max_per_id: int = MAX_BROKERED_PER_ID,
        max_pairs: int = MAX_BROKERED_PAIRS,
    ) -> None:
        self._max_ids = max_ids
        self._max_per_id = max_per_id
        self._max_pairs = max_pairs
        self._certs: OrderedDict[str, bytes] = OrderedDict()
        self._pairs: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self._pair_count = 0  # entries in all of _pairs' sets

    def registered(self, client_id: str, cert_sha256: bytes) -> list[str]:
        """Note that ``client_id`` registered with this certificate; if its last one was
        another, return the ids it had channels brokered with (and forget those)."""
        previous = self._certs.pop(client_id, None)
        self._certs[client_id] = cert_sha256
        while len(self._certs) > self._max_ids:
            self._certs.popitem(last=False)
        if previous is None or previous == cert_sha256:
            return []
        peers = self._pairs.pop(client_id, OrderedDict())
        self._pair_count -= len(peers)
        for peer in peers:
            theirs = self._pairs.get(peer)
            if theirs is not None and client_id in theirs:
                del theirs[client_id]
                self._pair_count -= 1
        return list(peers)

    def brokered(self, a: str, b: str) -> None:
        """The coordinator brokered a channel between ``a`` and ``b``."""
        self._add(a, b)
        self._add(b, a)

    def _add(self, owner: str, peer: str) -> None:
        peers = self._pairs.pop(owner, None)
        if peers is None:
            peers = OrderedDict()
        self._pairs[owner] = peers  # the most recently used last
        if peer in peers:
            peers.move_to_end(peer)
            return
        peers[peer] = None
        self._pair_count += 1
        if len(peers) > self._max_per_id:
            peers.popitem(last=False)
            self._pair_count -= 1
        while self._pair_count > self._max_pairs and len(self._pairs) > 1:
            _, oldest = self._pairs.popitem(last=False)
            self._pair_count -= len(oldest)

    @property
    def sizes(self) -> tuple[int, int]:
        """(ids with a remembered certificate, brokered pairs remembered)"""
        return len(self._certs), self._pair_count


class _IncomingStreams(trio.abc.ReceiveChannel[IncomingStream]):
    """``coord.incoming_streams``: the streams clients opened to the coordinator, in the
    order they came. Taking one frees a place in its client's quota of pending opens."""

    def __init__(self, recv: trio.MemoryReceiveChannel[_Pending]) -> None:
        self._recv = recv

    async def receive(self) -> IncomingStream:
        """The next stream; ``trio.EndOfChannel`` once the coordinator has shut down."""
        return self._taken(await self._recv.receive())

    def receive_nowait(self) -> IncomingStream:
        """The next stream if one is waiting, else ``trio.WouldBlock``."""
        return self._taken(self._recv.receive_nowait())

    @staticmethod
    def _taken(pending: _Pending) -> IncomingStream:
        session, incoming = pending
        session.pending_opens -= 1
        return incoming

    def statistics(self) -> trio.MemoryChannelStatistics:
        """Of the queue: ``current_buffer_used`` streams wait in it (at most
        ``max_pending_opens``; more wait to get in)."""
        return self._recv.statistics()

    async def aclose(self) -> None:
        """Take no more streams: clients' later streams to the coordinator break at once."""
        await self._recv.aclose()


@contextmanager
def _serving(session: ClientSession) -> Iterator[None]:
    """Work on behalf of one client: a failure in it (a bug, or input we did not foresee)
    closes that client's connection, never the coordinator."""
    try:
        yield
    except Exception:
        log.exception("error serving client %r; disconnecting it", session.id)
        session.conn.close(int(CloseCode.PROTOCOL), "internal error serving this client")


class Coordinator:
    """A running coordinator (see ``open_coordinator``)."""

    def __init__(self, config: CoordConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self._nursery = nursery
        self._clients: dict[str, ClientSession] = {}
        self._sessions: set[ClientSession] = set()
        self._endpoint: QuicEndpoint | None = None
        self._offer_ids = itertools.count(1)
        # Pairs of clients with a channel negotiation in progress -> the requester.
        self._negotiating: dict[frozenset[str], str] = {}
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
            await self._open_proxied(session, st, msg)
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
            self._nursery.start_soon(self._guarded, session, self._control_loop, st)

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
        conn = session.conn
        while True:
            while conn.send_backlog(st.stream_id) > CONTROL_REPLY_BACKLOG:
                if st.send_error is not None or not conn.is_open:
                    return
                await st.wait_writable()
            try:
                payload = await read_header(st)
                msg = control.decode(payload)
            except ConecError as exc:
                if session.conn.is_open and not isinstance(exc, ProtocolError):
                    return
                if session.conn.is_open:
                    session.refuse(CloseCode.PROTOCOL, f"bad control message: {exc}")
                return
            await self._control_message(session, st, msg)

    async def _control_message(self, session: ClientSession, st: StreamState, msg: Any) -> None:
        if isinstance(msg, control.BroadcastCountRequest):
            counts = self.broadcasts.counts(msg.name)
            reply: Any
            if counts is None:
                reply = control.ErrorReply(
                    msg.rid, Reason.NO_BROADCAST, f"no broadcast channel named {_shown(msg.name)}"
                )
            else:
                reply = control.BroadcastCountReply(msg.rid, *counts)
            write_message(st, control.encode(reply))
        elif isinstance(msg, control.ChannelRequest):
            assert session.id is not None
            if not session.channel_requests.take():
                limited = control.ErrorReply(
                    msg.rid,
                    Reason.LIMIT,
                    f"client {session.id!r} asks for direct channels faster than the "
                    f"coordinator allows ({CHANNEL_REQUEST_BURST} at once, then "
                    f"{CHANNEL_REQUEST_RATE:g} a second)",
                )
                write_message(st, control.encode(limited))
                return
            msg = control.ChannelRequest(msg.rid, canonical_id(msg.peer))
            pair = frozenset((session.id, msg.peer))
            if self._negotiating.get(pair) == msg.peer:
                # Both ends asked at once: the peer's opening goes on (this client got or
                # gets its offer) and gives this client its channel too: one per pair.
                busy = control.ErrorReply(
                    msg.rid,
                    Reason.PEER_OPENING,
                    f"peer {_shown(msg.peer)} is opening a channel to it",
                )
                write_message(st, control.encode(busy))
                return
            self._negotiating.setdefault(pair, session.id)
            self._nursery.start_soon(self._guarded, session, self._broker_channel, msg)
        elif isinstance(
            msg,
            control.PeerListRequest
            | control.BroadcastMembersRequest
            | control.BroadcastListRequest,
        ):
            if await self._writable(st):
                write_message(st, control.encode(self._list_reply(msg)))
        elif isinstance(msg, control.PresenceSubscribe):
            if await self._writable(st):
                self._presence.subscribe(session, msg.rid, self.client_ids())
        elif isinstance(msg, control.PresenceUnsubscribe):
            self._presence.unsubscribe(session)
        elif isinstance(msg, control.ChannelOfferReply):
            waiter = session.offers.pop(msg.oid, None)
            if waiter is not None:
                waiter.send_nowait(msg)
        else:
            session.refuse(CloseCode.PROTOCOL, f"unexpected control message {type(msg).__name__}")

    @staticmethod
    async def _writable(st: StreamState) -> bool:
        """Wait until the control stream has room for a reply that may be large (a peer
        list); False if it broke. A client that asks and does not read its replies stops
        being read, rather than making the coordinator hold them all."""
        while st.send_error is None and not st.can_write():
            await st.wait_writable()
        return st.send_error is None and st.conn.is_open

    def _list_reply(
        self,
        msg: control.PeerListRequest
        | control.BroadcastMembersRequest
        | control.BroadcastListRequest,
    ) -> control.Message:
        if isinstance(msg, control.PeerListRequest):
            return control.PeerListReply(msg.rid, self.client_ids())
        if isinstance(msg, control.BroadcastListRequest):
            return control.BroadcastListReply(msg.rid, self.broadcasts.names())
        members = self.broadcasts.members(msg.name)
        if members is None:
            return control.ErrorReply(
                msg.rid, Reason.NO_BROADCAST, f"no broadcast channel named {_shown(msg.name)}"
            )
        return control.BroadcastMembersReply(msg.rid, *members)

    async def _broker_channel(self, session: ClientSession, msg: control.ChannelRequest) -> None:
        """Ask the target whether it takes a channel from ``session``; tell the requester."""
        requester = session.id
        peer = _shown(msg.peer)
        assert requester is not None and session.control is not None
        target = self._clients.get(msg.peer)
        reply: Any
        if msg.peer == requester:
            reply = control.ErrorReply(
                msg.rid, Reason.SELF, "cannot open a direct channel to itself"
            )
        elif target is None or target.control is None:
            reply = control.ErrorReply(msg.rid, Reason.NO_PEER, f"peer {peer} is not connected")
        elif not target.listen:
            reply = control.ErrorReply(
                msg.rid,
                Reason.NOT_LISTENING,
                f"peer {peer} does not accept direct channels (it runs with listen=False)",
            )
        else:
            oid = next(self._offer_ids)
            answer_send, answer_recv = trio.open_memory_channel[control.ChannelOfferReply](1)
            target.offers[oid] = answer_send
            # Both sides' punches carry it: a punch from anyone else is ignored.
            token = secrets.token_bytes(control.PUNCH_TOKEN_SIZE)
            offer = control.ChannelOffer(
                oid, requester, session.cert_der, session.candidates_for(target), token
            )
            write_message(target.control, control.encode(offer))
            answer = None
            with trio.move_on_after(OFFER_TIMEOUT):
                answer = await answer_recv.receive()
            target.offers.pop(oid, None)
            if answer is None:
                reply = control.ErrorReply(
                    msg.rid,
                    Reason.NO_ANSWER,
                    f"peer {peer} did not answer the channel offer",
                )
            elif not answer.accept:
                reply = control.ErrorReply(
                    msg.rid,
                    Reason.REFUSED,
                    _clip(f"peer {peer} refused the channel: {answer.message}"),
                )
            else:
                self._memory.brokered(requester, msg.peer)
                reply = control.ChannelGrant(
                    msg.rid, msg.peer, target.cert_der, target.candidates_for(session), token
                )
        if session.conn.is_open:
            write_message(session.control, control.encode(reply))
        pair = frozenset((requester, msg.peer))
        if self._negotiating.get(pair) == requester:
            del self._negotiating[pair]

    async def _open_proxied(
        self, session: ClientSession, st: StreamState, msg: control.OpenProxied
    ) -> None:
        opener = session.id
        assert opener is not None
        quota = self.config.max_open_streams_per_client
        if session.open_streams >= quota:
            _refuse_stream(
                st,
                Reason.LIMIT,
                f"client {opener!r} has {quota} streams open through the coordinator, its "
                "quota (CoordConfig.max_open_streams_per_client): close one to open another",
            )
            return
        if msg.peer is None:
            await self._open_to_coordinator(session, st, msg.sid)
            return
        target = self._clients.get(canonical_id(msg.peer))
        if target is None or not target.conn.is_open:
            _refuse_stream(st, Reason.NO_PEER, f"peer {_shown(msg.peer)} is not connected")
            return
        self._count_open(session, st)
        out = target.table.open_stream()
        write_message(out, control.encode(control.IncomingProxied(msg.sid, opener)))
        write_message(st, control.encode(control.StreamAccepted()))
        st.switch_to_raw()
        out.switch_to_raw()
        st.linked, out.linked = out, st
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, st, out, self._count_relayed)
            nursery.start_soon(relay, out, st, self._count_relayed)

    async def _open_to_coordinator(self, session: ClientSession, st: StreamState, n: int) -> None:
        """Accept a stream to the coordinator and queue it for ``incoming_streams``."""
        opener = session.id
        assert opener is not None
        quota = self.config.max_pending_opens_per_client
        if session.pending_opens >= quota:
            _refuse_stream(
                st,
                Reason.LIMIT,
                f"client {opener!r} has {quota} streams waiting for the coordinator to take "
                "them, its quota (CoordConfig.max_pending_opens_per_client)",
            )
            return
        write_message(st, control.encode(control.StreamAccepted()))
        self._count_open(session, st)
        send, recv = message_channels(st, opener, StreamId.proxied(n))
        session.pending_opens += 1
        queued = False
        try:
            await self._incoming_send.send(
                (session, IncomingStream(opener, StreamId.proxied(n), send, recv))
            )
            queued = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            st.fail(ConecError("the coordinator no longer accepts streams"), StreamCode.REFUSED)
        finally:
            if not queued:
                session.pending_opens -= 1

    @staticmethod
    def _count_open(session: ClientSession, st: StreamState) -> None:
        """Count ``st`` against its opener's quota until it has ended both ways."""
        session.open_streams += 1

        def ended() -> None:
            session.open_streams -= 1

        st.on_done = ended

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
