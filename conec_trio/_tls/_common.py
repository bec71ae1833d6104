"""Loading certificates and keys, names, dates, ephemeral identities, pinning: what the
client and server checks share."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from .. import certs
from .._exceptions import CertificateError

# Largest client certificate (DER) accepted: the coordinator hands it to peers in channel
# offers, which must stay well under any message limit (the wire's limit is the same).
MAX_CLIENT_CERT_SIZE = 16 * 1024


def load_cert(pem_or_der: bytes) -> x509.Certificate:
    """Parse one certificate, PEM or DER; a PEM bundle gives its first certificate."""
    try:
        if pem_or_der.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(pem_or_der)
        return x509.load_der_x509_certificate(pem_or_der)
    except ValueError as exc:
        raise CertificateError(f"could not parse certificate: {exc}") from exc


def load_cert_chain_pem(pem: bytes) -> list[x509.Certificate]:
    """Parse every certificate of a PEM bundle, in order (the leaf first in a chain file)."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(f"could not parse PEM certificates: {exc}") from exc


def load_private_key(pem: bytes) -> PrivateKeyTypes:
    """Parse an unencrypted private key, PEM (or DER)."""
    try:
        if pem.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_private_key(pem, password=None)
        return serialization.load_der_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(
            f"could not load private key (it must be unencrypted PEM): {exc}"
        ) from exc


def cert_der(cert: x509.Certificate) -> bytes:
    """The DER encoding of ``cert``: what pinning compares and what the coordinator hands out."""
    return cert.public_bytes(serialization.Encoding.DER)


def cert_names(cert: x509.Certificate) -> set[str]:
    """The names ``cert`` is valid for: DNS and IP subjectAltNames, as strings.

    Only a certificate without any subjectAltName extension falls back to its subject common
    name(s), as old certificates did.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return _common_names(cert)
    names = set(san.get_values_for_type(x509.DNSName))
    names.update(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return names


def verify_pinned(cert: x509.Certificate, expected_der: bytes, peer: str) -> None:
    """Check that ``peer`` presented exactly the certificate the coordinator vouched for.

    Raises:
      CertificateError: it presented any other certificate.
    """
    if cert_der(cert) != expected_der:
        raise CertificateError(
            f"peer {peer!r} presented a certificate other than the one the coordinator vouched for"
        )


def ephemeral_identity(client_id: str) -> tuple[bytes, bytes]:
    """A fresh self-signed ``(cert_pem, key_pem)`` valid for ``client_id``.

    The id is always a DNS name in the certificate (even one that looks like an IP address),
    since that is what :func:`verify_client_cert` matches.
    """
    return certs._self_signed([x509.DNSName(client_id)], client_id, days=825)


def ephemeral_identity_objects(
    client_id: str,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """:func:`ephemeral_identity` as objects, for a client that uses it at once."""
    return certs._self_signed_objects([x509.DNSName(client_id)], client_id, days=825)


def _utc(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=datetime.UTC)
    return now


def _fmt(when: datetime.datetime) -> str:
    return f"{when:%Y-%m-%d %H:%M:%S} UTC"


def _describe(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty name)"


def _common_names(cert: x509.Certificate) -> set[str]:
    return {
        value
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if isinstance(value := attr.value, str)
    }


def _dns_names(cert: x509.Certificate) -> set[str]:
    """DNS subjectAltNames; the common name only when there is no subjectAltName at all."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return _common_names(cert)
    return set(san.get_values_for_type(x509.DNSName))


def _check_dates(cert: x509.Certificate, now: datetime.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{what} is not valid yet: valid from {_fmt(cert.not_valid_before_utc)}, it is "
            f"now {_fmt(now)} (check the clocks of both machines)"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{what} expired on {_fmt(cert.not_valid_after_utc)}")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return _signed_by(cert, cert)


def _check_issuer_is_ca(issuer: x509.Certificate, what: str) -> None:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(
            f"{what} signed a certificate but is not a CA (basicConstraints CA=TRUE is missing)"
        )
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CertificateError(f"{what} may not sign certificates (keyUsage lacks keyCertSign)")
