"""The coordinator's memory of ids across their sessions: their certificates, and who had
channels brokered with whom (see ``PeerMemory``)."""

from __future__ import annotations

from collections import OrderedDict

# Its bounds: that many ids' last certificates, and ids with which each had channels
# brokered, per id and in all.
MAX_REMEMBERED_IDS = 100_000
MAX_BROKERED_PER_ID = 1_000
MAX_BROKERED_PAIRS = 200_000


class PeerMemory:
    """What the coordinator remembers of ids across their sessions, within bounds (the least
    recently used go first): each id's last certificate (a SHA-256), and the ids it had
    direct channels brokered with, so they hear when it comes back with another certificate
    (their channel to it leads to a process that is gone)."""

    def __init__(
        self,
        max_ids: int = MAX_REMEMBERED_IDS,
        max_per_id: int = MAX_BROKERED_PER_ID,
        max_pairs: int = MAX_BROKERED_PAIRS,
    ) -> None:
        self._max_ids = max_ids
        self._max_per_id = max_per_id
        self._max_pairs = max_pairs
        self._certs: OrderedDict[str, bytes] = OrderedDict()
        self._pairs: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self._pair_count = 0  # entries in all of _pairs' sets

    def registered(self, client_id: str, cert_sha256: bytes) -> list[str]:
        """Note that ``client_id`` registered with this certificate; if its last one was
        another, return the ids it had channels brokered with (and forget those)."""
        previous = self._certs.pop(client_id, None)
        self._certs[client_id] = cert_sha256
        while len(self._certs) > self._max_ids:
            self._certs.popitem(last=False)
        if previous is None or previous == cert_sha256:
            return []
        peers = self._pairs.pop(client_id, OrderedDict())
        self._pair_count -= len(peers)
        for peer in peers:
            theirs = self._pairs.get(peer)
            if theirs is not None and client_id in theirs:
                del theirs[client_id]
                self._pair_count -= 1
        return list(peers)

    def brokered(self, a: str, b: str) -> None:
        """The coordinator brokered a channel between ``a`` and ``b``."""
        self._add(a, b)
        self._add(b, a)

    def _add(self, owner: str, peer: str) -> None:
        peers = self._pairs.pop(owner, None)
        if peers is None:
            peers = OrderedDict()
        self._pairs[owner] = peers  # the most recently used last
        if peer in peers:
            peers.move_to_end(peer)
            return
        peers[peer] = None
        self._pair_count += 1
        if len(peers) > self._max_per_id:
            peers.popitem(last=False)
            self._pair_count -= 1
        while self._pair_count > self._max_pairs and len(self._pairs) > 1:
            _, oldest = self._pairs.popitem(last=False)
            self._pair_count -= len(oldest)

    @property
    def sizes(self) -> tuple[int, int]:
        """(ids with a remembered certificate, brokered pairs remembered)"""
        return len(self._certs), self._pair_count
