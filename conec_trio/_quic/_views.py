"""Read-only views of an aioquic connection for the driver and the stream layer (no trio),
so that nothing outside this package reads aioquic's private state.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.connection import END_STATES, QuicConnection, QuicConnectionState
from cryptography import x509

_CLOSING_STATES = (
    QuicConnectionState.CLOSING,
    QuicConnectionState.DRAINING,
    QuicConnectionState.TERMINATED,
)


class ConnectionViews(QuicConnection):
    """What the library's connection shows of aioquic's state (see ``_aioquic``)."""

    # -- small read-only views used by the stream layer -----------------------------------

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to a stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def send_open(self, stream_id: int) -> bool:
        """Data may still be written to the stream: no FIN written, no reset (ours, or the
        one aioquic makes on the peer's STOP_SENDING before its event is handled)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        sender = stream.sender
        return sender._buffer_fin is None and sender._reset_error_code is None

    def fin_acked(self, stream_id: int) -> bool:
        """True when the stream's send side is done (FIN or reset acknowledged, or gone)."""
        stream = self._streams.get(stream_id)
        return stream is None or bool(stream.sender.is_finished)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        cert: x509.Certificate | None = self.tls._peer_certificate
        return cert

    @property
    def peer_certificate_chain(self) -> list[x509.Certificate]:
        return list(getattr(self.tls, "_peer_certificate_chain", []) or [])

    # -- state the driver reads -----------------------------------------------------------

    @property
    def is_client(self) -> bool:
        return bool(self._is_client)

    @property
    def is_terminated(self) -> bool:
        """aioquic is done with the connection (after its closing period)."""
        return bool(self._state == QuicConnectionState.TERMINATED)

    @property
    def is_closing(self) -> bool:
        """A close was started or received: nothing more can be sent on streams."""
        return self._state in _CLOSING_STATES

    @property
    def is_over(self) -> bool:
        return self._state in END_STATES

    @property
    def handshake_confirmed(self) -> bool:
        return bool(self._handshake_confirmed)

    @property
    def bytes_in_flight(self) -> int:
        return int(self._loss.bytes_in_flight)

    @property
    def probe_timeouts(self) -> int:
        """Probe timeouts in a row with nothing acknowledged (0 again at the next ACK)."""
        return int(self._loss._pto_count)

    @property
    def peer_idle_timeout(self) -> float | None:
        """The peer's idle timeout once known (0: it has none)."""
        value: float | None = self._remote_max_idle_timeout
        return value

    @property
    def close_event(self) -> Any:
        """aioquic's ConnectionTerminated, known before aioquic reports it (it reports only
        after its closing period)."""
        return self._close_event

    @property
    def datagram_size(self) -> int:
        return int(self._max_datagram_size)

    @property
    def smoothed_rtt(self) -> float:
        return float(self._loss._rtt_smoothed)

    @property
    def peer_address(self) -> Any:
        """The peer's address on the current path: the address of the last authenticated
        packet that moved the connection there (aioquic only migrates a connection on a
        packet it decrypted), never merely the source of some datagram."""
        return self._network_paths[0].addr

    @property
    def idle_deadline(self) -> float | None:
        """When aioquic closes the connection as idle; moves on every authenticated packet."""
        value: float | None = self._close_at
        return value

    def host_cids(self) -> list[bytes]:
        return [cid.cid for cid in self._host_cids]

    def stream_blocked(self, stream_id: int) -> bool:
        """The stream still waits for the peer's stream-count credit."""
        stream = self._streams.get(stream_id)
        return stream is not None and bool(stream.is_blocked)
