"""The TLS context of client-role connections (no trio): the check of the server's
certificate on a trust store made once, and an identity made while the first flight is out.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from cryptography import x509

from .. import _tls


class ClientTlsContext(tls.Context):
    """aioquic's TLS context with its check of the server's certificate replaced by the same
    check on a trust store made once (``_tls.verify_server_certificate``): aioquic rebuilds
    the store in every handshake, which costs a tenth of a millisecond with one CA and over
    ten with the system's CAs."""

    # Gives (certificate, chain, private key) when the server asks for them and the
    # configuration had none yet: a client may make its identity during the handshake.
    identity: Callable[[], tuple[x509.Certificate, list[x509.Certificate], Any]] | None = None

    def _client_handle_finished(self, input_buf: Buffer, output_buf: Any) -> None:
        if self.certificate is None and self.identity is not None:
            self.certificate, self.certificate_chain, self.certificate_private_key = self.identity()
        super()._client_handle_finished(input_buf, output_buf)

    def _client_handle_certificate_verify(self, input_buf: Buffer) -> None:
        verify = tls.pull_certificate_verify(input_buf)
        self._check_certificate_verify_signature(verify)
        if self._verify_mode != ssl.CERT_NONE:
            assert self._peer_certificate is not None
            try:
                _tls.verify_server_certificate(
                    self._peer_certificate,
                    self._peer_certificate_chain,
                    self._server_name,
                    self._cadata,
                    self._cafile,
                    self._capath,
                )
            except _tls.ServerCertificateError as exc:
                expired = exc.kind == "expired"
                alert = tls.AlertCertificateExpired if expired else tls.AlertBadCertificate
                raise alert(str(exc)) from exc
        assert self.key_schedule is not None
        self.key_schedule.update_hash(input_buf.data)
        self._set_state(tls.State.CLIENT_EXPECT_FINISHED)
