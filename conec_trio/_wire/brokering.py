"""Control messages that broker direct channels between clients (request, offer, its
answer, the grant, a refusal) and keep them reachable (a peer that came back with another
certificate, a channel that gets no answer). :mod:`.control` re-exports them with all the
others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypeAlias

from .fields import Addr, ExactLen, MaxItems, MaxLen, Text
from .registry import Message, message

# Addresses a client may give as its own view of where it can be reached. Offers and grants
# carry them plus the address the coordinator observed.
MAX_LOCAL_ADDRS = 16
MAX_CANDIDATES = MAX_LOCAL_ADDRS + 1
# A client certificate, as offers carry it; with MAX_CANDIDATES addresses it stays well under
# MAX_CONTROL_MESSAGE_SIZE.
MAX_CERT_SIZE = 16 * 1024
# Bytes of the random token the coordinator gives both sides of a channel it brokers: their
# punches carry it, so a punch from anyone else is ignored.
PUNCH_TOKEN_SIZE = 16

Candidates: TypeAlias = Annotated[list[Addr], MaxItems(MAX_CANDIDATES)]
"""Where a peer may be reached; duplicates are dropped when decoded."""

CertDer: TypeAlias = Annotated[bytes, MaxLen(MAX_CERT_SIZE)]
"""A DER certificate."""

PunchToken: TypeAlias = Annotated[bytes, ExactLen(PUNCH_TOKEN_SIZE)]
"""The token of one brokered channel: exactly PUNCH_TOKEN_SIZE random bytes."""


@message(40)
@dataclass(frozen=True)
class ChannelRequest(Message):
    """Client -> coordinator: please set up a direct channel to ``peer``."""

    rid: int
    peer: str


@message(41)
@dataclass(frozen=True)
class ChannelGrant(Message):
    """Coordinator -> requester: ``peer``'s certificate, addresses to dial (first the one the
    coordinator observed), and the token of this channel's punches. Sent together with the
    offer to ``peer``, before it agreed: ``peer`` consents by punching and by accepting the
    handshake of the certificate it was offered; if it refuses (or does not answer), a
    ChannelRefused with the same token follows."""

    rid: int
    peer: str
    cert_der: CertDer
    addrs: Candidates
    token: PunchToken


@message(42)
@dataclass(frozen=True)
class ChannelOffer(Message):
    """Coordinator -> target: ``peer`` wants a direct channel; its certificate, addresses
    (first the one the coordinator observed), and the token of this channel's punches (the
    same as in the requester's grant)."""

    oid: int
    peer: str
    cert_der: CertDer
    addrs: Candidates
    token: PunchToken


@message(43)
@dataclass(frozen=True)
class ChannelOfferReply(Message):
    """Target -> coordinator: answer to ChannelOffer ``oid``."""

    oid: int
    accept: bool
    message: Text


@message(47)
@dataclass(frozen=True)
class ChannelRefused(Message):
    """Coordinator -> requester: ``peer`` refused (or did not answer) the offer of the
    channel granted with ``token``; ``message`` says why. The requester gives that attempt
    up with this message."""

    peer: str
    token: PunchToken
    reason: str  # a codes.Reason value: REFUSED or NO_ANSWER
    message: Text


@message(44)
@dataclass(frozen=True)
class PeerCertificateChanged(Message):
    """Coordinator -> client: ``peer``, with which the coordinator brokered a channel for
    this client, registered again with another certificate (SHA-256 of its DER). A direct
    channel pinned to another certificate is stale: its peer process is gone."""

    peer: str
    cert_sha256: bytes


# A NAT may give its side of a direct channel a new public port mid-session (its mapping
# expired, it restarted). QUIC follows a peer to a new address, but only once a packet from
# there arrives, and the other side's NAT drops packets from an address its side never sent
# to. So the side whose packets go unanswered asks the coordinator to tell the other side
# where it is now (ReachMe), and that side punches there (PeerAddress), as a punch opens a
# channel in the first place. (Tailscale's "call me maybe" does the same through its relays.)


@message(45)
@dataclass(frozen=True)
class ReachMe(Message):
    """Client -> coordinator: my direct channel to ``peer`` gets no answer; tell it where
    you see me now (a PeerAddress)."""

    peer: str


@message(46)
@dataclass(frozen=True)
class PeerAddress(Message):
    """Coordinator -> client: ``peer``'s direct channel to this client gets no answer, and
    the coordinator sees ``peer`` at ``addr`` now. If this client's channel to it goes
    elsewhere, it punches ``addr`` until the channel follows; else it pings the channel (its
    own NAT may have moved it, and a ping that gets no answer makes it ask in turn)."""

    peer: str
    addr: Addr
