"""What a user sees when something goes wrong: one test per row of the usability review
(each says what was seen before, and checks what is seen now)."""

from __future__ import annotations

import logging
import pydoc
import re
import socket
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import trio
from test_cli import READY, cli_process

import conec_trio
from conec_trio import ConfigError, certs
from conec_trio.cli import main
from conec_trio.forward.addresses import Mapping, Target, check_local_ports, parse_coord
from conec_trio.forward.console import say, setup_logging
from conec_trio.forward.forward import Forwarder
from conec_trio.forward.link import CoordinatorLink, unreachable_udp
from conec_trio.forward.protocol import encode_request, parse_reply
from conec_trio.forward.splice import SpliceResult, _gone, summary

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def clean_logging() -> Iterator[None]:
    """Leave the root logger and aioquic's loggers as they were."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    quic = logging.getLogger("quic")
    quic_level = quic.level
    yield
    root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    quic.setLevel(quic_level)


def free_udp_port() -> int:
    """A UDP port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Row: aioquic's own "Error: 298, reason: ..." lines beside ours.
async def test_row_aioquic_logs_stay_below_warning_unless_configured(
    clean_logging: None, conec_coordinator_config: conec_trio.CoordConfig
) -> None:
    quic = logging.getLogger("quic")
    quic.setLevel(logging.NOTSET)
    async with conec_trio.open_coordinator(conec_coordinator_config):
        assert not quic.isEnabledFor(logging.WARNING)
    quic.setLevel(logging.DEBUG)  # the user's choice stands
    async with conec_trio.open_coordinator(conec_coordinator_config):
        assert quic.level == logging.DEBUG


# Row: --key not matching --cert gave "TLS handshake failed: alert" at connect time.
def test_row_key_not_matching_cert_is_caught_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, _ = certs.self_signed_cert(["localhost"])
    _, other_key = certs.self_signed_cert(["localhost"])
    with pytest.raises(ConfigError, match="key does not match certificate") as info:
        conec_trio.CoordConfig(cert_chain=cert, private_key=other_key)
    assert info.value.setting == "private_key"
    with pytest.raises(ConfigError, match="key does not match certificate"):
        conec_trio.ClientConfig(id="me", cert_chain=cert, private_key=other_key)
    certs.save_pair(cert, other_key, tmp_path / "c.pem", tmp_path / "c.key")
    argv = ["--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "c.key")]
    assert main(["coord", "--port", "0", *argv]) == 1
    assert "--key: key does not match certificate" in capsys.readouterr().err
    assert main(["forward", "0:exp:127.0.0.1:80", "--id", "me", "--coord", "x", *argv]) == 1
    assert "--key: key does not match certificate" in capsys.readouterr().err


# Row: forward printed "forwarding ..." before it was connected; a wrong port was silent.
async def test_row_wrong_coordinator_port_is_reported_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_udp_port()
    with trio.fail_after(2):
        assert await unreachable_udp("127.0.0.1", port) == f"127.0.0.1:{port}"
    config = conec_trio.ClientConfig(id="fwd", coord_host="127.0.0.1", coord_port=port)
    link = CoordinatorLink(config, lambda session, incoming: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        # Well before the 5 s connect timeout the forwarder used to wait out.
        with trio.fail_after(3):
            while "ICMP port unreachable" not in (out := capsys.readouterr().out):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert re.search(
        STAMP + rf"cannot connect to the coordinator at 127\.0\.0\.1:{port}: nothing listens", out
    ), out


async def test_row_forward_says_it_waits_then_connected(
    conec_coordinator: conec_trio.Coordinator,
    conec_coordinator_identity: tuple[bytes, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = conec_trio.ClientConfig(
        id="fwd",
        coord_host="127.0.0.1",
        coord_port=conec_coordinator.address[1],
        ca=conec_coordinator_identity[0],
    )
    forwarder = Forwarder(config, [Mapping(0, "exp", Target("127.0.0.1", 9))])
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(forwarder.run)
        assert forwarder.link.current is None  # listening, not yet connected
        with trio.fail_after(10):
            while "connected to the coordinator" not in capsys.readouterr().out:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert bound[0][1] > 0


# Row: hints named library settings ('ca' setting, 'coord_host'), not the flags.
async def test_row_certificate_hint_names_the_flags(
    conec_coordinator: conec_trio.Coordinator,
) -> None:
    wrong_ca, _ = certs.self_signed_cert(["localhost"])
    config = conec_trio.ClientConfig(
        id="me", coord_host="127.0.0.1", coord_port=conec_coordinator.address[1], ca=wrong_ca
    )
    with pytest.raises(conec_trio.CertificateError) as info:
        async with conec_trio.open_client(config):
            pass  # pragma: no cover
    assert "--ca" in str(info.value)


# Row: status lines on stdout without timestamps, logs on stderr with them.
def test_row_status_lines_and_logs_share_one_timestamped_stream(
    clean_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger().handlers.clear()
    setup_logging(0)
    say("ready on 127.0.0.1:1719")
    logging.getLogger("conec_trio.test").warning("something to see")
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert re.fullmatch(STAMP + "ready on 127.0.0.1:1719", lines[0])
    assert re.fullmatch(STAMP + "WARNING conec_trio.test: something to see", lines[1])


# Row: the coordinator logged "refusing client None: ...".
async def test_row_coordinator_names_the_refused_client(
    conec_coordinator: conec_trio.Coordinator,
    conec_client: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="conec_trio.coordinator")
    await conec_client("twin")  # type: ignore[operator]
    with pytest.raises(conec_trio.IdInUseError):
        await conec_client("twin")  # type: ignore[operator]
    refusals = [r.getMessage() for r in caplog.records if "refusing client" in r.getMessage()]
    assert refusals, caplog.text
    assert all("None" not in m for m in refusals)
    assert re.match(r"refusing client 'twin' \(127\.0\.0\.1:\d+\): ", refusals[0])


# Row: "'me' ended the stream without an answer" when the peer runs forward.
async def test_row_a_forwarder_says_it_is_not_running_expose(
    conec_coordinator: conec_trio.Coordinator,
    conec_coordinator_identity: tuple[bytes, bytes],
    conec_client: object,
) -> None:
    config = conec_trio.ClientConfig(
        id="me",
        coord_host="127.0.0.1",
        coord_port=conec_coordinator.address[1],
        ca=conec_coordinator_identity[0],
    )
    forwarder = Forwarder(config, [])
    other = await conec_client("other")  # type: ignore[operator]
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        with trio.fail_after(10):
            while forwarder.link.current is None:
                await trio.sleep(0.02)
            send, recv = await other.new_proxied_stream("me")
            await send.send(encode_request(Target("127.0.0.1", 80)))
            answer = parse_reply(await recv.receive())
        nursery.cancel_scope.cancel()
    assert answer == "'me' is not running expose (it runs forward)"


# Row: plain coord bound '::' with a certificate for localhost only, and said nothing.
async def test_row_coord_warns_that_remote_clients_cannot_verify(tmp_path: Path) -> None:
    async with cli_process("coord", "--port", "0", cwd=tmp_path) as (_, out):
        await out.wait_for(READY)
    text = "\n".join(out.lines)
    assert "clients on other machines cannot verify it" in text
    assert "--host NAME" in text
    assert "or --cert" in text


# Row: --coord localhost refused for lacking a port; the same local port twice gave
# "Address already in use".
def test_row_coord_port_defaults_and_a_port_given_twice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse_coord("localhost") == Target("localhost", 1719)
    assert parse_coord("[::1]") == Target("::1", 1719)
    assert parse_coord("example.org:9999") == Target("example.org", 9999)
    with pytest.raises(ValueError, match="port 9000 given twice"):
        check_local_ports([Mapping(9000, "a", Target("h", 1)), Mapping(9000, "b", Target("h", 2))])
    args = ["forward", "9000:a:h:1", "9000:b:h:2", "--id", "me", "--coord", "localhost"]
    assert main(args) == 1
    assert "port 9000 given twice" in capsys.readouterr().err


# Row: a clean close logged as "broken (... Transport endpoint is not connected)".
def test_row_a_clean_close_is_logged_as_closed() -> None:
    gone = trio.BrokenResourceError()
    gone.__cause__ = OSError(107, "Transport endpoint is not connected")
    assert _gone(gone)
    reset = trio.BrokenResourceError()
    reset.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert not _gone(reset)
    assert summary(SpliceResult(sent=4, received=4), 0.1).startswith("closed")


# Row: help(ClientConfig) showed one line; the README named only ConecError; a missing
# 'ca' file raised a bare FileNotFoundError at open_client.
@pytest.mark.parametrize("cls", [conec_trio.ClientConfig, conec_trio.CoordConfig])
def test_row_every_config_field_is_documented(cls: type) -> None:
    shown = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    for field in fields(cls):
        assert re.search(rf"^[\s|]+{field.name}: \S", shown, re.M), f"{field.name} not in help()"


def test_row_readme_lists_every_exception_class() -> None:
    readme = README.read_text()
    for name in conec_trio.__all__:
        obj = getattr(conec_trio, name)
        if isinstance(obj, type) and issubclass(obj, conec_trio.ConecError):
            assert f"`{name}`" in readme, name


def test_row_a_missing_file_fails_when_the_config_is_built(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    for setting in ("ca", "client_ca"):
        with pytest.raises(ConfigError, match=rf"^{setting}: cannot read .*nope\.pem") as info:
            conec_trio.ClientConfig(id="me", **{setting: missing})
        assert info.value.setting == setting
    cert, key = certs.self_signed_cert(["localhost"])
    with pytest.raises(ConfigError, match=r"^cert_chain: cannot read"):
        conec_trio.CoordConfig(cert_chain=missing, private_key=key)
    with pytest.raises(ConfigError, match=r"^private_key: cannot read"):
        conec_trio.CoordConfig(cert_chain=cert, private_key=missing)
    with pytest.raises(ConfigError, match=r"^cert_chain: cert_chain and private_key go together"):
        conec_trio.ClientConfig(id="me", private_key=key)
    assert isinstance(ConfigError("ca", "x"), conec_trio.ConecError)
