"""Datagrams and NATs of the fake network: addresses, drop reasons, mapping and filtering."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

Address = tuple[str, int]
NatKind = Literal["cone", "symmetric"]
Filtering = Literal["port-restricted", "address-restricted", "open"]

# Why a datagram was dropped, as counted in ``FakeNetwork.dropped`` and ``Host.dropped``.
LOST = "lost"  # random loss on the wire
UNROUTED = "unrouted"  # no route to the destination address
NO_MAPPING = "no-mapping"  # arrived at a NAT port with no mapping
FILTERED = "filtered"  # the NAT's filtering refused it
BLOCKED = "blocked"  # a block() rule or a drop filter matched
NO_SOCKET = "no-socket"  # nothing bound at the destination port
QUEUE_FULL = "queue-full"  # the receiving socket's queue was full
TOO_BIG = "too-big"  # larger than the network's MTU
SOCKET_CLOSED = "socket-closed"  # sent from a socket that was already closed

NAT_KINDS: tuple[NatKind, ...] = ("cone", "symmetric")
FILTERINGS: tuple[Filtering, ...] = ("port-restricted", "address-restricted", "open")


@dataclass(frozen=True)
class Datagram:
    """One datagram in flight (or arrived), as ``FakeNetwork.sent_log`` keeps it."""

    data: bytes
    sender: Address  # the sending socket's own address (private, if behind a NAT)
    src: Address  # the source as the receiver sees it (after NAT translation)
    dst: Address  # the destination the sender addressed
    sent_at: float  # trio.current_time() when it was sent
    final_dst: Address | None = None  # after the receiving NAT's translation, once known


@dataclass
class NatMapping:
    """One public port of a NAT: the private address behind it and who it has sent to."""

    private: Address
    public_port: int
    contacted: set[Address] = field(default_factory=set)


class Nat:
    """A NAT with one public address.

    ``kind="cone"`` maps a private address to one public port for every destination
    (endpoint-independent mapping; the private port is kept if free); ``kind="symmetric"``
    uses a fresh public port for every destination. ``filtering`` decides which datagrams
    arriving at a mapped public port get in: ``"port-restricted"`` only from an (ip, port)
    the mapping has sent to, ``"address-restricted"`` from any port of an ip it has sent to,
    ``"open"`` from anyone (a full cone, with ``kind="cone"``).

    Made by ``FakeNetwork.add_nat``; ``mappings`` (by public port) shows what it holds.
    """

    def __init__(
        self, public_ip: str, kind: NatKind, filtering: Filtering, rng: random.Random
    ) -> None:
        if kind not in NAT_KINDS:
            raise ValueError(f"unknown NAT kind {kind!r}: use one of {', '.join(NAT_KINDS)}")
        if filtering not in FILTERINGS:
            raise ValueError(
                f"unknown NAT filtering {filtering!r}: use one of {', '.join(FILTERINGS)}"
            )
        self.public_ip = public_ip
        self.kind: NatKind = kind
        self.filtering: Filtering = filtering
        self._rng = rng
        self._by_key: dict[Address | tuple[Address, Address], NatMapping] = {}
        self.mappings: dict[int, NatMapping] = {}  # by public port

    def __repr__(self) -> str:
        return f"<Nat {self.public_ip} {self.kind} {self.filtering}>"

    def _free_port(self, preferred: int | None) -> int:
        if preferred is not None and preferred not in self.mappings:
            return preferred
        while True:
            port = self._rng.randrange(20_000, 61_000)
            if port not in self.mappings:
                return port

    def outbound(self, private: Address, dst: Address) -> Address:
        """Translate the source of a datagram leaving through this NAT (makes a mapping)."""
        key: Address | tuple[Address, Address] = private if self.kind == "cone" else (private, dst)
        mapping = self._by_key.get(key)
        if mapping is None:
            preferred = private[1] if self.kind == "cone" else None
            mapping = NatMapping(private, self._free_port(preferred))
            self._by_key[key] = mapping
            self.mappings[mapping.public_port] = mapping
        mapping.contacted.add(dst)
        return (self.public_ip, mapping.public_port)

    def inbound(self, src: Address, public_port: int) -> Address | str:
        """Where a datagram from ``src`` to ``public_port`` goes, or why it is dropped."""
        mapping = self.mappings.get(public_port)
        if mapping is None:
            return NO_MAPPING
        if self.filtering == "port-restricted":
            allowed = src in mapping.contacted
        elif self.filtering == "address-restricted":
            allowed = any(ip == src[0] for ip, _ in mapping.contacted)
        else:
            allowed = True
        return mapping.private if allowed else FILTERED
