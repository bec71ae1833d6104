"""Application error codes carried by QUIC CONNECTION_CLOSE and RESET_STREAM/STOP_SENDING."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Why a connection was closed; the reason phrase carries the words for the user.

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


class StreamCode(IntEnum):
    """Why a stream direction was reset or stopped."""

    STOPPED = 0x10  # the reader closed its end
    ABORTED = 0x11  # the writer's side went away (client left, stream abandoned)
    PROTOCOL = 0x12  # the other side broke the framing or the header rules
    RELAY_BROKEN = 0x13  # the coordinator lost the other half of a relayed stream
    REFUSED = 0x14  # the stream was refused (no such peer, limit)
