"""Client authentication, end to end over real sockets (the API contract's "Auth" part).

By default a client's certificate must be valid for its id; with ``CoordConfig.client_ca`` it
must also chain to that CA. Every refusal reaches ``open_client`` as a ``CertificateError``
whose message says which check failed, and the coordinator keeps serving everyone else.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers import ClientFactory

import conec_trio
from conec_trio import certs

CoordConfigFactory = Callable[..., conec_trio.CoordConfig]
ClientConfigFactory = Callable[..., conec_trio.ClientConfig]
UTC = datetime.UTC


# --- helpers -------------------------------------------------------------------------------


def leaf_pems(ca: trustme.CA, name: str) -> tuple[bytes, bytes]:
    """``(cert_chain_pem, key_pem)`` of a trustme leaf for ``name`` (with any intermediates)."""
    leaf = ca.issue_cert(name)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return chain, leaf.private_key_pem.bytes()


def expired_leaf(ca: trustme.CA, name: str) -> tuple[bytes, bytes]:
    """A cert for ``name`` signed by ``ca`` whose validity ended yesterday."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def refused(config: conec_trio.ClientConfig) -> str:
    """``open_client(config)`` raises CertificateError itself, promptly; its message."""
    body_ran = False
    with trio.fail_after(5):
        with pytest.raises(conec_trio.CertificateError) as excinfo:
            async with conec_trio.open_client(config):
                body_ran = True
    assert not body_ran
    assert type(excinfo.value) is conec_trio.CertificateError
    return str(excinfo.value)


async def roundtrip(coord: conec_trio.Coordinator, client: conec_trio.Client) -> None:
    with trio.fail_after(5):
        send, recv = await client.new_proxied_stream(None)
        await send.send(b"who am I?")
        incoming = await coord.incoming_streams.receive()
        assert incoming.peer == client.id
        assert await incoming.recv.receive() == b"who am I?"
        await incoming.send.send(incoming.peer.encode())
        assert await recv.receive() == client.id.encode()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def ca_coord(
    coord_config: CoordConfigFactory, client_ca: trustme.CA
) -> AsyncIterator[conec_trio.Coordinator]:
    """A coordinator that admits only clients with a cert from ``client_ca``."""
    async with conec_trio.open_coordinator(coord_config(client_ca=client_ca.cert_pem.bytes())) as c:
        yield c


def server_only_leaf(ca_pem: bytes, ca_key_pem: bytes, name: str) -> tuple[bytes, bytes]:
    """A leaf for ``name`` signed by the CA whose only extendedKeyUsage is serverAuth."""
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- with a client CA --------------------------------------------------------------------------


async def test_ca_signed_cert_gets_in_under_its_name(
    ca_coord: conec_trio.Coordinator, open_client: ClientFactory, client_ca: trustme.CA
) -> None:
    cert, key = leaf_pems(client_ca, "alice")
    async with open_client(ca_coord, "alice", cert_chain=cert, private_key=key) as alice:
        assert ca_coord.client_ids() == ["alice"]
        await roundtrip(ca_coord, alice)


async def test_row10_one_cert_for_alice_gets_in_once_whatever_the_case(
    ca_coord: conec_trio.Coordinator,
    client_config: ClientConfigFactory,
    open_client: ClientFactory,
    client_ca: trustme.CA,
) -> None:
    # Names in certificates match case-insensitively, so ids must be one id whatever the case:
    # alice's certificate under "ALICE" is alice again (the newer connection replaces the
    # older, as a reconnect does), never a second client beside her.
    cert, key = leaf_pems(client_ca, "alice")
    async with open_client(
        ca_coord, "alice", cert_chain=cert, private_key=key, reconnect=False
    ) as first:
        config = client_config(ca_coord, "ALICE", cert_chain=cert, private_key=key)
        async with conec_trio.open_client(config) as again:
            assert again.id == "alice"
            assert ca_coord.client_ids() == ["alice"]
            with trio.fail_after(5), pytest.raises(conec_trio.IdInUseError, match="replaced"):
                await first.wait_connected()
            # Another certificate for alice, under yet another case, is someone else.
            other_cert, other_key = leaf_pems(client_ca, "alice")
            other = client_config(ca_coord, "Alice", cert_chain=other_cert, private_key=other_key)
            with trio.fail_after(5), pytest.raises(conec_trio.IdInUseError):
                async with conec_trio.open_client(other):
                    pass  # pragma: no cover
            assert ca_coord.client_ids() == ["alice"]
            assert again.connected


async def test_cert_from_an_intermediate_ca_gets_in(
    ca_coord: conec_trio.Coordinator, open_client: ClientFactory, client_ca: trustme.CA
) -> None:
    # The client sends the intermediate along with its leaf; the coordinator knows the root.
    cert, key = leaf_pems(client_ca.create_child_ca(), "alice")
    async with open_client(ca_coord, "alice", cert_chain=cert, private_key=key) as alice:
        assert ca_coord.client_ids() == ["alice"]
        await roundtrip(ca_coord, alice)


async def test_ca_signed_cert_for_another_name_is_refused_naming_both(
    ca_coord: conec_trio.Coordinator,
    client_config: ClientConfigFactory,
    open_client: ClientFactory,
    client_ca: trustme.CA,
) -> None:
    cert, key = leaf_pems(client_ca, "alice")
    message = await refused(client_config(ca_coord, "bob", cert_chain=cert, private_key=key))
    assert "'alice'" in message
    assert "'bob'" in message
    assert ca_coord.num_clients == 0
    # The same cert under its own name is fine right after.
    async with open_client(ca_coord, "alice", cert_chain=cert, private_key=key):
        assert ca_coord.client_ids() == ["alice"]


async def test_self_signed_client_is_told_a_ca_signed_cert_is_required(
    ca_coord: conec_trio.Coordinator, client_config: ClientConfigFactory
) -> None:
    # No cert given: the client's default ephemeral self-signed one.
    message = await refused(client_config(ca_coord, "alice"))
    assert "self-signed" in message
    assert "client CA" in message, message
    assert ca_coord.num_clients == 0


async def test_cert_from_another_ca_is_refused(
    ca_coord: conec_trio.Coordinator, client_config: ClientConfigFactory
) -> None:
    cert, key = leaf_pems(trustme.CA(), "alice")
    message = await refused(client_config(ca_coord, "alice", cert_chain=cert, private_key=key))
    assert "not signed by the coordinator's client CA" in message, message
    assert ca_coord.num_clients == 0


async def test_expired_cert_is_refused(
    ca_coord: conec_trio.Coordinator, client_config: ClientConfigFactory, client_ca: trustme.CA
) -> None:
    cert, key = expired_leaf(client_ca, "alice")
    message = await refused(client_config(ca_coord, "alice", cert_chain=cert, private_key=key))
    assert "expired" in message
    assert ca_coord.num_clients == 0


async def test_refusals_leave_the_coordinator_serving_others(
    ca_coord: conec_trio.Coordinator,
    client_config: ClientConfigFactory,
    open_client: ClientFactory,
    client_ca: trustme.CA,
) -> None:
    good_cert, good_key = leaf_pems(client_ca, "alice")
    stranger_cert, stranger_key = leaf_pems(trustme.CA(), "mallory")
    async with open_client(ca_coord, "alice", cert_chain=good_cert, private_key=good_key) as alice:
        await refused(client_config(ca_coord, "mallory"))
        await refused(
            client_config(ca_coord, "mallory", cert_chain=stranger_cert, private_key=stranger_key)
        )
        # Posing as alice with alice's name in a cert from another CA does not work either,
        # and alice stays.
        fake_cert, fake_key = leaf_pems(trustme.CA(), "alice")
        await refused(client_config(ca_coord, "alice", cert_chain=fake_cert, private_key=fake_key))
        assert ca_coord.client_ids() == ["alice"]
        await roundtrip(ca_coord, alice)


# --- default mode: any cert valid for the client's id -------------------------------------------


async def test_own_self_signed_cert_for_another_name_is_refused(
    coord: conec_trio.Coordinator, client_config: ClientConfigFactory
) -> None:
    cert, key = certs.self_signed_cert(["carol"])
    message = await refused(client_config(coord, "dave", cert_chain=cert, private_key=key))
    assert "'carol'" in message
    assert "'dave'" in message
    assert coord.num_clients == 0


async def test_own_self_signed_cert_for_its_id_gets_in(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    cert, key = certs.self_signed_cert(["carol"])
    async with open_client(coord, "carol", cert_chain=cert, private_key=key) as carol:
        await roundtrip(coord, carol)


async def test_default_ephemeral_cert_gets_in(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "erin") as erin:
        assert coord.client_ids() == ["erin"]
        await roundtrip(coord, erin)


# --- certificates and keys given as file paths --------------------------------------------------


@pytest.mark.parametrize("as_type", [str, Path], ids=["str", "pathlib"])
async def test_client_cert_and_key_as_paths(
    coord: conec_trio.Coordinator,
    open_client: ClientFactory,
    coord_identity: tuple[bytes, bytes],
    tmp_path: Path,
    as_type: Callable[[Path], Any],
) -> None:
    cert, key = certs.self_signed_cert(["carol"])
    (tmp_path / "carol.pem").write_bytes(cert)
    (tmp_path / "carol.key").write_bytes(key)
    (tmp_path / "coord-ca.pem").write_bytes(coord_identity[0])
    async with open_client(
        coord,
        "carol",
        cert_chain=as_type(tmp_path / "carol.pem"),
        private_key=as_type(tmp_path / "carol.key"),
        ca=as_type(tmp_path / "coord-ca.pem"),
    ) as carol:
        await roundtrip(coord, carol)


@pytest.mark.parametrize("as_type", [str, Path], ids=["str", "pathlib"])
async def test_coordinator_cert_key_and_client_ca_as_paths(
    open_client: ClientFactory,
    client_ca: trustme.CA,
    tmp_path: Path,
    as_type: Callable[[Path], Any],
) -> None:
    server_ca = trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")
    server.private_key_pem.write_to_path(str(tmp_path / "coord.key"))
    chain = b"".join(blob.bytes() for blob in server.cert_chain_pems)
    (tmp_path / "coord.pem").write_bytes(chain)
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    server_ca.cert_pem.write_to_path(str(tmp_path / "server-ca.pem"))
    config = conec_trio.CoordConfig(
        cert_chain=as_type(tmp_path / "coord.pem"),
        private_key=as_type(tmp_path / "coord.key"),
        client_ca=as_type(tmp_path / "client-ca.pem"),
        host="127.0.0.1",
        port=0,
    )
    cert, key = leaf_pems(client_ca, "alice")
    async with (
        conec_trio.open_coordinator(config) as coord,
        open_client(
            coord,
            "alice",
            cert_chain=cert,
            private_key=key,
            ca=as_type(tmp_path / "server-ca.pem"),
        ) as alice,
    ):
        await roundtrip(coord, alice)
        # The client CA read from the file is enforced.
        with trio.fail_after(5), pytest.raises(conec_trio.CertificateError, match="self-signed"):
            async with open_client(coord, "bob", ca=as_type(tmp_path / "server-ca.pem")):
                pass


# --- direct channels between clients that set client_ca ------------------------------------


async def test_row09_direct_peer_whose_cert_is_for_servers_only_is_refused(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    # The coordinator takes any cert valid for the id; bob, with a client CA, checks his
    # peers' certs with the same path validation as a coordinator with that CA.
    ca_pem, ca_key_pem = certs.make_ca("Team CA")
    cert, key = server_only_leaf(ca_pem, ca_key_pem, "mallory")
    async with (
        open_client(coord, "bob", client_ca=ca_pem) as bob,
        open_client(coord, "mallory", cert_chain=cert, private_key=key) as mallory,
    ):
        with trio.fail_after(10):
            with pytest.raises(conec_trio.ChannelError, match="lists serverAuth, not clientAuth"):
                await mallory.new_channel("bob")
            with pytest.raises(conec_trio.ChannelError, match="lists serverAuth, not clientAuth"):
                await bob.new_channel("mallory")
