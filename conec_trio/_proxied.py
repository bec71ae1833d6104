"""Streams clients open through the coordinator (``OpenProxied``): to a peer, relayed both
ways, or to the coordinator itself, queued for ``coord.incoming_streams`` (``_IncomingStreams``).
Each counts against its opener's quotas until it has ended."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeAlias

import trio

from ._config import CoordConfig, canonical_id
from ._exceptions import ConecError
from ._messages import message_channels
from ._session import ClientSession, _refuse_stream, _shown
from ._streams import StreamState, relay, write_message
from ._types import IncomingStream, StreamId
from ._wire import control
from ._wire.codes import Reason, StreamCode

_Pending: TypeAlias = tuple[ClientSession, IncomingStream]


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


class StreamOpener:
    """Opens the streams clients ask for with ``OpenProxied``: to a connected peer (``clients``)
    or to the coordinator (into ``queue``); ``count_relayed`` hears of every relayed byte."""

    def __init__(
        self,
        config: CoordConfig,
        clients: Mapping[str, ClientSession],
        queue: trio.MemorySendChannel[_Pending],
        count_relayed: Callable[[int], None],
    ) -> None:
        self.config = config
        self._clients = clients
        self._queue = queue
        self._count_relayed = count_relayed

    async def open_proxied(
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
        write_message(
            out, control.encode(control.IncomingProxied(msg.sid, opener, msg.kind, msg.token))
        )
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
            await self._queue.send(
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
