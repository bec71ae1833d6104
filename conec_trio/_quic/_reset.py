"""Stateless resets (RFC 9000 section 10.3) and following a server-role peer to a new
address, on top of aioquic's connection (it does neither): aioquic's private names, no trio.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from aioquic import tls
from aioquic.quic import events
from aioquic.quic.connection import (
    END_STATES,
    QuicConnectionState,
    QuicNetworkPath,
    QuicReceiveContext,
)
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ._pmtu import PathMtuProbing

STATELESS_RESET_TOKEN_SIZE = 16
# The smallest stateless reset: 5 bytes that look like a short header, then the token
# (RFC 9000 section 10.3). Nothing shorter can be one.
SMALLEST_STATELESS_RESET = 21


def stateless_reset_key(private_key: PrivateKeyTypes) -> bytes:
    """The key a coordinator derives its stateless reset tokens from: a function of its
    private key alone, so a restarted process with the same key makes the same tokens."""
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return hmac.new(b"conec-trio stateless reset key", der, hashlib.sha256).digest()


def stateless_reset_token(key: bytes, cid: bytes) -> bytes:
    """The stateless reset token of connection id ``cid`` under ``key``."""
    return hmac.new(key, cid, hashlib.sha256).digest()[:STATELESS_RESET_TOKEN_SIZE]


class StatelessResets(PathMtuProbing):
    """Derived reset tokens for our connection ids (when ``_reset_key`` is set), closing at
    once on the peer's reset, and a client role that follows its peer's NAT rebinding. The
    connection class sets ``_reset_key`` and calls these from its ``receive_datagram``."""

    _reset_key: bytes | None
    _authenticated: int  # packets of the datagram being processed that decrypted
    # The peer reset this connection: it is up, and has forgotten us (a restarted server).
    reset_by_peer = False

    def _payload_received(
        self, context: QuicReceiveContext, plain: bytes, crypto_frame_required: bool = False
    ) -> tuple[bool, bool]:
        self._authenticated += 1  # only a packet that decrypted gets here
        result: tuple[bool, bool] = super()._payload_received(context, plain, crypto_frame_required)
        return result

    # -- stateless resets (RFC 9000 section 10.3) ------------------------------------------

    def _derive_reset_tokens(self) -> None:
        """Our connection ids' tokens from the reset key, where one is set (a client's first
        id has none: only a server announces one for it)."""
        if self._reset_key is None:
            return
        for cid in self._host_cids:
            if cid.stateless_reset_token is not None:
                cid.stateless_reset_token = stateless_reset_token(self._reset_key, cid.cid)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._derive_reset_tokens()

    def is_stateless_reset(self, data: bytes) -> bool:
        """``data`` ends with a stateless reset token the peer gave us for a connection id
        we may use (the current one or a spare; never a retired one)."""
        if len(data) < SMALLEST_STATELESS_RESET or data[0] & 0x80:
            return False  # too short, or a long header
        tail = data[-STATELESS_RESET_TOKEN_SIZE:]
        peer_cids = [self._peer_cid, *self._peer_cid_available]
        # compare_digest on every token: no early exit that times out which one matched
        matches = [
            hmac.compare_digest(tail, cid.stateless_reset_token)
            for cid in peer_cids
            if cid.stateless_reset_token
        ]
        return any(matches)

    def _reset_by_peer(self, now: float) -> None:
        """The peer no longer has this connection: close it without a word (the draining
        state sends nothing), and let the owner know at once (``close_event``)."""
        if self._state in END_STATES:
            return
        self.reset_by_peer = True
        self._close_event = events.ConnectionTerminated(
            error_code=QuicErrorCode.NO_ERROR,
            frame_type=QuicFrameType.PADDING,
            reason_phrase="stateless reset: the peer no longer knows this connection",
        )
        self._close_begin(is_initiator=False, now=now)

    # -- client role: the server's address may change (its NAT rebinds) --------------------

    def set_peer_address(self, addr: Any) -> None:
        """Client role, before anything was sent: where the first flight goes (a connection
        prepared while its peer's address was not known yet)."""
        assert self._is_client and self._packet_number == 0
        self._network_paths[0].addr = addr

    def _receive_from_new_address(self, data: bytes, addr: Any, now: float) -> None:
        """aioquic drops a client-role datagram from an address it has not sent to (RFC
        9000 section 9: a server does not migrate). A direct channel's accepting side is
        the server role, and its NAT may give it a new public port mid-session: follow it,
        but only for a packet that authenticates and is newer than any before (not a
        replay), and validate the new path (PATH_CHALLENGE, with aioquic's
        anti-amplification limit until it answers); if it never does, aioquic goes back to
        the old path."""
        if self._state not in (QuicConnectionState.CONNECTED,) or not self._handshake_confirmed:
            return
        space = self._spaces[tls.Epoch.ONE_RTT]
        largest = space.largest_received_packet
        new_path = QuicNetworkPath(addr)
        self._network_paths.append(new_path)
        try:
            super().receive_datagram(data, addr, now)
        finally:
            promote = self._authenticated and space.largest_received_packet > largest
            if new_path in self._network_paths:
                self._network_paths.remove(new_path)
                if promote and self._state not in END_STATES:
                    self._network_paths.insert(0, new_path)
