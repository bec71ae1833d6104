"""The public ends of a conec stream: whole messages over a ``StreamState`` (``_streams``).

A cancelled ``send()`` sent all of its message or none of it: it waits for the window first,
then writes the whole message at once.

Error mapping (see the API contract): own close -> ``trio.ClosedResourceError``; clean end ->
``trio.EndOfChannel``; reset, stop-sending or a lost connection -> ``trio.BrokenResourceError``
raised from a ``ConecError`` saying why.
"""

from __future__ import annotations

from typing import Protocol

import trio

from ._exceptions import ConecError, MessageTooLargeError, ProtocolError
from ._streams import StreamState
from ._types import Path, StreamId
from ._wire.codes import StreamCode
from ._wire.framing import frame_header

# Messages up to this size are written to QUIC together with their header in one call.
SMALL_MESSAGE = 4096


class Mover(Protocol):
    """A stream that may move from the proxied path to a direct channel (``_migrate``)."""

    async def receive_moved(self, proxied: StreamState) -> StreamState:
        """The peer's direction left ``proxied`` with the moved marker: where it goes on."""
        ...

    def abort(self, cause: ConecError) -> None:
        """Break the stream both ways, on every path it uses."""


def _path(st: StreamState) -> Path:
    return Path.DIRECT if st.table.direct else Path.PROXIED


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
        self._mover: Mover | None = None
        self.peer = peer
        self.stream_id = stream_id

    @property
    def path(self) -> Path:
        """Where this end's messages go now (a stream from ``new_stream`` may move from
        ``Path.PROXIED`` to ``Path.DIRECT`` once a direct channel is up)."""
        return _path(self._st)

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
            st = self._st  # the stream may have moved while this waited
            if st.send_error is not None:
                raise _broken(st.send_error)
            if st.send_finished:
                raise trio.ClosedResourceError("this stream's send side was closed")
            if st.can_write():
                break
            await st.wait_writable()
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
            cause = ConecError("the stream was aborted by this side")
            if self._mover is not None:
                self._mover.abort(cause)
            else:
                self._st.fail(cause, StreamCode.ABORTED)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """End the stream after everything sent so far (the reader gets EndOfChannel)."""
        if not self._closed:
            self._closed = True
            self._st.finish_send()  # wakes a send() waiting for credit: it raises Closed
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
        self._mover: Mover | None = None
        self.peer = peer
        self.stream_id = stream_id

    @property
    def path(self) -> Path:
        """Where the messages this end receives come from now (see ``MessageSendChannel``)."""
        return _path(self._st)

    async def receive(self) -> bytes:
        """The next whole message.

        Raises ``trio.EndOfChannel`` after the sender's clean close, ``trio.BrokenResourceError``
        if the stream broke, ``trio.ClosedResourceError`` after our own ``aclose()``.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            st = self._st
            if self._closed:
                raise trio.ClosedResourceError("this receive channel was closed")
            if st.messages:
                msg = st.take_message()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return msg
            if st.decoder is not None and st.decoder.moved:
                # Every message before the marker was taken: go on where the peer went.
                if self._mover is None:
                    error = ProtocolError("the peer moved a stream that cannot move")
                    st.fail(error, StreamCode.PROTOCOL)
                    raise _broken(error)
                self._st = await self._mover.receive_moved(st)
                continue
            if st.recv_error is not None:
                raise _broken(st.recv_error)
            if st.fin_received:
                st.finish_receive()
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
