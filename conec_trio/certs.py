"""Make the certificates a conec deployment needs.

Everything here returns PEM bytes: ``(cert_pem, key_pem)`` pairs with ECDSA P-256 keys and
SHA-256 signatures, made with ``cryptography``. A typical deployment::

    from conec_trio import certs

    ca_cert, ca_key = certs.make_ca()
    coord_cert, coord_key = certs.issue_cert(ca_cert, ca_key, ["coord.example.net"])
    alice_cert, alice_key = certs.issue_cert(ca_cert, ca_key, ["alice"])

The coordinator is configured with ``coord_cert``/``coord_key`` (and ``client_ca=ca_cert`` to
admit only clients holding a cert from this CA); clients pass ``ca=ca_cert`` and, if the
coordinator demands it, their own ``alice_cert``/``alice_key``.

Names that parse as IP addresses (``"127.0.0.1"``, ``"::1"``) go into IP address
subjectAltNames; every other name is a DNS name. A client's certificate must carry its client
id as a DNS name.

Every certificate starts being valid one hour in the past, so machines whose clocks are a
little behind accept it at once.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "default_ca_name",
    "issue_cert",
    "load_ca",
    "make_ca",
    "save_pair",
    "self_signed_cert",
    "write_ca",
]

#: File names :func:`write_ca` and :func:`load_ca` use inside a CA directory.
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"

# How far back validity starts, so that peers with slow clocks accept a fresh certificate.
_CLOCK_SKEW = datetime.timedelta(hours=1)
# X.520 upper bound on a common name; longer names only go in the subjectAltName.
_MAX_CN_LENGTH = 64


def default_ca_name() -> str:
    """A CA name no other CA has: ``conec-trio CA`` and a random tag, so that an error about
    a certificate's issuer names the one CA meant, not any of many of the same name."""
    return f"conec-trio CA {secrets.token_hex(4)}"


def make_ca(common_name: str | None = None, *, days: int = 3650) -> tuple[bytes, bytes]:
    """Make a self-signed certificate authority.

    Args:
      common_name: The CA's subject common name, shown in error messages about certificates
        it did (or did not) sign; by default :func:`default_ca_name`, unique to this CA.
      days: How many days the CA stays valid.

    Returns:
      ``(cert_pem, key_pem)``. Keep the key secret: whoever holds it can issue certificates
      for any name, including any client id.

    Raises:
      ValueError: ``days`` is not positive or ``common_name`` is empty or too long.
    """
    _check_days(days)
    if common_name is None:
        common_name = default_ca_name()
    if not common_name or len(common_name) > _MAX_CN_LENGTH:
        raise ValueError(
            f"CA common name must be 1 to {_MAX_CN_LENGTH} characters, got {common_name!r}"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    names: Sequence[str],
    *,
    days: int = 825,
) -> tuple[bytes, bytes]:
    """Issue a leaf certificate for ``names``, signed by a CA.

    The certificate is good for both ends of a TLS connection (serverAuth and clientAuth), so
    the same kind of certificate serves a coordinator (named by its host name or IP address)
    and a client (named by its client id).

    Args:
      ca_cert_pem: The CA certificate, PEM (for example from :func:`make_ca`).
      ca_key_pem: The CA's private key, PEM, unencrypted.
      names: DNS names and IP address literals the certificate is valid for; the first one
        also becomes the subject common name.
      days: How many days the certificate stays valid; it never outlives the CA.

    Returns:
      ``(cert_pem, key_pem)`` of the new certificate and its fresh private key.

    Raises:
      ValueError: no names, a ``days`` that is not positive, a PEM that does not parse, a
        CA key that does not belong to the CA certificate, or a CA certificate that is not a
        CA or has expired.
    """
    _check_days(days)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(
        ca_key,
        (
            ec.EllipticCurvePrivateKey,
            rsa.RSAPrivateKey,
            dsa.DSAPrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        raise ValueError(f"a {type(ca_key).__name__} cannot sign certificates")
    if ca_key.public_key() != ca_cert.public_key():
        raise ValueError("the CA private key does not belong to the CA certificate")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError(
            f"certificate {ca_cert.subject.rfc4514_string()!r} is not a CA "
            "(basicConstraints CA=TRUE is missing)"
        )
    not_before, not_after = _validity(days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    if not_after <= not_before:
        raise ValueError(
            f"CA {ca_cert.subject.rfc4514_string()!r} expired on "
            f"{ca_cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; make a new CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = _leaf_builder(key, _san(names), names[0], not_before, not_after, ca_cert.subject)
    cert = builder.add_extension(aki, critical=False).sign(ca_key, _hash_for(ca_key))
    return _cert_pem(cert), _key_pem(key)


def self_signed_cert(names: Sequence[str], *, days: int = 825) -> tuple[bytes, bytes]:
    """Make a self-signed leaf certificate for ``names``.

    Clients use one by default (an ephemeral certificate valid for their id); a coordinator can
    use one if its clients are given the certificate itself as their ``ca``.

    Args:
      names: DNS names and IP address literals the certificate is valid for; the first one
        also becomes the subject common name.
      days: How many days the certificate stays valid.

    Returns:
      ``(cert_pem, key_pem)``.

    Raises:
      ValueError: no names, or a ``days`` that is not positive.
    """
    return _self_signed(_san(names), names[0], days=days)


def save_pair(
    cert_pem: bytes,
    key_pem: bytes,
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
) -> None:
    """Write a certificate and its key to files; the key file is readable by its owner only.

    The key file is created with mode ``0o600`` (and set to it if it already existed), so the
    key is never readable by others, not even briefly. Existing files are overwritten.

    Raises:
      OSError: a file could not be written.
    """
    Path(cert_path).write_bytes(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        if hasattr(os, "fchmod"):  # not on Windows
            os.fchmod(f.fileno(), 0o600)
        f.write(key_pem)


def write_ca(
    directory: str | os.PathLike[str],
    common_name: str | None = None,
    *,
    days: int = 3650,
) -> tuple[Path, Path]:
    """Make a CA with :func:`make_ca` and save it in ``directory`` (created if needed).

    The files are ``ca.pem`` (give it to clients as ``ca``, and to a coordinator as
    ``client_ca``) and ``ca-key.pem`` (mode ``0o600``; keep it secret).

    Returns:
      ``(cert_path, key_path)``.

    Raises:
      FileExistsError: ``directory`` already holds a CA; it is never overwritten, since every
        certificate it issued would stop being trusted.
      OSError: the directory or a file could not be written.
    """
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; refusing to replace a CA (remove it first, or pick "
                "another directory)"
            )
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_ca(common_name, days=days)
    save_pair(cert_pem, key_pem, cert_path, key_path)
    return cert_path, key_path


def load_ca(directory: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """Read the ``(cert_pem, key_pem)`` that :func:`write_ca` saved in ``directory``.

    Raises:
      FileNotFoundError: ``directory`` holds no CA made by :func:`write_ca`.
    """
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    for path in (cert_path, key_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a CA directory (make one with "
                "'conec-trio certs ca DIR')"
            )
    return cert_path.read_bytes(), key_path.read_bytes()


# ---------------------------------------------------------------------------------------------


def _check_days(days: int) -> None:
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - _CLOCK_SKEW, now + datetime.timedelta(days=days)


def _san(names: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(names, str):
        raise TypeError("names must be a sequence of names, not a single str")
    if not names:
        raise ValueError("a certificate needs at least one name")
    entries: list[x509.GeneralName] = []
    for name in names:
        if not name:
            raise ValueError("certificate names must not be empty")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _self_signed(
    san: list[x509.GeneralName], common_name: str, *, days: int
) -> tuple[bytes, bytes]:
    """A self-signed leaf for exactly these subjectAltName entries."""
    cert, key = _self_signed_objects(san, common_name, days=days)
    return _cert_pem(cert), _key_pem(key)


def _self_signed_objects(
    san: list[x509.GeneralName], common_name: str, *, days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """:func:`_self_signed` without the PEM round trip (for a key used in this process)."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    cert = _leaf_builder(key, san, common_name, not_before, not_after, None)
    return cert.sign(key, hashes.SHA256()), key


def _leaf_builder(
    key: ec.EllipticCurvePrivateKey,
    san: list[x509.GeneralName],
    common_name: str,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    issuer: x509.Name | None,
) -> x509.CertificateBuilder:
    """A leaf certificate builder with everything but the AKI; ``issuer=None``: self-signed."""
    attributes = []
    if len(common_name) <= _MAX_CN_LENGTH:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    subject = x509.Name(attributes)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # RFC 5280: the subjectAltName is critical when the subject is empty.
        .add_extension(x509.SubjectAlternativeName(san), critical=not attributes)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign without a separate hash; everything else uses SHA-256.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
