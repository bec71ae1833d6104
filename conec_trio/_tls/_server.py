"""The check of the coordinator's certificate that aioquic makes during the handshake, with
the trust store built once per CA setting. See the package docstring."""

from __future__ import annotations

import datetime
import functools
import ipaddress
from typing import Literal

import certifi
import service_identity
from cryptography import x509
from OpenSSL import crypto

from .._exceptions import CertificateError
from ._common import cert_der


class ServerCertificateError(CertificateError):
    """The coordinator's certificate failed :func:`verify_server_certificate`.

    ``kind`` is ``"expired"`` (outside its validity period) or ``"bad certificate"`` (not
    valid for the name, not trusted): the TLS alert the handshake answers with.
    """

    def __init__(self, kind: Literal["expired", "bad certificate"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


def verify_server_certificate(
    certificate: x509.Certificate,
    chain: list[x509.Certificate],
    server_name: str | None,
    cadata: bytes | None,
    cafile: str | None,
    capath: str | None,
) -> None:
    """aioquic's ``tls.verify_certificate``, check for check and alert for alert: dates, the
    server name, and the chain up to the trusted CAs. Only the trust store is made once per
    ``(cadata, cafile, capath)`` and kept (see :func:`_trust_store`), as is the OpenSSL copy
    of a certificate seen before.

    Raises:
      ServerCertificateError: of kind ``"expired"`` outside its validity period; of kind
        ``"bad certificate"`` if not valid for ``server_name``, or not trusted (the handshake
        answers with aioquic's AlertCertificateExpired or AlertBadCertificate).
    """
    now = datetime.datetime.now(datetime.UTC)
    if now < certificate.not_valid_before_utc:
        raise ServerCertificateError("expired", "Certificate is not valid yet")
    if now > certificate.not_valid_after_utc:
        raise ServerCertificateError("expired", "Certificate is no longer valid")

    if server_name is not None:
        _verify_server_name(certificate, server_name)

    store = _trust_store(cadata, cafile, capath)
    store_ctx = crypto.X509StoreContext(
        store, _openssl_cert(cert_der(certificate)), [_openssl_cert(cert_der(c)) for c in chain]
    )
    try:
        store_ctx.verify_certificate()
    except crypto.X509StoreContextError as exc:
        raise ServerCertificateError("bad certificate", exc.args[0]) from exc


def _verify_server_name(certificate: x509.Certificate, server_name: str) -> None:
    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        is_ip = False
    else:
        is_ip = True
    try:
        if is_ip:
            service_identity.cryptography.verify_certificate_ip_address(certificate, server_name)
        else:
            service_identity.cryptography.verify_certificate_hostname(certificate, server_name)
    except ValueError as exc:
        # The certificate's extensions are only parsed when accessed.
        raise ServerCertificateError(
            "bad certificate", "Certificate extensions could not be parsed"
        ) from exc
    except (service_identity.CertificateError, service_identity.VerificationError) as exc:
        message = _mismatch(certificate, server_name, exc)
        raise ServerCertificateError("bad certificate", message) from exc


def _mismatch(certificate: x509.Certificate, server_name: str, exc: Exception) -> str:
    """Why ``certificate`` is not valid for ``server_name``, as aioquic words it."""
    try:
        patterns = service_identity.cryptography.extract_patterns(certificate)
    except (service_identity.CertificateError, ValueError) as parse_error:
        # A subjectAltName service_identity cannot parse (an IP address as a DNS name, a
        # malformed wildcard): aioquic's own check raises this out of its error path.
        return (
            f"the certificate's names cannot be checked against {server_name!r}: "
            f"{parse_error} (is a subjectAltName malformed?)"
        )
    if len(patterns) == 0:
        return str(exc)
    if len(patterns) == 1:
        return f"hostname {server_name!r} doesn't match {patterns[0]!r}"
    patterns_repr = ", ".join(repr(pattern) for pattern in patterns)
    return f"hostname {server_name!r} doesn't match either of {patterns_repr}"


@functools.lru_cache(maxsize=16)
def _trust_store(cadata: bytes | None, cafile: str | None, capath: str | None) -> crypto.X509Store:
    """The CAs a server certificate may chain to, as aioquic would load them. OpenSSL does not
    change a store while verifying with it, so one store serves every handshake."""
    store = crypto.X509Store()
    if cadata is None and cafile is None and capath is None:
        store.load_locations(certifi.where())
    if cadata is not None:
        for cert in x509.load_pem_x509_certificates(cadata):
            store.add_cert(crypto.X509.from_cryptography(cert))
    if cafile is not None or capath is not None:
        store.load_locations(cafile, capath)
    return store


@functools.lru_cache(maxsize=64)
def _openssl_cert(der: bytes) -> crypto.X509:
    return crypto.load_certificate(crypto.FILETYPE_ASN1, der)
