"""The client: its coordinator connection, streams, incoming streams and direct channels."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from . import _tls
from ._broadcast import join_broadcast
from ._client_link import CoordinatorConnection
from ._config import (
    ClientConfig,
)
from ._connect import Link
from ._direct import DirectContext, DirectManager
from ._exceptions import (
    BroadcastNotFoundError,
    ChannelError,
    ConecError,
    PeerNotFoundError,
    ProtocolError,
    RefusedError,
    StreamIdInUseError,
)
from ._messages import MessageReceiveChannel, MessageSendChannel, message_channels
from ._paths import Paths, PathsContext
from ._presence import PeerEvent, Presence
from ._stats import ClientStatistics
from ._streams import StreamState, read_header, write_message
from ._types import BroadcastMessage, PingResult, StreamId
from ._util import unwrap_single_exception
from ._wire import control
from ._wire.codes import CloseCode, Reason, StreamCode

log = logging.getLogger("conec_trio.client")

# How long a client waits at exit for its cleanly closed streams to be acknowledged.
FLUSH_TIMEOUT = 2.0


class Client(CoordinatorConnection):
    """A client connected to a coordinator (see ``open_client``)."""

    def __init__(self, config: ClientConfig, nursery: trio.Nursery) -> None:
        super().__init__(config, nursery)
        self._direct_ids: set[int] = set()
        self._direct = DirectManager(
            DirectContext(
                id=self.id,
                config=config,
                client_ca=self._client_ca,
                nursery=nursery,
                endpoint=lambda: self._socket,
                settings=self._settings,
                request=self._request,
                send_control=self._send_control,
                deliver_incoming=self._deliver_incoming,
                direct_ids=self._direct_ids,
                id_in_use=self._id_in_use,
                cert_der=lambda: _tls.cert_der(self._identity().certificate),
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
        self._presence = Presence(self._send_control)

    # -- opening streams ---------------------------------------------------------------------------

    # -- opening streams through the coordinator ----------------------------------------------

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
        coordinator; waits briefly for a channel ``peer`` is opening to this client right
        now (``peer``'s ``new_channel`` may return a moment before it is open here)."""
        await trio.lowlevel.checkpoint()
        self._raise_if_lost()
        await self._direct.wait_accepting(peer)
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
        coordinator, its direct channels, and why direct channels to some peers failed."""
        link = self._link
        return ClientStatistics(
            id=self.id,
            observed_address=self.observed_address,
            connected=self.connected,
            channels=self._direct.statistics(),
            direct_failures=self._paths.failures(),
            coordinator_datagram_size=(
                link.conn.datagram_size if link is not None and link.conn.is_open else None
            ),
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
