"""Application error codes carried by QUIC CONNECTION_CLOSE and RESET_STREAM/STOP_SENDING."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Why a connection was closed; the reason phrase carries the words for the user."""

    NORMAL = 0x0
    VERSION = 0x1
    ID_TAKEN = 0x2
    BAD_ID = 0x3
    CERTIFICATE = 0x4
    LIMIT = 0x5
    PROTOCOL = 0x6
    SHUTDOWN = 0x7
    CHANNEL_CLOSED = 0x8


class StreamCode(IntEnum):
    """Why a stream direction was reset or stopped."""

    STOPPED = 0x10  # the reader closed its end
    ABORTED = 0x11  # the writer's side went away (client left, stream abandoned)
    PROTOCOL = 0x12  # the other side broke the framing or the header rules
    RELAY_BROKEN = 0x13  # the coordinator lost the other half of a relayed stream
    REFUSED = 0x14  # the stream was refused (no such peer, limit)
