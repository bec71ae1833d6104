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

from ._client_chain import verify_client_cert
from ._common import (
    MAX_CLIENT_CERT_SIZE,
    cert_der,
    cert_names,
    ephemeral_identity,
    ephemeral_identity_objects,
    load_cert,
    load_cert_chain_pem,
    load_private_key,
    verify_pinned,
)
from ._server import ServerCertificateError, verify_server_certificate

__all__ = [
    "MAX_CLIENT_CERT_SIZE",
    "ServerCertificateError",
    "cert_der",
    "cert_names",
    "ephemeral_identity",
    "ephemeral_identity_objects",
    "load_cert",
    "load_cert_chain_pem",
    "load_private_key",
    "verify_client_cert",
    "verify_pinned",
    "verify_server_certificate",
]
