"""Connection setup: what the faster paths must keep exactly as it was.

- The coordinator's certificate is checked by ``_tls.verify_server_certificate`` (a kept
  trust store) instead of aioquic's ``verify_certificate``: same outcome, same alert, same
  message, for every case.
- A client without a certificate makes its identity during the handshake; whichever comes
  first (the client itself, or the server's request for it), the coordinator sees it.
- PADDING is skipped in one step: the frames after it are still read.
- A direct peer's streams reach the application only once its certificate matched the one
  the coordinator vouched for, although the connection may be up before that check.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import ClientFactory, wait_for

import conec_trio
from conec_trio import ChannelError, _quic, _tls, certs
from conec_trio._wire import control

DEADLINE = 10.0
UTC = datetime.UTC


# --- the coordinator's certificate: the same verdicts as aioquic's own check -----------------


def _self_signed(
    names: list[str],
    *,
    days: tuple[float, float] = (-1, 30),
    ca: bool = True,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, cert.public_bytes(serialization.Encoding.PEM)


def _cases() -> list[tuple[str, x509.Certificate, list[x509.Certificate], str | None, bytes]]:
    good, good_pem = _self_signed(["coord.example", "other.example"])
    _, other_pem = _self_signed(["coord.example"])
    expired, expired_pem = _self_signed(["coord.example"], days=(-30, -1))
    future, future_pem = _self_signed(["coord.example"], days=(1, 30))
    ca_pem, ca_key_pem = certs.make_ca("Setup CA")
    leaf_pem, _ = certs.issue_cert(ca_pem, ca_key_pem, ["coord.example", "127.0.0.1"])
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    return [
        ("trusted", good, [], "coord.example", good_pem),
        ("second name", good, [], "other.example", good_pem),
        ("no name to check", good, [], None, good_pem),
        ("wrong name", good, [], "elsewhere.example", good_pem),
        ("untrusted", good, [], "coord.example", other_pem),
        ("expired", expired, [], "coord.example", expired_pem),
        ("not yet valid", future, [], "coord.example", future_pem),
        ("issued by the CA", leaf, [], "coord.example", ca_pem),
        ("issued by the CA, by IP", leaf, [], "127.0.0.1", ca_pem),
        ("issued by the CA, wrong IP", leaf, [], "127.0.0.2", ca_pem),
        ("issued by the CA, not trusted", leaf, [], "coord.example", other_pem),
        ("CA bundle", leaf, [], "coord.example", other_pem + ca_pem),
    ]


# The alert the handshake answers each kind of our refusal with (_quic's TLS context).
_ALERTS = {"expired": "AlertCertificateExpired", "bad certificate": "AlertBadCertificate"}


def _outcome(check: Any, *args: Any) -> tuple[str, str] | None:
    try:
        check(*args)
    except tls.Alert as exc:
        return type(exc).__name__, str(exc)
    except _tls.ServerCertificateError as exc:
        return _ALERTS[exc.kind], str(exc)
    return None


@pytest.mark.parametrize("case", range(len(_cases())))
def test_server_certificate_check_gives_aioquics_verdict(case: int) -> None:
    name, cert, chain, server_name, cadata = _cases()[case]
    theirs = _outcome(
        lambda: tls.verify_certificate(
            certificate=cert, chain=chain, server_name=server_name, cadata=cadata
        )
    )
    ours = _outcome(_tls.verify_server_certificate, cert, chain, server_name, cadata, None, None)
    assert ours == theirs, name
    # and again, now from the kept store
    assert (
        _outcome(_tls.verify_server_certificate, cert, chain, server_name, cadata, None, None)
        == theirs
    ), name


async def test_a_coordinator_cert_from_another_ca_is_still_refused(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    other_ca, _ = certs.self_signed_cert(["127.0.0.1"])
    with trio.fail_after(DEADLINE), pytest.raises(conec_trio.CertificateError):
        async with open_client(coord, "alice", ca=other_ca):
            pass  # pragma: no cover


def _coordinator_identity_with_a_bad_san() -> tuple[x509.Certificate, bytes, bytes]:
    """A coordinator cert whose subjectAltName has an IP address written as a DNS name,
    which service_identity cannot parse as a pattern; (cert, cert_pem, key_pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert, cert_pem = _self_signed(["127.0.0.1"], key=key)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, cert_pem, key_pem


def test_row16_unparseable_coordinator_san_is_a_bad_certificate() -> None:
    cert, cert_pem, _ = _coordinator_identity_with_a_bad_san()
    with pytest.raises(_tls.ServerCertificateError) as info:
        _tls.verify_server_certificate(cert, [], "127.0.0.1", cert_pem, None, None)
    assert info.value.kind == "bad certificate"
    assert "names cannot be checked against '127.0.0.1'" in str(info.value)
    assert "Invalid DNS pattern" in str(info.value)


async def test_row16_client_reports_an_unparseable_coordinator_san_as_a_certificate_problem(
    client_config: Callable[..., conec_trio.ClientConfig],
) -> None:
    # The check raised from inside its own error path, and the client said "no answer ...
    # within 10 s" at once.
    _, cert_pem, key_pem = _coordinator_identity_with_a_bad_san()
    config = conec_trio.CoordConfig(
        cert_chain=cert_pem, private_key=key_pem, host="127.0.0.1", port=0
    )
    async with conec_trio.open_coordinator(config) as coord:
        with trio.fail_after(DEADLINE), pytest.raises(conec_trio.CertificateError) as info:
            async with conec_trio.open_client(client_config(coord, "alice", ca=cert_pem)):
                pass  # pragma: no cover
    assert "names cannot be checked against '127.0.0.1'" in str(info.value)


# --- the client's identity, made during the handshake -----------------------------------------


def _handshake(identity: Any, *, make_first: bool) -> tuple[Any, Any]:
    """An in-memory handshake of a client-role FlowControlledConnection without certificate
    against a server asking for one; the server's view of the client certificate."""
    server_cert, server_key = certs.self_signed_cert(["coord.example"])
    client_config = QuicConfiguration(is_client=True, server_name="coord.example")
    client_config.cadata = server_cert
    client = _quic.FlowControlledConnection(
        configuration=client_config,
        request_client_certificate=False,
        stream_window=1 << 20,
        connection_window=1 << 20,
        max_streams=100,
        identity=identity,
    )
    server_config = QuicConfiguration(is_client=False)
    server_config.certificate = x509.load_pem_x509_certificate(server_cert)
    server_config.private_key = _tls.load_private_key(server_key)
    server = _quic.FlowControlledConnection(
        configuration=server_config,
        original_destination_connection_id=client._peer_cid.cid,
        request_client_certificate=True,
        stream_window=1 << 20,
        connection_window=1 << 20,
        max_streams=100,
    )
    client.connect(("10.0.0.2", 4433), now=time.monotonic())
    if make_first:
        identity()
    for _ in range(4):
        for sender, receiver, addr in ((client, server, "10.0.0.1"), (server, client, "10.0.0.2")):
            for data, _ in sender.datagrams_to_send(time.monotonic()):
                receiver.receive_datagram(data, (addr, 4433), time.monotonic())
    return client, server


class _Identity:
    """Makes an ephemeral identity on its first call, like ``Client._identity``."""

    def __init__(self) -> None:
        self.made: list[tuple[x509.Certificate, list[x509.Certificate], Any]] = []

    def __call__(self) -> tuple[x509.Certificate, list[x509.Certificate], Any]:
        if not self.made:
            cert, key = _tls.ephemeral_identity_objects("alice")
            self.made.append((cert, [], key))
        return self.made[0]


@pytest.mark.parametrize("make_first", [True, False], ids=["client-first", "server-asks"])
def test_identity_made_during_the_handshake_reaches_the_server(make_first: bool) -> None:
    identity = _Identity()
    client, server = _handshake(identity, make_first=make_first)
    made = identity.made
    assert client._handshake_complete
    assert server._handshake_complete
    assert len(made) == 1
    seen = server.peer_certificate
    assert seen is not None
    assert _tls.cert_der(seen) == _tls.cert_der(made[0][0])


def test_client_offers_one_key_share_and_the_handshake_takes_it() -> None:
    client, server = _handshake(_Identity(), make_first=False)
    assert client.tls._supported_groups == [tls.Group.SECP256R1]
    assert server._handshake_complete


async def test_ephemeral_client_registers_with_its_certificate(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice:
        cert = alice._certificate
        assert cert is not None
        assert _tls.cert_names(cert) == {"alice"}
        assert coord._clients["alice"].cert_der == _tls.cert_der(cert)


# --- PADDING -----------------------------------------------------------------------------------


def _skip_padding(data: bytes, start: int) -> int:
    conn = QuicConnection.__new__(_quic.FlowControlledConnection)
    conn._quic_logger = None
    buf = Buffer(data=data)
    buf.seek(start)
    _quic.FlowControlledConnection._handle_padding_frame(conn, None, 0, buf)  # type: ignore[arg-type]
    return int(buf.tell())


def test_padding_is_skipped_up_to_the_next_frame() -> None:
    assert _skip_padding(b"\x00" * 16_000 + b"\x01\x00", 1) == 16_000
    assert _skip_padding(b"\x00\x06abc", 1) == 1
    assert _skip_padding(b"\x00" * 40, 1) == 40


# --- direct channels: nothing before the pin check ------------------------------------------


def _another_cert_der(name: str) -> bytes:
    pem, _ = _tls.ephemeral_identity(name)
    return _tls.cert_der(_tls.load_cert(pem))


async def test_opener_takes_no_stream_before_the_peers_certificate_is_checked(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    """alice's connection to bob is up, but she has not checked his certificate yet; bob,
    whose side is up, opens a stream at once. Her grant (tampered) names another certificate
    for bob: alice must refuse the connection, and bob's stream must never reach her
    application."""
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        fake = _another_cert_der("bob")
        request = alice._request
        spoke = trio.Event()

        async def bob_speaks_first() -> None:
            await wait_for(lambda: "alice" in bob._direct.channels, DEADLINE)
            send, _ = await bob.new_direct_stream("alice")
            await send.send(b"before the pin check")
            spoke.set()

        async def tampered(make: Any) -> Any:
            reply = await request(make)
            if isinstance(reply, control.ChannelGrant):
                reply = dataclasses.replace(reply, cert_der=fake)
            return reply

        handshake = alice._direct._await_handshake

        async def check_after_bob_spoke(conn: Any, winner: Any, done: Any, consent: Any) -> None:
            await conn.settled.wait()
            with trio.fail_after(DEADLINE):
                await spoke.wait()
            await handshake(conn, winner, done, consent)

        alice._direct._await_handshake = check_after_bob_spoke  # type: ignore[method-assign]
        alice._direct.ctx = dataclasses.replace(alice._direct.ctx, request=tampered)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob_speaks_first)
            with trio.fail_after(DEADLINE), pytest.raises(ChannelError, match="certificate"):
                await alice.new_channel("bob")
        await trio.testing.wait_all_tasks_blocked()
        assert alice._incoming_send.statistics().current_buffer_used == 0
        assert not alice._direct.channels


async def test_the_dial_made_while_the_request_is_out_goes_to_the_granted_address(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    """An opener makes its dial's first flight while the grant is on its way, before it
    knows where to send it (the grant is held back here until it has): the channel opens on
    that very connection, at the address the grant gave."""
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        request = alice._direct.ctx.request
        prepared: list[Any] = []

        async def grant_once_prepared(make: Any) -> Any:
            reply = await request(make)
            expected = alice._direct._expected["bob"]
            await wait_for(lambda: expected.prepared is not None, 10.0)
            assert expected.prepared is not None
            prepared.append(expected.prepared._quic)
            return reply

        alice._direct.ctx = dataclasses.replace(alice._direct.ctx, request=grant_once_prepared)
        with trio.fail_after(10.0):
            await alice.new_channel("bob")
            conn = alice._direct.channels["bob"].conn
            assert conn.quic is prepared[0]
            assert bob._socket is not None
            assert conn.peer_address[1] == bob._socket.local_address[1]
            send, _ = await alice.new_direct_stream("bob")
            incoming = await bob.incoming_streams.receive()
            await send.send(b"direct")
            assert await incoming.recv.receive() == b"direct"
