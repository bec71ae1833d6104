"""Client and peer certificate checks: each refusal says which check failed, in user terms."""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier

from conec_trio import _tls, certs
from conec_trio._exceptions import CertificateError, ConecError
from conec_trio._wire import control

UTC = datetime.UTC
Extensions = Sequence[tuple[x509.ExtensionType, bool]]  # (extension, critical)


# --- building unusual certificates directly -------------------------------------------------


class _Issuer:
    """A CA (or something posing as one) that signs arbitrary test certificates."""

    def __init__(
        self,
        cn: str,
        *,
        ca: bool = True,
        issuer: _Issuer | None = None,
        path_length: int | None = None,
        extra: Extensions = (),
    ) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _build(
            cn,
            self.key,
            signer=issuer,
            ca=ca,
            path_length=path_length,
            not_before=datetime.datetime.now(UTC) - datetime.timedelta(days=1),
            not_after=datetime.datetime.now(UTC) + datetime.timedelta(days=30),
            extra=extra,
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _build(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    signer: _Issuer | None,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    ca: bool = False,
    path_length: int | None = None,
    san: list[str] | None = None,
    extra: Extensions = (),
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if signer is None else signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False
        )
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key if signer is None else signer.key, hashes.SHA256())


def _leaf(
    signer: _Issuer | None,
    name: str = "alice",
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    san: list[str] | None = None,
    ca: bool = False,
    extra: Extensions = (),
) -> x509.Certificate:
    now = datetime.datetime.now(UTC)
    return _build(
        name,
        ec.generate_private_key(ec.SECP256R1()),
        signer=signer,
        not_before=not_before or now - datetime.timedelta(hours=1),
        not_after=not_after or now + datetime.timedelta(days=1),
        san=[name] if san is None else san,
        ca=ca,
        extra=extra,
    )


def _our_ca() -> tuple[bytes, bytes]:
    return certs.make_ca("Team CA")


# --- accepted --------------------------------------------------------------------------------


def test_cert_issued_by_our_ca_is_accepted() -> None:
    ca_pem, ca_key_pem = _our_ca()
    cert_pem, _ = certs.issue_cert(ca_pem, ca_key_pem, ["alice"])
    chain = _tls.load_cert_chain_pem(cert_pem)
    _tls.verify_client_cert(chain[0], chain[1:], "alice", ca_pem)


def test_self_signed_and_ephemeral_certs_accepted_without_client_ca() -> None:
    cert_pem, _ = certs.self_signed_cert(["alice"])
    _tls.verify_client_cert(_tls.load_cert(cert_pem), [], "alice", None)
    eph_pem, eph_key_pem = _tls.ephemeral_identity("alice")
    eph = _tls.load_cert(eph_pem)
    _tls.verify_client_cert(eph, [], "alice", None)
    assert _tls.load_private_key(eph_key_pem).public_key() == eph.public_key()


def test_ephemeral_identity_for_an_id_that_looks_like_an_ip_address() -> None:
    # "10.0.0.1" is a valid client id; it must be matched as a name, not as an IP SAN.
    cert = _tls.load_cert(_tls.ephemeral_identity("10.0.0.1")[0])
    assert cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == ["10.0.0.1"]
    _tls.verify_client_cert(cert, [], "10.0.0.1", None)


def test_trustme_leaf_accepted_with_trustme_ca() -> None:
    # trustme leafs have a critical SAN next to a non-empty subject; strict verifiers refuse
    # them, we must not.
    ca = trustme.CA()
    leaf = ca.issue_cert("alice")
    chain = [_tls.load_cert(blob.bytes()) for blob in leaf.cert_chain_pems]
    _tls.verify_client_cert(chain[0], chain[1:], "alice", ca.cert_pem.bytes())


def test_client_id_matches_case_insensitively() -> None:
    cert_pem, _ = certs.self_signed_cert(["Alice.Example"])
    _tls.verify_client_cert(_tls.load_cert(cert_pem), [], "alice.example", None)


def test_intermediate_chain_accepted() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("alice")
    chain = [_tls.load_cert(blob.bytes()) for blob in leaf.cert_chain_pems]
    assert len(chain) >= 2  # leaf + intermediate
    _tls.verify_client_cert(chain[0], chain[1:], "alice", root.cert_pem.bytes())
    # Order and extra copies (the leaf, the root itself) do not matter.
    extra = [*reversed(chain), _tls.load_cert(root.cert_pem.bytes())]
    _tls.verify_client_cert(chain[0], extra, "alice", root.cert_pem.bytes())


def test_two_level_intermediate_chain_accepted() -> None:
    root = _Issuer("Root CA")
    mid1 = _Issuer("Mid 1", issuer=root)
    mid2 = _Issuer("Mid 2", issuer=mid1)
    _tls.verify_client_cert(_leaf(mid2), [mid1.cert, mid2.cert], "alice", root.pem)


def test_client_ca_bundle_with_several_cas() -> None:
    first, second = _Issuer("First CA"), _Issuer("Second CA")
    _tls.verify_client_cert(_leaf(second), [], "alice", first.pem + second.pem)


def test_cert_without_san_falls_back_to_common_name() -> None:
    now = datetime.datetime.now(UTC)
    cert = _build(
        "alice",
        ec.generate_private_key(ec.SECP256R1()),
        signer=None,
        not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(hours=1),
    )
    assert _tls.cert_names(cert) == {"alice"}
    _tls.verify_client_cert(cert, [], "alice", None)


# --- refused ---------------------------------------------------------------------------------


def test_refusals_are_conec_errors() -> None:
    cert_pem, _ = certs.self_signed_cert(["bob"])
    with pytest.raises(ConecError):
        _tls.verify_client_cert(_tls.load_cert(cert_pem), [], "alice", None)


def test_name_mismatch_names_both() -> None:
    cert_pem, _ = certs.self_signed_cert(["bob"])
    with pytest.raises(
        CertificateError,
        match=re.escape("client certificate is valid for ['bob'], not for client id 'alice'"),
    ):
        _tls.verify_client_cert(_tls.load_cert(cert_pem), [], "alice", None)


def test_san_wins_over_common_name() -> None:
    cert = _leaf(None, "alice", san=["bob", "carol"])
    with pytest.raises(CertificateError, match=re.escape("['bob', 'carol'], not for client id")):
        _tls.verify_client_cert(cert, [], "alice", None)


def test_ip_san_is_not_a_client_id() -> None:
    ca_pem, ca_key_pem = _our_ca()
    cert = _tls.load_cert(certs.issue_cert(ca_pem, ca_key_pem, ["127.0.0.1"])[0])
    assert _tls.cert_names(cert) == {"127.0.0.1"}
    with pytest.raises(CertificateError, match=r"carries no DNS name.*'127\.0\.0\.1'"):
        _tls.verify_client_cert(cert, [], "127.0.0.1", ca_pem)


def test_wildcard_is_not_a_client_id() -> None:
    cert = _leaf(None, "star", san=["*.example.net"])
    with pytest.raises(CertificateError, match=re.escape("not for client id 'alice.example.net'")):
        _tls.verify_client_cert(cert, [], "alice.example.net", None)


def test_expired_cert_refused_with_its_date() -> None:
    cert = _leaf(
        None,
        not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC),
    )
    with pytest.raises(
        CertificateError, match="client certificate expired on 2021-03-04 05:06:07 UTC"
    ):
        _tls.verify_client_cert(cert, [], "alice", None)


def test_not_yet_valid_cert_refused_with_clock_hint() -> None:
    start = datetime.datetime.now(UTC) + datetime.timedelta(days=2)
    cert = _leaf(None, not_before=start, not_after=start + datetime.timedelta(days=1))
    with pytest.raises(CertificateError) as exc_info:
        _tls.verify_client_cert(cert, [], "alice", None)
    message = str(exc_info.value)
    assert "client certificate is not valid yet" in message
    assert f"valid from {start:%Y-%m-%d %H:%M:%S} UTC" in message
    assert "clocks" in message


def test_now_argument_sets_the_time_checked() -> None:
    cert_pem, _ = certs.self_signed_cert(["alice"], days=10)
    cert = _tls.load_cert(cert_pem)
    later = datetime.datetime.now() + datetime.timedelta(days=11)  # naive: taken as UTC
    with pytest.raises(CertificateError, match="client certificate expired on"):
        _tls.verify_client_cert(cert, [], "alice", None, now=later)
    earlier = datetime.datetime.now(UTC) - datetime.timedelta(hours=2)
    with pytest.raises(CertificateError, match="not valid yet"):
        _tls.verify_client_cert(cert, [], "alice", None, now=earlier)


def test_leaf_from_another_ca_refused() -> None:
    ca_pem, _ = _our_ca()
    other = trustme.CA(organization_unit_name="Other Unit")
    leaf = _tls.load_cert(other.issue_cert("alice").cert_chain_pems[0].bytes())
    with pytest.raises(CertificateError) as exc_info:
        _tls.verify_client_cert(leaf, [], "alice", ca_pem)
    message = str(exc_info.value)
    assert "client certificate is not signed by the coordinator's client CA" in message
    assert f"issuer: {leaf.issuer.rfc4514_string()}" in message
    assert "Other Unit" in message
    assert "client CA: CN=Team CA" in message


def test_forged_issuer_name_refused() -> None:
    real = _Issuer("Team CA")
    impostor = _Issuer("Team CA")  # same name, different key
    with pytest.raises(CertificateError, match="signature does not verify with that CA's key"):
        _tls.verify_client_cert(_leaf(impostor), [], "alice", real.pem)


def test_self_signed_refused_when_client_ca_required() -> None:
    ca_pem, _ = _our_ca()
    for cert_pem in [certs.self_signed_cert(["alice"])[0], _tls.ephemeral_identity("alice")[0]]:
        with pytest.raises(
            CertificateError,
            match=re.escape(
                "coordinator requires a certificate signed by its client CA; a self-signed "
                "certificate was presented (client CA: CN=Team CA)"
            ),
        ):
            _tls.verify_client_cert(_tls.load_cert(cert_pem), [], "alice", ca_pem)


def test_missing_intermediate_refused() -> None:
    root = _Issuer("Root CA")
    mid = _Issuer("Mid CA", issuer=root)
    with pytest.raises(CertificateError, match=r"issuer: CN=Mid CA; client CA: CN=Root CA"):
        _tls.verify_client_cert(_leaf(mid), [], "alice", root.pem)


def test_chain_to_another_root_refused() -> None:
    root, other_root = _Issuer("Root CA"), _Issuer("Other Root")
    mid = _Issuer("Mid CA", issuer=other_root)
    with pytest.raises(CertificateError) as exc_info:
        _tls.verify_client_cert(_leaf(mid), [mid.cert], "alice", root.pem)
    message = str(exc_info.value)
    assert "its chain ends at CN=Mid CA (issuer: CN=Other Root; client CA: CN=Root CA)" in message


def test_intermediate_that_is_not_a_ca_refused() -> None:
    root = _Issuer("Root CA")
    not_a_ca = _Issuer("Just A Leaf", ca=False, issuer=root)
    with pytest.raises(
        CertificateError,
        match="intermediate certificate CN=Just A Leaf signed a certificate but is not a CA",
    ):
        _tls.verify_client_cert(_leaf(not_a_ca), [not_a_ca.cert], "alice", root.pem)


def test_leaf_from_our_issue_cert_cannot_sign_others() -> None:
    # Someone holding an ordinary client cert must not mint certs for other ids with it.
    ca_pem, ca_key_pem = _our_ca()
    bob_pem, bob_key_pem = certs.issue_cert(ca_pem, ca_key_pem, ["bob"])
    bob = _Issuer.__new__(_Issuer)
    bob.cert = _tls.load_cert(bob_pem)
    key = _tls.load_private_key(bob_key_pem)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    bob.key = key
    with pytest.raises(CertificateError, match="CN=bob signed a certificate but is not a CA"):
        _tls.verify_client_cert(_leaf(bob), [bob.cert], "alice", ca_pem)


def test_expired_intermediate_refused() -> None:
    root = _Issuer("Root CA")
    mid = _Issuer("Mid CA", issuer=root)
    mid.cert = _build(
        "Mid CA",
        mid.key,
        signer=root,
        ca=True,
        not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC),
    )
    with pytest.raises(
        CertificateError,
        match="intermediate certificate CN=Mid CA expired on 2021-01-01 00:00:00 UTC",
    ):
        _tls.verify_client_cert(_leaf(mid), [mid.cert], "alice", root.pem)


def test_expired_client_ca_refused() -> None:
    root = _Issuer("Root CA")
    root.cert = _build(
        "Root CA",
        root.key,
        signer=None,
        ca=True,
        not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC),
    )
    with pytest.raises(
        CertificateError,
        match="the coordinator's client CA CN=Root CA expired on 2021-01-01 00:00:00 UTC",
    ):
        _tls.verify_client_cert(_leaf(root), [], "alice", root.pem)


# --- full path validation (RFC 5280) ----------------------------------------------------------


def _eku(*usages: ObjectIdentifier, critical: bool = False) -> tuple[x509.ExtensionType, bool]:
    return x509.ExtendedKeyUsage(list(usages)), critical


def _key_usage(*, cert_sign: bool) -> tuple[x509.ExtensionType, bool]:
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
    return usage, True


def test_row09_chain_breaking_path_len_0_refused() -> None:
    root = _Issuer("Root CA")
    mid = _Issuer("Mid CA", issuer=root, path_length=0)  # may sign leaves, not CAs
    below = _Issuer("Below Mid", issuer=mid)
    _tls.verify_client_cert(_leaf(mid), [mid.cert], "alice", root.pem)  # within the limit
    with pytest.raises(CertificateError, match="path validation: path length constraint"):
        _tls.verify_client_cert(_leaf(below), [mid.cert, below.cert], "alice", root.pem)


def test_row09_leaf_with_ca_true_refused() -> None:
    root = _Issuer("Root CA")
    with pytest.raises(CertificateError, match=r"basicConstraints.cA must not be asserted"):
        _tls.verify_client_cert(_leaf(root, ca=True), [], "alice", root.pem)


@pytest.mark.parametrize(
    ("usages", "named"),
    [
        ([ExtendedKeyUsageOID.SERVER_AUTH], "serverAuth"),
        ([ExtendedKeyUsageOID.CODE_SIGNING], "codeSigning"),
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], "anyExtendedKeyUsage"),
        ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION], "serverAuth, e"),
    ],
)
def test_row09_leaf_without_client_auth_among_its_ekus_refused(
    usages: list[ObjectIdentifier], named: str
) -> None:
    root = _Issuer("Root CA")
    leaf = _leaf(root, extra=[_eku(*usages)])
    with pytest.raises(
        CertificateError, match=f"extendedKeyUsage lists {named}.*not clientAuth.*CN=alice"
    ):
        _tls.verify_client_cert(leaf, [], "alice", root.pem)


@pytest.mark.parametrize("critical", [False, True])
def test_leaf_with_client_auth_eku_accepted(critical: bool) -> None:
    root = _Issuer("Root CA")
    usages = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    leaf = _leaf(root, extra=[_eku(*usages, critical=critical)])
    _tls.verify_client_cert(leaf, [], "alice", root.pem)


def test_row09_ca_name_constraints_enforced() -> None:
    root = _Issuer("Root CA")
    team = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("team.example")], excluded_subtrees=None
    )
    mid = _Issuer("Team CA", issuer=root, extra=[(team, True)])
    _tls.verify_client_cert(
        _leaf(mid, "alice.team.example"), [mid.cert], "alice.team.example", root.pem
    )
    with pytest.raises(CertificateError, match=r"path validation: .*name constraints"):
        _tls.verify_client_cert(_leaf(mid), [mid.cert], "alice", root.pem)


def test_row09_unknown_critical_extension_refused() -> None:
    root = _Issuer("Root CA")
    unknown = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    with pytest.raises(CertificateError, match=r"1\.3\.6\.1\.4\.1\.55555\.1: .*critical extension"):
        _tls.verify_client_cert(_leaf(root, extra=[(unknown, True)]), [], "alice", root.pem)
    _tls.verify_client_cert(_leaf(root, extra=[(unknown, False)]), [], "alice", root.pem)


def test_ca_whose_key_usage_forbids_signing_certificates_refused() -> None:
    root = _Issuer("Root CA", extra=[_key_usage(cert_sign=False)])
    with pytest.raises(CertificateError, match="keyUsage lacks keyCertSign"):
        _tls.verify_client_cert(_leaf(root), [], "alice", root.pem)
    signing = _Issuer("Signing CA", extra=[_key_usage(cert_sign=True)])
    _tls.verify_client_cert(_leaf(signing), [], "alice", signing.pem)


def test_client_certificate_with_unparseable_extensions_is_a_certificate_error() -> None:
    root = _Issuer("Root CA")
    garbage = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03ab")
    now = datetime.datetime.now(UTC)
    cert = _build(
        "alice",
        ec.generate_private_key(ec.SECP256R1()),
        signer=root,
        not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(hours=1),
        extra=[(garbage, False)],
    )
    cert = _tls.load_cert(_tls.cert_der(cert))  # extensions are parsed on first use
    for client_ca in (None, root.pem):
        with pytest.raises(CertificateError, match="extensions could not be parsed"):
            _tls.verify_client_cert(cert, [], "alice", client_ca)


def test_unparseable_client_ca_is_a_certificate_error() -> None:
    cert_pem, _ = certs.self_signed_cert(["alice"])
    with pytest.raises(CertificateError, match="could not parse PEM certificates"):
        _tls.verify_client_cert(_tls.load_cert(cert_pem), [], "alice", b"not a pem")


def test_row01_client_certificate_over_16_kib_is_refused() -> None:
    # The coordinator hands a client's certificate to peers in channel offers.
    names = ["alice"] + [f"n{i}.{'x' * 50}.example" for i in range(300)]
    cert = _leaf(None, "alice", san=names)
    assert len(_tls.cert_der(cert)) > _tls.MAX_CLIENT_CERT_SIZE
    with pytest.raises(CertificateError, match=r"client certificate is \d+ bytes; at most 16384"):
        _tls.verify_client_cert(cert, [], "alice", None)
    assert _tls.MAX_CLIENT_CERT_SIZE <= control.MAX_CERT_SIZE  # what a ChannelOffer may carry


# --- pinning ---------------------------------------------------------------------------------


def test_pinning_accepts_exactly_the_vouched_cert() -> None:
    cert = _tls.load_cert(certs.self_signed_cert(["bob"])[0])
    _tls.verify_pinned(cert, _tls.cert_der(cert), "bob")


def test_pinning_refuses_any_other_cert_even_for_the_same_name() -> None:
    vouched = _tls.load_cert(certs.self_signed_cert(["bob"])[0])
    impostor = _tls.load_cert(certs.self_signed_cert(["bob"])[0])
    with pytest.raises(
        CertificateError,
        match=re.escape(
            "peer 'bob' presented a certificate other than the one the coordinator vouched for"
        ),
    ):
        _tls.verify_pinned(impostor, _tls.cert_der(vouched), "bob")


# --- loading ---------------------------------------------------------------------------------


def test_load_cert_pem_and_der() -> None:
    cert_pem, key_pem = certs.self_signed_cert(["alice"])
    cert = _tls.load_cert(cert_pem)
    assert _tls.load_cert(_tls.cert_der(cert)) == cert
    assert _tls.load_cert_chain_pem(cert_pem + cert_pem) == [cert, cert]
    key = _tls.load_private_key(key_pem)
    der_key = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert _tls.load_private_key(der_key).public_key() == cert.public_key()


def test_load_errors_are_certificate_errors() -> None:
    with pytest.raises(CertificateError, match="could not parse certificate"):
        _tls.load_cert(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match="could not parse certificate"):
        _tls.load_cert(b"\x30\x03garbage")
    with pytest.raises(CertificateError, match="could not parse PEM certificates"):
        _tls.load_cert_chain_pem(b"")
    with pytest.raises(CertificateError, match="could not load private key"):
        _tls.load_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
