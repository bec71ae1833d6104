"""Checks of the certificates clients present: to the coordinator, and to peers of a direct
channel. See the package docstring."""

from __future__ import annotations

import datetime
import functools
import re
from typing import NoReturn

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from .._exceptions import CertificateError
from ._common import (
    MAX_CLIENT_CERT_SIZE,
    _check_dates,
    _check_issuer_is_ca,
    _describe,
    _dns_names,
    _is_self_signed,
    _signed_by,
    _utc,
    cert_der,
    load_cert_chain_pem,
)

# Longest chain of intermediates followed from a client certificate to the client CA.
_MAX_INTERMEDIATES = 8


_MAX_CHAIN_DEPTH = _MAX_INTERMEDIATES + 1  # the verifier counts the anchor as well


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
