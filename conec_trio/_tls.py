"""Checks on the certificates clients and peers present.

aioquic proves that the other side holds the private key of the certificate it presents (the
TLS CertificateVerify signature), but it does not validate a *client's* certificate at all: no
chain, no dates, no name. This module does that part:

- the coordinator checks each client's certificate with :func:`verify_client_cert`: size,
  dates, the client id among its names, and (with a client CA) a chain up to that CA; a
  client that accepts direct channels checks its peers' certificates the same way;
- for a direct channel, each side accepts exactly the certificate the coordinator vouched for
  (:func:`verify_pinned`).

The chain up to a client CA is validated by ``cryptography.x509.verification`` (complete RFC
5280 path validation: signatures, dates, basicConstraints and pathLen, keyUsage,
nameConstraints, extendedKeyUsage, unknown critical extensions). Its defaults are the CA/Browser
Forum's profile for web servers, stricter than RFC 5280 in ways that refuse certificates common
in practice (trustme's leaves have a critical subjectAltName next to a non-empty subject and a
critical extendedKeyUsage; hand-made CAs often lack an authorityKeyIdentifier or a keyUsage).
:data:`_EE_POLICY` and :data:`_CA_POLICY` relax exactly those, and want clientAuth in a leaf
that lists extended key usages. When it refuses a chain, the hand-written walk of
:func:`_explain_refusal` says why in a user's terms where it can (self-signed, wrong CA, a
missing intermediate, an expired CA); otherwise the verifier's own reason is given.

It also holds the check of the *coordinator's* certificate that aioquic makes during the
handshake (:func:`verify_server_certificate`): the same checks, with the trust store built
once per CA setting instead of once per handshake (a system store takes milliseconds to load).
It raises :class:`ServerCertificateError`, whose ``kind`` says which TLS alert the handshake
answers with; this module knows nothing of aioquic.

Every failure raises :class:`~conec_trio.CertificateError` with a message that says which check
failed and what to do about it.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
from typing import Literal, NoReturn

import certifi
import service_identity
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from OpenSSL import crypto

from . import certs
from ._exceptions import CertificateError

# Longest chain of intermediates followed from a client certificate to the client CA.
_MAX_INTERMEDIATES = 8
_MAX_CHAIN_DEPTH = _MAX_INTERMEDIATES + 1  # the verifier counts the anchor as well


class ServerCertificateError(CertificateError):
    """The coordinator's certificate failed :func:`verify_server_certificate`.

    ``kind`` is ``"expired"`` (outside its validity period) or ``"bad certificate"`` (not
    valid for the name, not trusted): the TLS alert the handshake answers with.
    """

    def __init__(self, kind: Literal["expired", "bad certificate"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def verify_client_cert(
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    client_id: str,
    client_ca_pem: bytes | None,
    now: datetime.datetime | None = None,
) -> None:
    """Check that a client may connect as ``client_id`` with ``cert``.

    Args:
      cert: The certificate the client presented (TLS already proved it holds the key).
      chain: The other certificates it sent (intermediates); the leaf and the CA itself may be
        among them.
      client_id: The id the client asks for.
      client_ca_pem: The coordinator's client CA (one or more PEM certificates), or None to
        accept any certificate, self-signed included, that is valid for ``client_id``.
      now: The time to check validity at (default: now; naive datetimes are UTC).

    Raises:
      CertificateError: the certificate is larger than :data:`MAX_CLIENT_CERT_SIZE`,
        outside its validity period, not valid for ``client_id`` as a DNS name, or (with
        ``client_ca_pem``) not signed by that CA.
    """
    size = len(cert_der(cert))
    if size > MAX_CLIENT_CERT_SIZE:
        raise CertificateError(
            f"client certificate is {size} bytes; at most {MAX_CLIENT_CERT_SIZE} are accepted "
            "(peers are sent it when they open direct channels)"
        )
    now = _utc(now)
    _check_dates(cert, now, "client certificate")

    try:
        dns_names = _dns_names(cert)
    except ValueError as exc:  # cryptography parses all extensions when one is first read
        raise CertificateError(
            f"client certificate's extensions could not be parsed: {exc}"
        ) from exc
    if client_id.lower() not in {name.lower() for name in dns_names}:
        if dns_names:
            raise CertificateError(
                f"client certificate is valid for {sorted(dns_names)}, not for client id "
                f"{client_id!r}"
            )
        raise CertificateError(
            f"client certificate carries no DNS name, so it is not valid for client id "
            f"{client_id!r}; issue it with {client_id!r} as a DNS subjectAltName"
        )

    if client_ca_pem is None:
        return
    anchors, store = _client_ca(client_ca_pem)
    leaf_der = cert_der(cert)
    intermediates = [c for c in chain if cert_der(c) != leaf_der]
    verifier = (
        PolicyBuilder()
        .store(store)
        .time(now)
        .max_chain_depth(_MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verifier.verify(cert, intermediates)
    except VerificationError as exc:
        _explain_refusal(cert, intermediates, anchors, now)
        raise CertificateError(
            f"client certificate refused by path validation: {_verifier_reason(exc)}"
        ) from exc


@functools.lru_cache(maxsize=16)
def _client_ca(client_ca_pem: bytes) -> tuple[list[x509.Certificate], Store]:
    """A client CA setting, parsed once (it is checked against every client that connects)."""
    anchors = load_cert_chain_pem(client_ca_pem)
    return anchors, Store(anchors)


_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def _wants_client_auth(
    policy: Policy, cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None
) -> None:
    """A leaf without extendedKeyUsage may serve any purpose; one with it must list clientAuth
    (as OpenSSL wants of a TLS client: anyExtendedKeyUsage alone is not enough)."""
    if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH in usage:
        return
    names = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in usage)
    raise ValueError(f"extendedKeyUsage lists {names}, not clientAuth: not a client certificate")


def _may_sign_certificates(
    policy: Policy, cert: x509.Certificate, usage: x509.KeyUsage | None
) -> None:
    """RFC 5280: a CA's keyUsage, where present, must allow keyCertSign."""
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("keyUsage lacks keyCertSign: this CA may not sign certificates")


# The CA/Browser Forum profile, relaxed to RFC 5280 where certificates common in practice
# differ: a critical subjectAltName (trustme; RFC 5280 wants it critical when the subject is
# empty), a critical extendedKeyUsage (trustme), no subjectAltName (names then come from the
# common name), no authorityKeyIdentifier, a CA without keyUsage.
_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _wants_client_auth)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
)
_CA_POLICY = (
    ExtensionPolicy.webpki_defaults_ca()
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _may_sign_certificates)
)

_VERIFIER_NOISE = re.compile(
    r"^(validation failed: )?(candidates exhausted: )?|Python extension validator failed: \w+: "
)
_VERIFIER_WHERE = re.compile(
    r" \(encountered processing <Certificate\(subject=<Name\((?P<subject>.*)\)>, \.\.\.\)>\)$"
)


def _verifier_reason(exc: VerificationError) -> str:
    """The verifier's reason, without its internal framing; which certificate, if it says."""
    reason = _VERIFIER_NOISE.sub("", str(exc))
    return _VERIFIER_WHERE.sub(r" (certificate \g<subject>)", reason)


def verify_pinned(cert: x509.Certificate, expected_der: bytes, peer: str) -> None:
    """Check that ``peer`` presented exactly the certificate the coordinator vouched for.

    Raises:
      CertificateError: it presented any other certificate.
    """
    if cert_der(cert) != expected_der:
        raise CertificateError(
            f"peer {peer!r} presented a certificate other than the one the coordinator vouched for"
        )


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


# ---------------------------------------------------------------------------------------------


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


def _explain_refusal(
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    now: datetime.datetime,
) -> None:
    """The verifier refused ``cert``: walk from it through ``chain`` to one of ``anchors``
    and raise CertificateError saying why in a user's terms, where this walk finds the
    reason (no path, a step that is not a CA, a certificate outside its validity period);
    return if it finds none (the verifier's reason is then given)."""
    leaf_der = cert_der(cert)
    anchor_ders = {cert_der(anchor) for anchor in anchors}
    intermediates = {
        der: c for c in chain if (der := cert_der(c)) != leaf_der and der not in anchor_ders
    }
    ca_names = ", ".join(_describe(anchor.subject) for anchor in anchors)

    current = cert
    for _ in range(_MAX_INTERMEDIATES + 1):
        anchor = _find_issuer(current, anchors)
        if anchor is not None:
            what = f"the coordinator's client CA {_describe(anchor.subject)}"
            _check_issuer_is_ca(anchor, what)
            _check_dates(anchor, now, what)
            return
        intermediate = _find_issuer(current, list(intermediates.values()))
        if intermediate is None:
            _refuse_unchained(cert, current, anchors, ca_names)
        del intermediates[cert_der(intermediate)]  # each one at most once: no loops
        what = f"intermediate certificate {_describe(intermediate.subject)}"
        _check_issuer_is_ca(intermediate, what)
        _check_dates(intermediate, now, what)
        current = intermediate
    raise CertificateError(
        f"client certificate chain is longer than {_MAX_INTERMEDIATES} intermediates"
    )


def _find_issuer(
    cert: x509.Certificate, candidates: list[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        if _signed_by(cert, candidate):
            return candidate
    return None


def _refuse_unchained(
    cert: x509.Certificate,
    current: x509.Certificate,
    anchors: list[x509.Certificate],
    ca_names: str,
) -> NoReturn:
    """Say why ``current`` (``cert`` or the last intermediate reached) has no known issuer."""
    if current is cert and _is_self_signed(cert):
        raise CertificateError(
            "coordinator requires a certificate signed by its client CA; a self-signed "
            f"certificate was presented (client CA: {ca_names})"
        )
    if any(current.issuer == anchor.subject for anchor in anchors):
        raise CertificateError(
            f"client certificate is not signed by the coordinator's client CA: "
            f"{_describe(current.subject)} names {_describe(current.issuer)} as its issuer, but "
            "its signature does not verify with that CA's key (issued by another CA of the "
            "same name?)"
        )
    if current is cert:
        raise CertificateError(
            "client certificate is not signed by the coordinator's client CA (issuer: "
            f"{_describe(cert.issuer)}; client CA: {ca_names})"
        )
    raise CertificateError(
        "client certificate is not signed by the coordinator's client CA: its chain ends at "
        f"{_describe(current.subject)} (issuer: {_describe(current.issuer)}; client CA: "
        f"{ca_names}); is an intermediate certificate missing from the client's chain?"
    )
