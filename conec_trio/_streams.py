"""Message streams over QUIC streams: the state of each stream, with backpressure.

Each conec stream is one bidirectional QUIC stream. The receive side parses length-prefixed
messages (``_wire.framing``) and grants the sender credit only for bytes the application has
consumed, so a reader that stops reading eventually blocks its writer. The send side waits
while more than a window of its data is unacknowledged (``StreamState.wait_writable``).

``StreamState`` holds a stream's state and the methods that change it; ``StreamTable`` routes
a connection's events to its streams. The public stream ends over them are in ``_messages``;
headers, replies and the coordinator's relay use the functions at the end of this module.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from ._exceptions import ConecError, MessageTooLargeError, ProtocolError
from ._quic import ConnectionListener, QuicConn
from ._wire.codes import StreamCode
from ._wire.framing import FrameDecoder, frame_header

# The relay hands on raw bytes in pieces of at most this size.
RELAY_CHUNK = 64 * 1024


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
        # set by ``relay``: passes on what arrives, right where it arrives (see data_arrived)
        self.pass_on: Callable[[], None] | None = None
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
                if self.pass_on is not None and not fin:
                    # Relayed: passed on from the endpoint's event handling; the ACK of it
                    # rides on the answer passed back, or leaves with the batch. The relay
                    # task is woken only for what it must handle: bytes left for lack of
                    # room (it waits for credit), ends and breaks.
                    self.pass_on()
                    self.conn.ack_relayed()
                    if not self.raw:
                        return
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
        except ProtocolError as exc:
            self.fail(exc, StreamCode.PROTOCOL)

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

    def finish_receive(self) -> None:
        """The reader met the peer's clean end (FIN after the last message)."""
        self.recv_finished = True
        self.table.maybe_forget(self)

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
        if self.linked is not None:
            return self.relay_room() > 0
        return self.conn.send_backlog(self.stream_id) < self.table.window

    def relay_room(self) -> int:
        """How many bytes the relay may write to this stream now: no more than the reader
        granted (stream and connection credit), no more than a window unacknowledged on this
        stream, and no more than the table's ``relay_budget`` waiting on the connection."""
        backlog_room = self.table.window - self.conn.send_backlog(self.stream_id)
        return min(backlog_room, self.conn.send_room(self.stream_id, self.table.relay_budget))

    async def wait_writable(self) -> None:
        """Wait until acknowledgements or credit arrive (or the stream breaks): call when
        ``can_write()`` is false, then check again."""
        self.table.block_writer(self)
        await self.writers.park()

    def write(self, data: bytes | bytearray | memoryview, end: bool = False) -> None:
        self.conn.send_stream_data(self.stream_id, bytes(data), end)

    def relay_from(self, src: StreamState, passed_on: Callable[[int], None] | None) -> None:
        """Pass on to this stream what ``src`` holds, as far as ``relay_room`` allows now;
        it leaves with the batch being handled, or from the driver (``send_soon``)."""
        conn = self.conn
        if self.send_error is not None or self.send_finished or not conn.send_open(self.stream_id):
            return  # the relay task handles the break (its event may not be handled yet)
        moved = False
        while src.raw:
            room = self.relay_room()
            if room <= 0:
                break
            chunk = src.take_raw(min(room, RELAY_CHUNK))
            conn.send_stream_data(self.stream_id, chunk, wake=False)
            src.release_raw(len(chunk))
            if passed_on is not None:
                passed_on(len(chunk))
            moved = True
        if moved:
            conn.send_soon()

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

    def peer_reset(self, error_code: int) -> None:
        """The peer reset its send side (RESET_STREAM): reading breaks."""
        if self.recv_error is None and not self.recv_finished:
            self.recv_error = ConecError(f"the peer reset the stream (code {error_code:#x})")
            self.wake()

    def peer_stopped(self, error_code: int) -> None:
        """The peer stopped reading (STOP_SENDING): sending breaks, and we reset."""
        if self.send_error is None and not self.send_finished:
            self.send_error = ConecError(
                f"the peer stopped reading the stream (code {error_code:#x})"
            )
            self.reset(StreamCode.STOPPED)

    def connection_lost(self, cause: ConecError) -> None:
        if self.send_error is None and not self.send_finished:
            self.send_error = cause
        if self.recv_error is None and not self.fin_received:
            self.recv_error = cause
        self.wake()


class StreamTable(ConnectionListener):
    """All streams of one connection; routes the connection's events to them."""

    direct = False  # a direct channel between clients (not the coordinator connection)

    def __init__(
        self,
        conn: QuicConn,
        *,
        window: int,
        max_message_size: int,
        on_new_stream: Callable[[StreamState], None],
        on_terminated: Callable[[QuicConn, int, str], None] | None = None,
        describe_loss: Callable[[], ConecError] | None = None,
        relay_budget: int | None = None,
    ) -> None:
        self.conn = conn
        self.window = window
        # Relayed bytes that may wait on this connection for the reader's credit (relay_room).
        self.relay_budget = window if relay_budget is None else relay_budget
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
        if st is not None:
            st.peer_reset(error_code)

    def stop_sending(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        st = self.streams.get(stream_id)
        if st is not None:
            st.peer_stopped(error_code)

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
    ``passed_on(n)`` hears of every ``n`` bytes written to ``dst``. What arrives while ``dst``
    has room is passed on where it arrives (``StreamState.pass_on``); this task takes over
    what waits for room, and the ends.

    ``dst`` takes only what its reader granted (``StreamState.relay_room``) and ``src``
    counts bytes as consumed only once ``dst`` took them, so the sender's credit follows what
    the reader consumed: the coordinator holds at most the sender's connection window on one
    side and what the reader granted on the other, however many streams there are. Ends and
    breaks are passed on: FIN as FIN, reset as reset, and a ``dst`` that stopped reading
    stops ``src``.
    """
    src.pass_on = lambda: dst.relay_from(src, passed_on)
    try:
        while True:
            if dst.send_error is not None or dst.send_finished:
                src.stop_receiving(StreamCode.STOPPED)
                return
            if src.raw:
                dst.relay_from(src, passed_on)
                if src.raw:  # no room: wait for the reader's credit or acknowledgements
                    await dst.wait_writable()
                continue
            if src.recv_error is not None or src.recv_finished:
                dst.reset(StreamCode.RELAY_BROKEN)
                src.stop_receiving(StreamCode.RELAY_BROKEN)
                return
            if src.fin_received:
                src.finish_receive()
                dst.finish_send()
                return
            await src.readers.park()
    finally:
        src.pass_on = None
