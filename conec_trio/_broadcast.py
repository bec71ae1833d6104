"""Broadcast channels, the client's end: joining one, and receiving its tagged messages.

The coordinator's end (membership, counting, fan-out) is ``_hub``; the two share only the
wire format (``_wire``).
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from ._exceptions import ConecError
from ._messages import MessageReceiveChannel, MessageSendChannel
from ._streams import StreamState, StreamTable
from ._types import BroadcastMessage, StreamId
from ._wire import control
from ._wire.framing import END_OF_CHANNEL, FrameDecoder, decode_tagged

# Room for the sender tag on top of the largest message.
TAG_ROOM = 2048


class StreamOpener(Protocol):
    """What joining needs of the client: a stream to the coordinator, opened with a header
    and answered (the client raises the refusals)."""

    async def _open_with_header(
        self, header: control.Message, expected: type[Any], what: str, decoder: Any = None
    ) -> tuple[StreamState, Any]: ...


class BroadcastReceiveChannel(trio.abc.ReceiveChannel[BroadcastMessage[bytes]]):
    """Receives ``BroadcastMessage(sender, data)``; ``sender`` is as the coordinator
    authenticated it."""

    def __init__(self, inner: MessageReceiveChannel, name: str) -> None:
        self._inner = inner
        self._ended = False
        self.name = name
        self.peer = None
        self.stream_id = inner.stream_id

    async def receive(self) -> BroadcastMessage[bytes]:
        """The next message; ``trio.EndOfChannel`` once every sender closed, and
        ``trio.BrokenResourceError`` if the coordinator connection was lost."""
        if self._ended:
            await trio.lowlevel.checkpoint()
            raise trio.EndOfChannel
        payload = await self._inner.receive()
        if payload == END_OF_CHANNEL:
            self._ended = True
            raise trio.EndOfChannel
        sender, data = decode_tagged(payload)
        return BroadcastMessage(sender, data)

    async def aclose(self) -> None:
        """Leave as a receiver (the channel's receiver count drops at once)."""
        await self._inner.aclose()


async def join_broadcast(
    client: StreamOpener, table: StreamTable, name: str
) -> tuple[MessageSendChannel, BroadcastReceiveChannel]:
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise ConecError(
            f"a broadcast name must be a non-empty string of at most 1024 characters: {name!r}"
        )
    st, _ = await client._open_with_header(
        control.JoinBroadcast(name),
        control.BroadcastJoined,
        f"joining broadcast {name!r}",
        decoder=FrameDecoder(table.max_message_size + TAG_ROOM),
    )
    sid = StreamId.proxied(st.stream_id)
    send = MessageSendChannel(st, None, sid)
    recv = BroadcastReceiveChannel(MessageReceiveChannel(st, None, sid), name)
    return send, recv
