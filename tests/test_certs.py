"""conec_trio.certs: the certificates it makes carry what TLS peers and our checks need."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import sys
from pathlib import Path
from typing import TypeVar

import pytest
import trustme
from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import AlertBadCertificate, verify_certificate
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conec_trio import _tls, certs

E = TypeVar("E", bound=x509.ExtensionType)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _ext(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


def test_make_ca_is_a_ca() -> None:
    cert_pem, key_pem = certs.make_ca("Example CA", days=30)
    cert = _tls.load_cert(cert_pem)
    key = _tls.load_private_key(key_pem)

    assert cert.subject.rfc4514_string() == "CN=Example CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)

    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=30, hours=1)


def test_make_ca_default_name_is_unique_to_each_ca() -> None:
    # Before: every CA was "conec-trio CA", so an error about a certificate's issuer could
    # only guess which CA it meant. Now each default name carries its own tag.
    names = [
        _tls.load_cert(certs.make_ca()[0]).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
        for _ in range(2)
    ]
    assert all(str(n.value).startswith("conec-trio CA ") for n in names)
    assert names[0].value != names[1].value


def test_issue_cert_leaf_for_dns_names_and_ip_literals() -> None:
    ca_pem, ca_key_pem = certs.make_ca()
    cert_pem, key_pem = certs.issue_cert(ca_pem, ca_key_pem, ["127.0.0.1", "localhost", "::1"])
    ca = _tls.load_cert(ca_pem)
    cert = _tls.load_cert(cert_pem)

    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert _tls.cert_names(cert) == {"127.0.0.1", "localhost", "::1"}

    cert.verify_directly_issued_by(ca)
    assert cert.issuer == ca.subject
    assert _tls.load_private_key(key_pem).public_key() == cert.public_key()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)

    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    assert _ext(cert, x509.KeyUsage).value.digital_signature
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca, x509.SubjectKeyIdentifier).value.digest


def test_issued_cert_passes_aioquic_server_verification() -> None:
    # What a client does with the coordinator's cert: chain to `ca` and match `coord_host`.
    ca_pem, ca_key_pem = certs.make_ca()
    cert = _tls.load_cert(certs.issue_cert(ca_pem, ca_key_pem, ["localhost", "127.0.0.1"])[0])
    for host in ["localhost", "127.0.0.1"]:
        verify_certificate(cert, server_name=host, cadata=ca_pem)
    with pytest.raises(AlertBadCertificate, match=r"hostname 'example\.com' doesn't match"):
        verify_certificate(cert, server_name="example.com", cadata=ca_pem)


def test_self_signed_cert_works_as_its_own_ca_for_aioquic() -> None:
    # `conec-trio coord` without --cert: clients pass the self-signed cert itself as `ca`.
    cert_pem, _ = certs.self_signed_cert(["localhost", "127.0.0.1", "::1"])
    cert = _tls.load_cert(cert_pem)
    for host in ["localhost", "127.0.0.1", "::1"]:
        verify_certificate(cert, server_name=host, cadata=cert_pem)


def test_self_signed_cert_starts_an_hour_ago() -> None:
    before = _now()
    cert_pem, key_pem = certs.self_signed_cert(["alice"], days=7)
    cert = _tls.load_cert(cert_pem)

    cert.verify_directly_issued_by(cert)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=alice"
    assert not _ext(cert, x509.BasicConstraints).value.ca
    assert _tls.cert_names(cert) == {"alice"}
    assert _tls.load_private_key(key_pem).public_key() == cert.public_key()
    skew = before - cert.not_valid_before_utc
    assert datetime.timedelta(minutes=59) <= skew <= datetime.timedelta(minutes=61)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(
        days=7, hours=1
    )


def test_issue_cert_never_outlives_its_ca() -> None:
    ca_pem, ca_key_pem = certs.make_ca(days=10)
    cert = _tls.load_cert(certs.issue_cert(ca_pem, ca_key_pem, ["alice"], days=825)[0])
    assert cert.not_valid_after_utc == _tls.load_cert(ca_pem).not_valid_after_utc


def test_long_name_goes_only_in_the_san() -> None:
    name = ".".join(["a" * 60, "b" * 60])
    cert = _tls.load_cert(certs.self_signed_cert([name])[0])
    assert cert.subject == x509.Name([])
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.critical  # RFC 5280: empty subject => critical subjectAltName
    assert _tls.cert_names(cert) == {name}


@pytest.mark.parametrize(
    "key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA], ids=["ecdsa", "rsa"]
)
def test_issue_cert_with_a_ca_made_elsewhere(key_type: trustme.KeyType) -> None:
    ca = trustme.CA(key_type=key_type)
    ca_pem = ca.cert_pem.bytes()
    cert_pem, _ = certs.issue_cert(ca_pem, ca.private_key_pem.bytes(), ["alice"])
    _tls.verify_client_cert(_tls.load_cert(cert_pem), [], "alice", ca_pem)


def test_issue_cert_refuses_bad_input() -> None:
    ca_pem, ca_key_pem = certs.make_ca()
    _, other_key_pem = certs.make_ca("Other CA")
    leaf_pem, leaf_key_pem = certs.issue_cert(ca_pem, ca_key_pem, ["leaf"])

    with pytest.raises(ValueError, match="at least one name"):
        certs.issue_cert(ca_pem, ca_key_pem, [])
    with pytest.raises(TypeError, match="not a single str"):
        certs.issue_cert(ca_pem, ca_key_pem, "alice")
    with pytest.raises(ValueError, match="days must be positive"):
        certs.issue_cert(ca_pem, ca_key_pem, ["alice"], days=0)
    with pytest.raises(ValueError, match="does not belong to the CA certificate"):
        certs.issue_cert(ca_pem, other_key_pem, ["alice"])
    with pytest.raises(ValueError, match="'CN=leaf' is not a CA"):
        certs.issue_cert(leaf_pem, leaf_key_pem, ["alice"])
    with pytest.raises(ValueError, match="at least one name"):
        certs.self_signed_cert([])
    with pytest.raises(ValueError, match="1 to 64 characters"):
        certs.make_ca("")


def test_issue_cert_refuses_an_expired_ca() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Old CA")])
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match=r"'CN=Old CA' expired on 2001-01-01 00:00:00 UTC"):
        certs.issue_cert(old.public_bytes(serialization.Encoding.PEM), key_pem, ["alice"])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_save_pair_key_readable_by_owner_only(tmp_path: Path) -> None:
    cert_pem, key_pem = certs.self_signed_cert(["alice"])
    cert_path, key_path = tmp_path / "alice.pem", tmp_path / "alice-key.pem"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)  # an existing, too-open key file is tightened too

    certs.save_pair(cert_pem, key_pem, cert_path, key_path)

    assert cert_path.read_bytes() == cert_pem
    assert key_path.read_bytes() == key_pem
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600

    # aioquic loads what was saved.
    config = QuicConfiguration(is_client=False)
    config.load_cert_chain(cert_path, key_path)
    assert config.certificate == _tls.load_cert(cert_pem)


def test_write_ca_and_load_ca(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    cert_path, key_path = certs.write_ca(directory, "Deploy CA")
    assert (cert_path.name, key_path.name) == (certs.CA_CERT_FILE, certs.CA_KEY_FILE)
    if sys.platform != "win32":
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600

    ca_pem, ca_key_pem = certs.load_ca(directory)
    assert _tls.load_cert(ca_pem).subject.rfc4514_string() == "CN=Deploy CA"
    cert_pem, _ = certs.issue_cert(ca_pem, ca_key_pem, ["alice"])
    _tls.verify_client_cert(_tls.load_cert(cert_pem), [], "alice", ca_pem)

    with pytest.raises(FileExistsError, match="refusing to replace a CA"):
        certs.write_ca(directory)
    assert certs.load_ca(directory) == (ca_pem, ca_key_pem)


def test_load_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="conec-trio certs ca DIR"):
        certs.load_ca(tmp_path)
