"""Moving streams that ``new_stream`` made proxied onto a direct channel once one is up.

Each direction moves on its own, at a message boundary (``send()`` writes a whole message at
once, so any moment between two sends is one). The sender writes the moved marker
(``framing.MOVED_MARKER``) where the next message length would go, ends its direction of the
proxied stream, and goes on over one direct QUIC stream per moved stream, whose header
(``MoveProxied``) names the proxied stream: the opener's proxied id and a random token that
``OpenProxied``/``IncomingProxied`` carried, so that a reused id is never mistaken for an older
stream. The opener of the proxied stream opens the direct one when the channel comes up and
moves its own direction at once; the acceptor moves its direction when that stream arrives
(both directions share the one direct QUIC stream). A receiver reads the proxied path up to
the marker, then the direct stream, whose data waits meanwhile: nothing is lost, duplicated
or reordered, and neither application does anything.

Memory while both paths are in use, per direction of one stream: the sender holds at most one
stream window unacknowledged on each path (``StreamState.can_write``), and the receiver at
most one window plus one partial message on each (credit is granted only for what the
application took), so at most twice what a stream that does not move holds:
``2 * (stream_window + max_message_size)`` at the receiver.

A stream never moves back: if the channel closes while any part of the stream is on it, the
whole stream breaks.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import trio

from ._exceptions import ChannelError, ConecError, ProtocolError
from ._messages import MessageReceiveChannel, MessageSendChannel
from ._streams import StreamState, write_message
from ._wire import control
from ._wire.codes import StreamCode
from ._wire.framing import MOVED_MARKER

if TYPE_CHECKING:
    from ._direct import DirectChannel
    from ._quic import QuicConn

log = logging.getLogger("conec_trio.paths")

# How long a receiver that met the moved marker waits for the direct stream, and how long a
# direct stream announcing a move waits for its proxied stream to arrive through the
# coordinator (the two paths race).
MOVE_TIMEOUT = 10.0
# Direct streams that may wait for their proxied stream at once, per peer (the peer's QUIC
# stream limit bounds them too).
MAX_PENDING_MOVES = 1000


def new_token() -> int:
    """A random token naming one movable stream (fits ``control.MAX_INT``)."""
    return secrets.randbits(62)


class MovableStream:
    """Both public ends of one movable stream, and the paths under them."""

    def __init__(
        self,
        migrations: Migrations,
        peer: str,
        sid: int,
        token: int,
        proxied: StreamState,
        send: MessageSendChannel,
        recv: MessageReceiveChannel,
        *,
        opener: bool,
    ) -> None:
        self.migrations = migrations
        self.peer = peer
        self.sid = sid
        self.token = token
        self.proxied = proxied
        self.send_end = send
        self.recv_end = recv
        self.opener = opener
        self.direct: StreamState | None = None
        self.broken: ConecError | None = None
        self._attached = trio.Event()  # set once ``direct`` is, or the stream broke
        self._release = proxied.on_done  # frees the proxied id (opener side)
        self._parts = 1  # parts (proxied, direct) not yet done both ways
        proxied.on_done = self._proxied_done
        send._mover = self
        recv._mover = self

    # -- the move -----------------------------------------------------------------------------

    def attach(self, direct: StreamState) -> None:
        """``direct`` carries this stream on from now on: move our sending direction there."""
        assert self.direct is None
        self.direct = direct
        self._parts += 1
        direct.on_done = self._part_done
        self._attached.set()
        if self.broken is not None:
            direct.fail(self.broken, StreamCode.ABORTED)
            return
        proxied = self.proxied
        if proxied.send_error is not None:
            direct.reset(StreamCode.ABORTED)
        elif proxied.send_finished:
            direct.finish_send()  # our direction had ended: nothing to move
        else:
            self.send_end._st = direct
            proxied.write(MOVED_MARKER)
            proxied.finish_send()  # wakes a send() waiting for credit: it goes on over direct
        if proxied.recv_finished and not (proxied.decoder is not None and proxied.decoder.moved):
            # The peer's direction ended on the proxied path: it never comes here.
            direct.stop_receiving(StreamCode.STOPPED)

    async def receive_moved(self, proxied: StreamState) -> StreamState:
        if proxied is not self.proxied:
            error = ProtocolError("the peer sent a second moved marker")
            proxied.fail(error, StreamCode.PROTOCOL)
            raise trio.BrokenResourceError(str(error)) from error
        # The end of the proxied direction follows the marker at once.
        while not (proxied.fin_received or proxied.recv_error or proxied.recv_finished):
            await proxied.readers.park()
        if not proxied.recv_finished:
            proxied.finish_receive()
        with trio.move_on_after(MOVE_TIMEOUT):
            await self._attached.wait()
        if self.broken is None and self.direct is None:
            self.fail(
                ChannelError(
                    f"peer {self.peer!r} moved a stream onto a direct channel that did not "
                    f"deliver it within {MOVE_TIMEOUT:g} s"
                )
            )
        if self.broken is not None:
            raise trio.BrokenResourceError(str(self.broken)) from self.broken
        assert self.direct is not None
        log.debug("stream %d from %r: receiving over the direct channel", self.token, self.peer)
        return self.direct

    # -- breaking and ending ----------------------------------------------------------------------

    def abort(self, cause: ConecError) -> None:
        self.fail(cause)

    def fail(self, cause: ConecError) -> None:
        """Break the stream both ways, on both paths (``abort()``, or its channel closed)."""
        if self.broken is None:
            self.broken = cause
        self._attached.set()
        self.migrations.forget(self)
        self.proxied.fail(cause, StreamCode.ABORTED)
        if self.direct is not None:
            self.direct.fail(cause, StreamCode.ABORTED)

    def _proxied_done(self) -> None:
        direct = self.direct
        decoder = self.proxied.decoder
        moved = decoder is not None and decoder.moved
        if direct is not None and not moved:
            direct.stop_receiving(StreamCode.STOPPED)
        if direct is not None or not moved:  # else the peer's direct stream is on its way
            self.migrations.forget(self)
        self._part_done()

    def _part_done(self) -> None:
        self._parts -= 1
        if self._parts == 0:
            self.migrations.finished(self)
            if self._release is not None:
                self._release()
                self._release = None


class Migrations:
    """A client's movable streams: the ones it opened (moved when a channel comes up) and the
    ones it accepted (moved when the opener's direct stream arrives)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._outgoing: dict[str, set[MovableStream]] = {}  # ours, still proxied, by peer
        self._incoming: dict[tuple[str, int], MovableStream] = {}  # by (opener, token)
        self._pending: dict[tuple[str, int], StreamState] = {}  # direct streams that came first
        self._moved: dict[QuicConn, set[MovableStream]] = {}  # on a direct channel

    def outgoing(self, stream: MovableStream, channel: DirectChannel | None) -> None:
        """A stream this client opened proxied; it moves onto ``channel`` now if given."""
        if channel is not None:
            self._move(stream, channel)
        else:
            self._outgoing.setdefault(stream.peer, set()).add(stream)

    def has_outgoing(self, peer: str) -> bool:
        """Streams this client opened to ``peer`` are in use on the proxied path."""
        return bool(self._outgoing.get(peer))

    def channel_up(self, channel: DirectChannel) -> None:
        """A channel is up: move every stream this client opened to its peer."""
        streams = self._outgoing.pop(channel.peer, set())
        for stream in streams:
            self._move(stream, channel)
        if streams:
            log.info("moved %d stream(s) to %r onto the direct channel", len(streams), channel.peer)
        self._nursery.start_soon(self._watch, channel.peer, channel.conn)

    def _move(self, stream: MovableStream, channel: DirectChannel) -> None:
        if stream.broken is not None:
            return
        direct = channel.table.open_stream()
        write_message(direct, control.encode(control.MoveProxied(stream.sid, stream.token)))
        self._moved.setdefault(channel.conn, set()).add(stream)
        stream.attach(direct)

    async def _watch(self, peer: str, conn: QuicConn) -> None:
        """Break the streams on a channel when it closes (they never move back)."""
        await conn.closed.wait()
        moved = self._moved.pop(conn, set())
        waiting = [
            s
            for (opener, _), s in self._incoming.items()
            if opener == peer and s.proxied.decoder is not None and s.proxied.decoder.moved
        ]
        cause = ChannelError(f"the direct channel to {peer!r} closed under a moved stream")
        for stream in [*moved, *waiting]:
            stream.fail(cause)

    def incoming(self, stream: MovableStream) -> None:
        key = (stream.peer, stream.token)
        self._incoming[key] = stream
        direct = self._pending.pop(key, None)
        if direct is not None:
            self._accept_move(stream, direct)

    def move_arrived(self, peer: str, direct: StreamState, msg: control.MoveProxied) -> None:
        """The peer opened a direct stream that carries on its proxied stream ``msg``."""
        key = (peer, msg.token)
        stream = self._incoming.get(key)
        if stream is not None:
            self._accept_move(stream, direct)
            return
        # The proxied stream may still be on its way through the coordinator.
        if sum(1 for p, _ in self._pending if p == peer) >= MAX_PENDING_MOVES:
            direct.fail(ProtocolError("too many moves of unknown streams"), StreamCode.REFUSED)
            return
        self._pending[key] = direct
        self._nursery.start_soon(self._expire, key, direct)

    async def _expire(self, key: tuple[str, int], direct: StreamState) -> None:
        with trio.move_on_after(MOVE_TIMEOUT):
            while self._pending.get(key) is direct and direct.recv_error is None:
                await direct.readers.park()
        if self._pending.get(key) is direct:
            del self._pending[key]
            direct.fail(ConecError("no such stream to move"), StreamCode.REFUSED)

    def _accept_move(self, stream: MovableStream, direct: StreamState) -> None:
        del self._incoming[(stream.peer, stream.token)]
        self._moved.setdefault(direct.conn, set()).add(stream)
        stream.attach(direct)

    def finished(self, stream: MovableStream) -> None:
        """``stream`` is done on every path."""
        if stream.direct is not None:
            moved = self._moved.get(stream.direct.conn)
            if moved is not None:
                moved.discard(stream)

    def forget(self, stream: MovableStream) -> None:
        """``stream`` is done on the proxied path."""
        outgoing = self._outgoing.get(stream.peer)
        if outgoing is not None:
            outgoing.discard(stream)
            if not outgoing:
                del self._outgoing[stream.peer]
        if self._incoming.get((stream.peer, stream.token)) is stream:
            del self._incoming[(stream.peer, stream.token)]
