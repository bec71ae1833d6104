"""Small value types of the public API."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Generic, NamedTuple, TypeVar

import trio

T = TypeVar("T")


@dataclass(frozen=True, order=True)
class StreamId:
    """Identifies a stream; scoped per opening client. Compares and hashes by value."""

    kind: str  # "proxied" or "direct"
    n: int

    def __post_init__(self) -> None:
        if self.kind not in ("proxied", "direct"):
            raise ValueError(f"StreamId kind must be 'proxied' or 'direct', not {self.kind!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 0:
            raise ValueError(f"StreamId number must be a non-negative int, not {self.n!r}")

    @classmethod
    def proxied(cls, n: int) -> StreamId:
        return cls("proxied", n)

    @classmethod
    def direct(cls, n: int) -> StreamId:
        return cls("direct", n)

    @property
    def is_proxied(self) -> bool:
        return self.kind == "proxied"

    @property
    def is_direct(self) -> bool:
        return self.kind == "direct"

    def __repr__(self) -> str:
        return f"StreamId.{self.kind}({self.n})"


class IncomingStream(NamedTuple):
    """A stream another party opened: ``(peer, stream_id, send, recv)``."""

    peer: str | None
    stream_id: StreamId
    send: trio.abc.SendChannel[bytes]
    recv: trio.abc.ReceiveChannel[bytes]


class BroadcastMessage(NamedTuple, Generic[T]):
    """One broadcast message and the id of the client that sent it (as authenticated)."""

    sender: str
    data: T


class Path(Enum):
    """Where a stream's messages go now: over a direct channel or through the coordinator."""

    DIRECT = "direct"
    PROXIED = "proxied"


class PingResult(NamedTuple):
    """One round trip to a peer's library: ``rtt`` in seconds, and the path it took."""

    rtt: float
    path: Path
