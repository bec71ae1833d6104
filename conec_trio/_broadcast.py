"""Broadcast channels: membership, counting and fan-out at the coordinator; the client ends.

Each member has one QUIC stream to the coordinator. Messages the member sends up it are
tagged by the coordinator with the member's authenticated id and written down every
receiving member's stream. A member closing its send end is a FIN up; closing its receive
end is a STOP_SENDING, which the coordinator sees at once (so counts drop promptly).

Flow control: one task per member forwards that member's messages in order and waits for
each receiver's send window, so the slowest receiver paces the senders. The coordinator holds
at most one stream window (plus one message) per receiver and one window per sender.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ._exceptions import ConecError, ProtocolError
from ._streams import (
    MessageReceiveChannel,
    MessageSendChannel,
    StreamState,
    StreamTable,
    write_message,
)
from ._types import BroadcastMessage, StreamId
from ._wire import control
from ._wire.codes import Reason, StreamCode
from ._wire.framing import FrameDecoder, decode_tagged, encode_tagged, frame_header

if TYPE_CHECKING:
    from ._client import Client
    from ._coordinator import ClientSession, Coordinator

# Room for the sender tag on top of the largest message.
TAG_ROOM = 2048


# Sender ids are never empty, so an empty tag can mark the end of the channel. The stream
# itself stays open after it: the receiver's later close (STOP_SENDING) is how the
# coordinator learns that the member no longer receives.
END_OF_CHANNEL = encode_tagged("", b"")


class _Member:
    def __init__(self, session: ClientSession, st: StreamState) -> None:
        self.session = session
        self.st = st
        self.forwarding = True  # its task still has messages of it to hand on
        self.got_end = False

    @property
    def sending(self) -> bool:
        st = self.st
        return not st.fin_received and st.recv_error is None and not st.recv_finished

    @property
    def receiving(self) -> bool:
        st = self.st
        return st.send_error is None and not st.send_finished


class _Channel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[_Member] = []

    def counts(self) -> tuple[int, int]:
        return (
            sum(1 for m in self.members if m.sending),
            sum(1 for m in self.members if m.receiving),
        )


class BroadcastHub:
    """The coordinator's broadcast channels."""

    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord
        self._channels: dict[str, _Channel] = {}

    @property
    def count(self) -> int:
        return len(self._channels)

    def counts(self, name: str) -> tuple[int, int] | None:
        chan = self._channels.get(name)
        return None if chan is None else chan.counts()

    async def join(self, session: ClientSession, st: StreamState, name: str) -> None:
        chan = self._channels.get(name)
        if chan is None:
            limit = self._coord.config.max_broadcasts
            if len(self._channels) >= limit:
                message = f"the coordinator holds its maximum of {limit} broadcast channels"
                write_message(st, control.encode(control.StreamRefused(Reason.LIMIT, message)))
                st.finish_send()
                st.stop_receiving(StreamCode.REFUSED)
                return
            chan = self._channels[name] = _Channel(name)
        member = _Member(session, st)
        chan.members.append(member)
        write_message(st, control.encode(control.BroadcastJoined(*chan.counts())))
        try:
            await self._forward(chan, member)
            await self._linger(member)
        finally:
            chan.members.remove(member)
            if not chan.members and self._channels.get(name) is chan:
                del self._channels[name]

    async def _forward(self, chan: _Channel, member: _Member) -> None:
        """Hand this member's messages to every receiving member, in order."""
        st = member.st
        sender = member.session.id
        assert sender is not None
        while True:
            if st.messages:
                payload = encode_tagged(sender, st.messages[0])
                frame = frame_header(len(payload)) + payload
                for other in list(chan.members):
                    if not other.got_end:
                        await self._deliver(other, frame)
                st.take_message()
                continue
            if st.recv_error is not None or st.recv_finished or st.fin_received:
                break
            await st.readers.park()
        if st.fin_received and st.recv_error is None:
            st.recv_finished = True
        if isinstance(st.recv_error, ProtocolError):
            st.fail(st.recv_error, StreamCode.PROTOCOL)  # it broke the framing: tell it
        member.forwarding = False
        # The last sender to finish: every receiver gets the end after the last message.
        if not any(m.forwarding for m in chan.members):
            end = frame_header(len(END_OF_CHANNEL)) + END_OF_CHANNEL
            for other in list(chan.members):
                if not other.got_end:
                    other.got_end = True
                    await self._deliver(other, end)

    @staticmethod
    async def _linger(member: _Member) -> None:
        """A member counts as a receiver until it closes its receive end."""
        st = member.st
        while member.receiving and st.conn.is_open:
            await st.writers.park()
        if not st.send_finished:
            st.reset(StreamCode.ABORTED)

    @staticmethod
    async def _deliver(member: _Member, frame: bytes) -> None:
        st = member.st
        while member.receiving:
            if st.can_write():
                st.conn.send_stream_data(st.stream_id, frame)
                return
            st.table.block_writer(st)
            await st.writers.park()


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
    client: Client, table: StreamTable, name: str
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
