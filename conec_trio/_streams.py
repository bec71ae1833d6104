"""Message streams over QUIC streams: trio send/receive channels with backpressure.

Each conec stream is one bidirectional QUIC stream. The receive side parses length-prefixed
messages (``_wire.framing``) and grants the sender credit only for bytes the application has
consumed, so a reader that stops reading eventually blocks its writer. The send side waits
while more than a window of its data is unacknowledged, then writes a whole message at once:
a cancelled ``send()`` sent all of its message or none of it.

Error mapping (see the API contract): own close -> ``trio.ClosedResourceError``; clean end ->
``trio.EndOfChannel``; reset, stop-sending or a lost connection -> ``trio.BrokenResourceError``
raised from a ``ConecError`` saying why.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from ._exceptions import ConecError, MessageTooLargeError, ProtocolError
from ._quic import ConnectionListener, QuicConn
from ._types import StreamId
from ._wire.codes import StreamCode
from ._wire.framing import FrameDecoder, frame_header

# The relay hands on raw bytes in pieces of at most this size.
RELAY_CHUNK = 64 * 1024
# Messages up to this size are written to QUIC together with their header in one call.
SMALL_MESSAGE = 4096


def _varint_len(n: int) -> int:
    return 1 if n < 64 else 2 if n < 16384 else 4 if n < 1 << 30 else 8


class StreamState:
    """Shared state of one QUIC bidirectional stream on this side."""

    def __init__(self, table: StreamTable, stream_id: int) -> None:
        self.table = table
        self.conn = table.conn
        self.stream_id = stream_id
        self.decoder: FrameDecoder | None = FrameDecoder(table.max_message_size)
        self.messages: deque[bytes] = deque()
        self.raw: deque[bytes] = deque()
        self.held = 0  # bytes that arrived but the application has not consumed
        self.fin_received = False
        self.recv_error: ConecError | None = None  # set: the receive side is broken
        self.send_error: ConecError | None = None  # set: the send side is broken
        self.send_finished = False  # we sent FIN or reset
        self.recv_finished = False  # we saw the end, or stopped reading
        self.readers = trio.lowlevel.ParkingLot()
        self.writers = trio.lowlevel.ParkingLot()
        self.linked: StreamState | None = None  # the other half, when relayed
        self.on_done: Callable[[], None] | None = None  # called once both directions end
        self._arrived = 0
        self._reported = 0

    # -- receive side -------------------------------------------------------------------------

    def wake(self) -> None:
        """Wake everything waiting on this stream, and on the stream it is relayed with."""
        self.readers.unpark_all()
        self.writers.unpark_all()
        if self.linked is not None:
            self.linked.readers.unpark_all()
            self.linked.writers.unpark_all()

    def data_arrived(self, data: bytes, fin: bool) -> None:
        self._arrived += len(data)
        if self.recv_finished:
            # We stopped reading: late data is dropped, and must not hold connection credit.
            self._report_consumed()
            return
        if data:
            if self.decoder is not None:
                self._decode(data)
            else:
                self.raw.append(data)
                self.held += len(data)
        if fin:
            self.fin_received = True
            if self.decoder is not None and not self.decoder.at_boundary:
                self.recv_error = ProtocolError(
                    f"stream ended in the middle of a message ({self.decoder.buffered} bytes "
                    "of it arrived)"
                )
        self._report_consumed()
        self.wake()

    def _decode(self, data: bytes) -> None:
        decoder = self.decoder
        assert decoder is not None
        try:
            decoder.feed(data)
            while (msg := decoder.next_message()) is not None:
                self.messages.append(msg)
                self.held += len(msg) + _varint_len(len(msg))
        except MessageTooLargeError as exc:
            self.fail(ProtocolError(f"peer sent an oversized message: {exc}"), StreamCode.PROTOCOL)

    def _report_consumed(self) -> None:
        # Bytes of a message still being assembled count as consumed: the sender must be
        # able to finish a message larger than the window.
        consumed = self._arrived - (0 if self.recv_finished else self.held)
        delta = consumed - self._reported
        if delta > 0:
            self._reported = consumed
            self.conn.add_consumed(self.stream_id, delta)

    def take_message(self) -> bytes:
        msg = self.messages.popleft()
        self.held -= len(msg) + _varint_len(len(msg))
        self._report_consumed()
        return msg

    def take_raw(self, max_bytes: int) -> bytes:
        chunk = self.raw.popleft()
        if len(chunk) > max_bytes:
            self.raw.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    def release_raw(self, nbytes: int) -> None:
        """The relay passed ``nbytes`` on: they no longer count against the window."""
        self.held -= nbytes
        self._report_consumed()

    def switch_to_raw(self) -> None:
        """After the header: hand on bytes as they come instead of parsing messages."""
        decoder = self.decoder
        assert decoder is not None
        self.decoder = None
        # Complete messages after the header go first, re-framed, then any partial one.
        while self.messages:
            msg = self.messages.popleft()
            self.raw.append(frame_header(len(msg)) + msg)
        leftover = decoder.take_buffered()
        if leftover:
            self.raw.append(leftover)
        self.held = sum(len(c) for c in self.raw)

    # -- send side ----------------------------------------------------------------------------

    def can_write(self) -> bool:
        return self.conn.send_backlog(self.stream_id) < self.table.window

    def write(self, data: bytes | bytearray | memoryview, end: bool = False) -> None:
        self.conn.send_stream_data(self.stream_id, bytes(data), end)

    def finish_send(self) -> None:
        if not self.send_finished:
            self.send_finished = True
            if self.send_error is None and self.conn.is_open:
                self.conn.send_stream_data(self.stream_id, b"", True)
        self.wake()
        self.table.maybe_forget(self)

    def reset(self, code: int) -> None:
        if not self.send_finished:
            self.send_finished = True
            if self.conn.is_open:
                self.conn.reset_stream(self.stream_id, code)
        self.wake()
        self.table.maybe_forget(self)

    def stop_receiving(self, code: int) -> None:
        if not self.recv_finished:
            self.recv_finished = True
            if not self.fin_received and self.conn.is_open:
                self.conn.stop_stream(self.stream_id, code)
            self.messages.clear()
            self.raw.clear()
            self.held = 0
            self._report_consumed()
        self.wake()
        self.table.maybe_forget(self)

    def fail(self, cause: ConecError, code: int) -> None:
        """Break both directions (bad input from the peer, or a local policy)."""
        if self.recv_error is None:
            self.recv_error = cause
        if self.send_error is None:
            self.send_error = cause
        self.reset(code)
        self.stop_receiving(code)

    def connection_lost(self, cause: ConecError) -> None:
        if self.send_error is None and not self.send_finished:
            self.send_error = cause
        if self.recv_error is None and not self.fin_received:
            self.recv_error = cause
        self.wake()


class StreamTable(ConnectionListener):
    """All streams of one connection; routes the connection's events to them."""

    def __init__(
        self,
        conn: QuicConn,
        *,
        window: int,
        max_message_size: int,
        on_new_stream: Callable[[StreamState], None],
        on_terminated: Callable[[QuicConn, int, str], None] | None = None,
        describe_loss: Callable[[], ConecError] | None = None,
    ) -> None:
        self.conn = conn
        self.window = window
        self.max_message_size = max_message_size
        self.streams: dict[int, StreamState] = {}
        self._on_new_stream = on_new_stream
        self._on_terminated = on_terminated
        self._describe_loss = describe_loss or (lambda: ConecError("connection lost"))
        self._blocked: set[StreamState] = set()
        self.progress = trio.lowlevel.ParkingLot()  # unparked whenever acks or credit arrive
        self._peer_next = 0  # peer-initiated stream ids below this have been seen...
        self._peer_unseen: set[int] = set()  # ...except these (reordered arrivals)
        conn.listener = self

    def open_stream(self) -> StreamState:
        sid = self.conn.next_stream_id()
        st = StreamState(self, sid)
        self.streams[sid] = st
        return st

    def maybe_forget(self, st: StreamState) -> None:
        if st.send_finished and st.recv_finished:
            if st.on_done is not None:
                st.on_done()
                st.on_done = None
            self.streams.pop(st.stream_id, None)
            self._blocked.discard(st)
            self.conn.forget_stream(st.stream_id)

    async def flush(self) -> None:
        """Wait until every stream this side cleanly closed has been acknowledged in full
        (FIN included), or the connection is gone."""
        conn = self.conn
        while conn.is_open and not all(
            conn.fin_acked(sid)
            for sid, st in self.streams.items()
            if st.send_finished and st.send_error is None
        ):
            await self.progress.park()

    def abort_all(self, code: int) -> None:
        """Break every stream still open both ways (the owner is going away)."""
        for st in list(self.streams.values()):
            st.reset(code)
            st.stop_receiving(code)

    def block_writer(self, st: StreamState) -> None:
        self._blocked.add(st)

    def _is_new_peer_stream(self, sid: int) -> bool:
        if sid >= self._peer_next:
            self._peer_unseen.update(range(self._peer_next, sid, 4))
            self._peer_next = sid + 4
            return True
        if sid in self._peer_unseen:
            self._peer_unseen.discard(sid)
            return True
        return False

    def _peer_initiated(self, sid: int) -> bool:
        client_initiated = sid % 2 == 0
        return client_initiated != self.conn.is_client and sid % 4 < 2

    # -- ConnectionListener ---------------------------------------------------------------------

    def stream_data(self, conn: QuicConn, stream_id: int, data: bytes, fin: bool) -> None:
        st = self.streams.get(stream_id)
        if st is None:
            if not (self._peer_initiated(stream_id) and self._is_new_peer_stream(stream_id)):
                # Late data for a stream we no longer read: give its credit back.
                self.conn.discard_received(len(data))
                return
            st = StreamState(self, stream_id)
            self.streams[stream_id] = st
            st.data_arrived(data, fin)
            self._on_new_stream(st)
            return
        st.data_arrived(data, fin)

    def stream_reset(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        st = self.streams.get(stream_id)
        if st is not None and st.recv_error is None and not st.recv_finished:
            st.recv_error = ConecError(f"the peer reset the stream (code {error_code:#x})")
            st.wake()

    def stop_sending(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        st = self.streams.get(stream_id)
        if st is not None and st.send_error is None and not st.send_finished:
            st.send_error = ConecError(
                f"the peer stopped reading the stream (code {error_code:#x})"
            )
            st.reset(StreamCode.STOPPED)

    def send_progress(self, conn: QuicConn) -> None:
        if self.progress:
            self.progress.unpark_all()
        if not self._blocked:
            return
        ready = [st for st in self._blocked if st.send_error is not None or st.can_write()]
        for st in ready:
            self._blocked.discard(st)
            st.writers.unpark_all()

    def terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        cause = self._describe_loss()
        for st in list(self.streams.values()):
            st.connection_lost(cause)
        self._blocked.clear()
        if self._on_terminated is not None:
            self._on_terminated(conn, error_code, reason)


def _broken(cause: ConecError) -> trio.BrokenResourceError:
    exc = trio.BrokenResourceError(str(cause))
    exc.__cause__ = cause
    return exc


class MessageSendChannel(trio.abc.SendChannel[bytes]):
    """The sending end of a conec stream: sends whole messages. Public as
    ``conec_trio.MessageSendChannel``.

    Every stream end the library hands out for sending is one: those of ``new_stream``,
    ``new_proxied_stream``, ``new_direct_stream``, ``new_stream_with_id`` and of the
    ``IncomingStream`` items of ``incoming_streams`` (typed there as trio's
    ``SendChannel[bytes]``). ``.peer`` is the other party's id (None for the coordinator) and
    ``.stream_id`` the stream's :class:`~conec_trio.StreamId`.

    Beyond trio's ``SendChannel``, :meth:`abort` ends the stream abruptly both ways, so that
    the peer sees a break rather than the clean end :meth:`aclose` gives.
    """

    def __init__(self, state: StreamState, peer: str | None, stream_id: StreamId) -> None:
        self._st = state
        self._closed = False
        self.peer = peer
        self.stream_id = stream_id

    async def send(self, value: bytes | bytearray | memoryview) -> None:
        """Send one message; waits while the receiver is not keeping up.

        Raises ``MessageTooLargeError`` (nothing sent) for a message over the maximum size,
        ``trio.BrokenResourceError`` if the stream broke, ``trio.ClosedResourceError`` after
        our own ``aclose()``.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        st = self._st
        if self._closed:
            raise trio.ClosedResourceError("this send channel was closed")
        size = memoryview(value).nbytes
        if size > st.table.max_message_size:
            raise MessageTooLargeError(
                f"message of {size} bytes is over the maximum of {st.table.max_message_size}"
            )
        while True:
            if st.send_error is not None:
                raise _broken(st.send_error)
            if st.send_finished:
                raise trio.ClosedResourceError("this stream's send side was closed")
            if st.can_write():
                break
            st.table.block_writer(st)
            await st.writers.park()
            if self._closed:
                raise trio.ClosedResourceError("this send channel was closed")
        conn = st.conn
        if size <= SMALL_MESSAGE:
            conn.send_stream_data(st.stream_id, frame_header(size) + bytes(value), wake=False)
        else:  # not worth copying a large message just to prepend its header
            conn.send_stream_data(st.stream_id, frame_header(size), wake=False)
            conn.send_stream_data(st.stream_id, bytes(value), wake=False)
        conn.send_now()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def abort(self) -> None:
        """End the stream abruptly, both ways (a QUIC reset and stop-sending).

        The peer's reads and sends raise ``trio.BrokenResourceError`` (not
        ``trio.EndOfChannel``), so it cannot mistake a cut-off stream for a complete one;
        what was not yet delivered may be lost. Use it where a clean end would lie, say when
        relaying a connection that broke. Later sends on this end raise
        ``trio.ClosedResourceError``, and the receiving end of the same stream raises
        ``trio.BrokenResourceError`` (aborted by this side); closing either end afterwards is
        fine. Calling it again, or after :meth:`aclose`, does nothing. Raises nothing itself,
        and is a checkpoint.
        """
        if not self._closed:
            self._closed = True
            self._st.fail(ConecError("the stream was aborted by this side"), StreamCode.ABORTED)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """End the stream after everything sent so far (the reader gets EndOfChannel)."""
        if not self._closed:
            self._closed = True
            self._st.finish_send()
            self._st.writers.unpark_all()
        await trio.lowlevel.checkpoint()


class MessageReceiveChannel(trio.abc.ReceiveChannel[bytes]):
    """The receiving end of a conec stream: whole messages, in order. Public as
    ``conec_trio.MessageReceiveChannel``.

    Every stream end the library hands out for receiving on a stream is one (see
    :class:`MessageSendChannel`); it carries the same ``.peer`` and ``.stream_id`` as its
    sending end. To break the stream both ways, call the sending end's
    :meth:`MessageSendChannel.abort`.
    """

    def __init__(self, state: StreamState, peer: str | None, stream_id: StreamId) -> None:
        self._st = state
        self._closed = False
        self.peer = peer
        self.stream_id = stream_id

    async def receive(self) -> bytes:
        """The next whole message.

        Raises ``trio.EndOfChannel`` after the sender's clean close, ``trio.BrokenResourceError``
        if the stream broke, ``trio.ClosedResourceError`` after our own ``aclose()``.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        st = self._st
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this receive channel was closed")
            if st.messages:
                msg = st.take_message()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return msg
            if st.recv_error is not None:
                raise _broken(st.recv_error)
            if st.fin_received:
                st.recv_finished = True
                st.table.maybe_forget(st)
                raise trio.EndOfChannel
            await st.readers.park()

    async def aclose(self) -> None:
        """Stop reading: the sender's further sends raise BrokenResourceError."""
        if not self._closed:
            self._closed = True
            self._st.stop_receiving(StreamCode.STOPPED)
        await trio.lowlevel.checkpoint()


def message_channels(
    state: StreamState, peer: str | None, stream_id: StreamId
) -> tuple[MessageSendChannel, MessageReceiveChannel]:
    return (
        MessageSendChannel(state, peer, stream_id),
        MessageReceiveChannel(state, peer, stream_id),
    )


async def read_header(state: StreamState) -> bytes:
    """The first message of a stream (its conec header), as raw CBOR bytes."""
    while True:
        if state.messages:
            return state.take_message()
        if state.recv_error is not None:
            raise state.recv_error
        if state.fin_received or state.recv_finished:
            raise ProtocolError("stream ended before its header")
        await state.readers.park()


def write_message(state: StreamState, payload: bytes) -> None:
    """Write one framed message without waiting (headers and replies: small, bounded)."""
    state.conn.send_stream_data(state.stream_id, frame_header(len(payload)) + payload)


async def relay(
    src: StreamState, dst: StreamState, passed_on: Callable[[int], None] | None = None
) -> None:
    """Copy raw bytes from ``src`` to ``dst`` until the end, with backpressure;
    ``passed_on(n)`` hears of every ``n`` bytes written to ``dst``.

    ``src`` counts bytes as consumed only once ``dst`` took them, so the relay holds at most
    one window on each side plus one chunk. Ends and breaks are passed on: FIN as FIN,
    reset as reset, and a ``dst`` that stopped reading stops ``src``.
    """
    while True:
        if dst.send_error is not None or dst.send_finished:
            src.stop_receiving(StreamCode.STOPPED)
            return
        if src.raw:
            if not dst.can_write():
                dst.table.block_writer(dst)
                await dst.writers.park()
                continue
            chunk = src.take_raw(RELAY_CHUNK)
            dst.write(chunk)
            src.release_raw(len(chunk))
            if passed_on is not None:
                passed_on(len(chunk))
            continue
        if src.recv_error is not None or src.recv_finished:
            dst.reset(StreamCode.RELAY_BROKEN)
            src.stop_receiving(StreamCode.RELAY_BROKEN)
            return
        if src.fin_received:
            src.recv_finished = True
            src.table.maybe_forget(src)
            dst.finish_send()
            return
        await src.readers.park()
