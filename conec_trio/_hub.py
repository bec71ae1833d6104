"""The coordinator's broadcast channels: membership, counting, quotas and fan-out.

Each member has one QUIC stream to the coordinator. Messages the member sends up it are
tagged with the member's authenticated id and written down every receiving member's stream.
A member closing its send end is a FIN up; closing its receive end is a STOP_SENDING, which
the hub sees at once (so counts drop promptly).

Flow control: one task per member forwards that member's messages in order and waits for
each receiver's send window, so the slowest receiver paces the senders. The hub holds at
most one stream window (plus one message) per receiver and one window per sender.

The hub knows a member as a client (:class:`HubClient`: its id, and who to count it against)
and the stream it joined on, which is also how the hub sends to it. It knows nothing of the
coordinator, which owns one hub and hands it each join.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from ._exceptions import ProtocolError
from ._streams import StreamState, write_message
from ._wire import control
from ._wire.codes import Reason, StreamCode
from ._wire.framing import END_OF_CHANNEL, encode_tagged, frame_header


class HubClient(Protocol):
    """What the hub needs of a member's client: the authenticated id its messages carry.
    The object itself is what the per-client quota counts against."""

    @property
    def id(self) -> str | None: ...


class _Member:
    def __init__(self, client: HubClient, st: StreamState) -> None:
        self.client = client
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
    """All broadcast channels of one coordinator.

    ``max_channels`` bounds the channels alive at once; ``max_per_client`` bounds one
    client's memberships (a join of a channel it is already in counts again), so that one
    client cannot take the channels, or the memory, meant for all.
    """

    def __init__(self, *, max_channels: int, max_per_client: int) -> None:
        self.max_channels = max_channels
        self.max_per_client = max_per_client
        self._channels: dict[str, _Channel] = {}
        self._joined: Counter[HubClient] = Counter()

    @property
    def count(self) -> int:
        return len(self._channels)

    def counts(self, name: str) -> tuple[int, int] | None:
        chan = self._channels.get(name)
        return None if chan is None else chan.counts()

    def names(self) -> list[str]:
        """The names of the channels alive now, sorted."""
        return sorted(self._channels)

    def members(self, name: str) -> tuple[list[str], list[str]] | None:
        """Sorted ids of the senders and receivers of ``name`` (a client that joined twice
        is named once), or None if there is no such channel."""
        chan = self._channels.get(name)
        if chan is None:
            return None
        senders = {m.client.id for m in chan.members if m.sending and m.client.id is not None}
        receivers = {m.client.id for m in chan.members if m.receiving and m.client.id is not None}
        return sorted(senders), sorted(receivers)

    def _refusal(self, client: HubClient, name: str) -> str | None:
        """Why ``client`` may not join ``name`` now, or None if it may."""
        if self._joined[client] >= self.max_per_client:
            return (
                f"client {client.id!r} is a member of {self.max_per_client} broadcast channels, "
                "its quota (CoordConfig.max_broadcasts_per_client): leave one to join another"
            )
        if name not in self._channels and len(self._channels) >= self.max_channels:
            return f"the coordinator holds its maximum of {self.max_channels} broadcast channels"
        return None

    async def join(self, client: HubClient, st: StreamState, name: str) -> None:
        """Serve ``client``'s membership of ``name`` on stream ``st`` until it ends."""
        refusal = self._refusal(client, name)
        if refusal is not None:
            write_message(st, control.encode(control.StreamRefused(Reason.LIMIT, refusal)))
            st.finish_send()
            st.stop_receiving(StreamCode.REFUSED)
            return
        chan = self._channels.get(name)
        if chan is None:
            chan = self._channels[name] = _Channel(name)
        member = _Member(client, st)
        chan.members.append(member)
        self._joined[client] += 1
        write_message(st, control.encode(control.BroadcastJoined(*chan.counts())))
        try:
            await self._forward(chan, member)
            await self._linger(member)
        finally:
            self._joined[client] -= 1
            if not self._joined[client]:
                del self._joined[client]
            chan.members.remove(member)
            if not chan.members and self._channels.get(name) is chan:
                del self._channels[name]

    async def _forward(self, chan: _Channel, member: _Member) -> None:
        """Hand this member's messages to every receiving member, in order."""
        st = member.st
        sender = member.client.id
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
