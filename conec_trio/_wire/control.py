"""Control messages: CBOR arrays ``[type_code, field1, field2, ...]``.

Each message is a frozen dataclass registered under a type code; its fields are encoded in
declaration order. :func:`decode` checks every field against its annotation and raises
ProtocolError for anything malformed. A later protocol version may only add fields at the
end, which older decoders ignore. Decoding goes through the project's strict CBOR decoder
(:mod:`._wire.cbor`) with tight limits: a control message is at most
:data:`MAX_CONTROL_MESSAGE_SIZE` bytes, uses no CBOR tags or indefinite lengths (refused
anywhere, even in ignored trailing fields) and no map keys other than strings. The messages
about direct channels are defined in :mod:`.brokering`; this module re-exports them.

The first field of :class:`Hello` (type code 1) is ``version``, and must stay so forever:
:func:`decode_hello_version` reads just ``[1, version, ...`` so that a Hello of any version
can be answered with a clear "version mismatch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypeAlias

from .brokering import (
    MAX_CANDIDATES,
    MAX_CERT_SIZE,
    MAX_LOCAL_ADDRS,
    PUNCH_TOKEN_SIZE,
    Candidates,
    CertDer,
    ChannelGrant,
    ChannelOffer,
    ChannelOfferReply,
    ChannelRefused,
    ChannelRequest,
    PeerAddress,
    PeerCertificateChanged,
    PunchToken,
    ReachMe,
)
from .fields import (
    MAX_HOST_LEN,
    MAX_INT,
    MAX_MESSAGE_LEN,
    MAX_NAME_LEN,
    MAX_PORT,
    Addr,
    MaxItems,
    Text,
)
from .registry import (
    MAX_CONTROL_MESSAGE_SIZE,
    MAX_ID_LIST_MESSAGE_SIZE,
    MAX_IDS,
    Message,
    decode,
    decode_hello_version,
    encode,
    message,
)

__all__ = [
    "ALPN",
    "MAX_CANDIDATES",
    "MAX_CERT_SIZE",
    "MAX_CONTROL_MESSAGE_SIZE",
    "MAX_HOST_LEN",
    "MAX_IDS",
    "MAX_ID_LIST_MESSAGE_SIZE",
    "MAX_INT",
    "MAX_LOCAL_ADDRS",
    "MAX_MESSAGE_LEN",
    "MAX_NAME_LEN",
    "MAX_PORT",
    "PROTOCOL_VERSION",
    "PROXIED_KINDS",
    "PROXIED_MOVABLE",
    "PROXIED_PING",
    "PROXIED_PLAIN",
    "PUNCH_TOKEN_SIZE",
    "Addr",
    "BroadcastCountReply",
    "BroadcastCountRequest",
    "BroadcastJoined",
    "BroadcastListReply",
    "BroadcastListRequest",
    "BroadcastMembersReply",
    "BroadcastMembersRequest",
    "Candidates",
    "CertDer",
    "ChannelGrant",
    "ChannelOffer",
    "ChannelOfferReply",
    "ChannelRefused",
    "ChannelRequest",
    "DirectClose",
    "ErrorReply",
    "Hello",
    "IdList",
    "IncomingProxied",
    "JoinBroadcast",
    "LocalAddrs",
    "Message",
    "MoveProxied",
    "OpenDirect",
    "OpenProxied",
    "PeerAddress",
    "PeerCertificateChanged",
    "PeerListReply",
    "PeerListRequest",
    "Ping",
    "PresenceDropped",
    "PresenceEvent",
    "PresenceSnapshot",
    "PresenceSubscribe",
    "PresenceUnsubscribe",
    "PunchToken",
    "ReachMe",
    "StreamAccepted",
    "StreamRefused",
    "Text",
    "Welcome",
    "decode",
    "decode_hello_version",
    "encode",
]

# 2: the coordinator grants a channel together with the offer to the peer, and sends a
# ChannelRefused if the peer then refuses it.
PROTOCOL_VERSION = 2
ALPN = "conec-trio"

LocalAddrs: TypeAlias = Annotated[list[Addr], MaxItems(MAX_LOCAL_ADDRS)]
"""A client's own addresses; duplicates are dropped when decoded."""

IdList: TypeAlias = Annotated[list[str], MaxItems(MAX_IDS)]
"""Client ids, sorted by the sender (a receiver does not rely on it)."""


# --- messages -----------------------------------------------------------------------------


@message(1)
@dataclass(frozen=True)
class Hello(Message):
    """Client -> coordinator, first frame on the control stream. ``version`` stays first."""

    version: int
    client_id: str
    listen: bool
    local_addrs: LocalAddrs


@message(2)
@dataclass(frozen=True)
class Welcome(Message):
    """Coordinator -> client: accepted; tells the client its address as the coordinator sees it."""

    version: int
    observed_addr: Addr


# Type code 3 is retired: it was a refusal of the hello that was never sent. The coordinator
# refuses a client by closing the connection with a CloseCode. Do not reuse the code.


# What a relayed stream is for (``OpenProxied.kind``, passed on in ``IncomingProxied.kind``).
PROXIED_PLAIN = 0  # a stream for the application that stays proxied
PROXIED_MOVABLE = 1  # from new_stream: moves onto a direct channel once one is up (MoveProxied)
PROXIED_PING = 2  # a ping: the target's library answers one empty message and ends it
PROXIED_KINDS = (PROXIED_PLAIN, PROXIED_MOVABLE, PROXIED_PING)


@message(10)
@dataclass(frozen=True)
class OpenProxied(Message):
    """Client -> coordinator, first frame on a new relayed stream (``peer`` None: coordinator).

    ``kind`` is one of ``PROXIED_KINDS``; ``token`` names a movable stream in its
    ``MoveProxied`` (random, so that a reused ``sid`` is never taken for an older stream)."""

    sid: int
    peer: str | None
    kind: int = PROXIED_PLAIN
    token: int = 0


@message(11)
@dataclass(frozen=True)
class StreamAccepted(Message):
    """Reply on a newly opened stream: it is open."""


@message(12)
@dataclass(frozen=True)
class StreamRefused(Message):
    """Reply on a newly opened stream: refused; ``reason`` is a ``codes.Reason`` value."""

    reason: str
    message: Text


@message(13)
@dataclass(frozen=True)
class IncomingProxied(Message):
    """Coordinator -> target client, first frame of a relayed stream; ``peer`` opened it."""

    sid: int
    peer: str
    kind: int = PROXIED_PLAIN
    token: int = 0


@message(14)
@dataclass(frozen=True)
class OpenDirect(Message):
    """Client -> client on a direct connection, first frame of a new stream."""

    sid: int


@message(15)
@dataclass(frozen=True)
class DirectClose(Message):
    """Client -> client on a direct connection: I am closing this channel. The receiver
    forgets the channel and closes the connection, so the closer knows both sides are done."""


@message(16)
@dataclass(frozen=True)
class MoveProxied(Message):
    """Client -> client on a direct connection, first frame of the stream that carries on the
    movable proxied stream ``sid`` (with ``token``) that the sender opened. The sender's
    direction of the proxied stream ended with the moved marker (``framing.MOVED``), and the
    receiver's direction moves here the same way."""

    sid: int
    token: int


@message(17)
@dataclass(frozen=True)
class Ping(Message):
    """Client -> client on a direct connection: answer one empty message and end the stream."""


@message(20)
@dataclass(frozen=True)
class JoinBroadcast(Message):
    """Client -> coordinator, first frame on a broadcast stream."""

    name: str


@message(21)
@dataclass(frozen=True)
class BroadcastJoined(Message):
    """Reply to JoinBroadcast: how many senders and receivers the channel has now."""

    senders: int
    receivers: int


@message(30)
@dataclass(frozen=True)
class BroadcastCountRequest(Message):
    """Client -> coordinator: how many members does broadcast ``name`` have?"""

    rid: int
    name: str


@message(31)
@dataclass(frozen=True)
class BroadcastCountReply(Message):
    """Answer to BroadcastCountRequest ``rid``."""

    rid: int
    senders: int
    receivers: int


@message(32)
@dataclass(frozen=True)
class ErrorReply(Message):
    """Request ``rid`` failed; ``reason`` is a ``codes.Reason`` value."""

    rid: int
    reason: str
    message: Text


@message(33)
@dataclass(frozen=True)
class BroadcastMembersRequest(Message):
    """Client -> coordinator: which clients are members of broadcast ``name``?"""

    rid: int
    name: str


@message(34, id_list=True)
@dataclass(frozen=True)
class BroadcastMembersReply(Message):
    """Answer to BroadcastMembersRequest ``rid``: the ids of its senders and receivers (a
    client that joined twice is named once). No such channel: ErrorReply NO_BROADCAST."""

    rid: int
    senders: IdList
    receivers: IdList


@message(35)
@dataclass(frozen=True)
class BroadcastListRequest(Message):
    """Client -> coordinator: which broadcast channels exist?"""

    rid: int


@message(36, id_list=True)
@dataclass(frozen=True)
class BroadcastListReply(Message):
    """Answer to BroadcastListRequest ``rid``: the names of the broadcast channels, sorted."""

    rid: int
    names: IdList


# Presence: who is connected. A client asks for the list once (PeerListRequest), or
# subscribes: the coordinator answers with a snapshot and then pushes a PresenceEvent for
# every join and leave, on the control stream, in order after the snapshot. Subscribing is
# opt-in, so clients that do not ask hear nothing.


@message(60)
@dataclass(frozen=True)
class PeerListRequest(Message):
    """Client -> coordinator: which clients are connected now?"""

    rid: int


@message(61, id_list=True)
@dataclass(frozen=True)
class PeerListReply(Message):
    """Answer to PeerListRequest ``rid``: the ids connected now, the asker's included."""

    rid: int
    peers: IdList


@message(62)
@dataclass(frozen=True)
class PresenceSubscribe(Message):
    """Client -> coordinator: send me joins and leaves, starting with a PresenceSnapshot
    ``rid``. Subscribing again only sends a new snapshot."""

    rid: int


@message(63, id_list=True)
@dataclass(frozen=True)
class PresenceSnapshot(Message):
    """Answer to PresenceSubscribe ``rid``: the ids connected now; every PresenceEvent after
    it on the control stream is relative to it."""

    rid: int
    peers: IdList


@message(64)
@dataclass(frozen=True)
class PresenceUnsubscribe(Message):
    """Client -> coordinator: no more joins and leaves (events already sent still arrive)."""


@message(65)
@dataclass(frozen=True)
class PresenceEvent(Message):
    """Coordinator -> subscriber: client ``peer`` connected (``joined``) or left."""

    peer: str
    joined: bool


@message(66)
@dataclass(frozen=True)
class PresenceDropped(Message):
    """Coordinator -> subscriber: your subscription is dropped (you fell too far behind);
    no events follow until you subscribe again."""

    message: Text
