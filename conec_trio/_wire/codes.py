"""The protocol's wire vocabulary: close and stream codes, and the reasons in refusals.

Close codes travel in QUIC CONNECTION_CLOSE, stream codes in RESET_STREAM/STOP_SENDING, and
reasons in the ``reason`` field of the StreamRefused and ErrorReply control messages.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class CloseCode(IntEnum):
    """Why a connection was closed; the reason phrase carries the words for the user.

    The coordinator refuses a client this way, with no refusal message before the close: a
    close code reaches a client of any protocol version, and the handshake's outcome with it.

    aioquic reports transport and application close codes alike, so ours stay clear of the
    transport's (0x0-0x10, and TLS alerts at 0x100-0x1ff).
    """

    NORMAL = 0x0
    VERSION = 0x1001
    ID_TAKEN = 0x1002
    BAD_ID = 0x1003
    CERTIFICATE = 0x1004
    LIMIT = 0x1005
    PROTOCOL = 0x1006
    SHUTDOWN = 0x1007
    CHANNEL_CLOSED = 0x1008
    # The coordinator took a newer connection of the same id and certificate: this one is
    # stale, or another process runs with the same identity.
    REPLACED = 0x1009


class StreamCode(IntEnum):
    """Why a stream direction was reset or stopped."""

    STOPPED = 0x10  # the reader closed its end
    ABORTED = 0x11  # the writer's side went away (client left, stream abandoned)
    PROTOCOL = 0x12  # the other side broke the framing or the header rules
    RELAY_BROKEN = 0x13  # the coordinator lost the other half of a relayed stream
    REFUSED = 0x14  # the stream was refused (no such peer, limit)


class Reason(StrEnum):
    """Why a stream open or a request was refused: ``StreamRefused.reason`` and
    ``ErrorReply.reason``. The values are what goes on the wire; ``message`` carries the words.

    A receiver compares a decoded reason (a plain str) with these, and treats a reason it
    does not know (from a newer peer) as a refusal without a more specific meaning.
    """

    # StreamRefused.reason
    NO_PEER = "no-peer"  # the peer is not connected (also ErrorReply to a ChannelRequest)
    LIMIT = "limit"  # a limit or a per-client quota of the coordinator is reached
    # ErrorReply.reason
    NO_BROADCAST = "no-broadcast"  # BroadcastCountRequest: no such broadcast channel
    SELF = "self"  # ChannelRequest: a client asked for a direct channel to itself
    NOT_LISTENING = "not-listening"  # ChannelRequest: the peer takes no direct channels
    PEER_OPENING = "peer-opening"  # ChannelRequest: the peer is opening one to the requester
    # ChannelRefused.reason
    NO_ANSWER = "no-answer"  # the peer did not answer the offer in time
    REFUSED = "refused"  # the peer declined the offer
