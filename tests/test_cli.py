"""The ``conec-trio`` command line: ``demo``, ``coord`` and ``certs``.

``demo`` and ``coord`` run as real subprocesses (``python -m conec_trio``), as a user or a
script would run them; every wait on them has a deadline, and a process still running when a
test ends is killed.
"""

from __future__ import annotations

import ast
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import wait_for

import conec_trio
from conec_trio import _tls, certs
from conec_trio.cli import main

# Every status line starts with a timestamp, "2025-01-31 12:00:00.123 ".
STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
CLI = [sys.executable, "-m", "conec_trio"]
READY = re.compile(STAMP + r"ready on (?P<host>\S+):(?P<port>\d+)$")
CA_LINE = re.compile(STAMP + r"clients pass --ca (?P<path>.+)$")
# Deadline of each wait on a subprocess (start-up included: imports take a moment).
WAIT = 15.0


class Output:
    """The lines a subprocess prints, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.lines: list[str] = []

    async def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The first line (not seen before) matching ``pattern``."""
        with trio.fail_after(WAIT):
            while True:
                while b"\n" in self._buffer:
                    raw, self._buffer = self._buffer.split(b"\n", 1)
                    line = raw.decode()
                    self.lines.append(line)
                    match = pattern.match(line)
                    if match:
                        return match
                chunk = await self._stream.receive_some()
                if not chunk:
                    raise AssertionError(
                        f"the process ended its output without a line matching {pattern.pattern!r}"
                        f"; it printed: {self.lines}"
                    )
                self._buffer += chunk

    async def rest(self) -> list[str]:
        """Every line until the process closes its output."""
        with trio.fail_after(WAIT):
            while chunk := await self._stream.receive_some():
                self._buffer += chunk
        self.lines.extend(self._buffer.decode().splitlines())
        self._buffer = b""
        return self.lines


@asynccontextmanager
async def cli_process(*args: str, cwd: Path) -> AsyncIterator[tuple[trio.Process, Output]]:
    """Run ``conec-trio ARGS`` (stderr merged into stdout); killed if still running at the end."""
    proc = await trio.lowlevel.open_process(
        [*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert proc.stdout is not None
        yield proc, Output(proc.stdout)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


async def wait_exit(proc: trio.Process) -> int:
    with trio.fail_after(WAIT):
        return await proc.wait()


# --- demo ------------------------------------------------------------------------------------


async def test_demo_quick_reports_every_step_and_exits_0(tmp_path: Path) -> None:
    with trio.fail_after(60):
        result = await trio.run_process(
            [*CLI, "demo", "--quick"],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    for expected in [
        "coord.num_clients = 3",
        "alice -> bob b'hello bob', reply b'hi alice'",
        "alice -> coordinator b'ping', reply b'pong'",
        "alice -> alice b'note to self', reply b'noted'",
        "channel alice <-> carol opened in",
        "over a direct stream",
        "MB/s",
        "msgs/s",
        "Lagged(count=990), then #990..#999",
        "alice -> bob -> alice, unchanged",
        "broadcast_count = (3, 3), coord.num_broadcasts = 1",
        "demo finished in",
    ]:
        assert expected in out, f"{expected!r} missing from the demo's report:\n{out}"
    # At the end, the path each pair of peers used: the direct one with its address.
    paths = out[out.index("\npaths:\n") :]
    assert re.search(r"alice -> carol\s+direct, to 127\.0\.0\.1:\d+$", paths, re.M), paths
    assert re.search(r"alice -> bob\s+relayed by the coordinator", paths), paths
    # A throwaway certificate: the demo leaves nothing behind.
    assert list(await trio.Path(tmp_path).iterdir()) == []


# --- coord -----------------------------------------------------------------------------------


async def test_coord_serves_clients_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    async with cli_process("coord", "--host", "127.0.0.1", "--port", "0", cwd=tmp_path) as (
        proc,
        out,
    ):
        ca_path = Path((await out.wait_for(CA_LINE))["path"])
        ready = await out.wait_for(READY)
        assert ready["host"] == "127.0.0.1"
        port = int(ready["port"])
        assert port != 0
        # Without --cert, the certificate lives in ./conec-coord/ of the working directory.
        assert ca_path == (tmp_path / "conec-coord" / "coord.pem").resolve()

        config = conec_trio.ClientConfig(
            id="alice", coord_host="127.0.0.1", coord_port=port, ca=ca_path
        )
        async with conec_trio.open_client(config) as alice:
            with trio.fail_after(10):
                send, _ = await alice.new_proxied_stream("alice")
                await send.send(b"through the coordinator")
                incoming = await alice.incoming_streams.receive()
                assert await incoming.recv.receive() == b"through the coordinator"

            proc.send_signal(signal.SIGINT)
            assert await wait_exit(proc) == 0
            # The coordinator said goodbye on its way out: the client learns at once (and
            # tries to reconnect).
            await wait_for(lambda: not alice.connected, timeout=5)
        lines = await out.rest()
    assert any(
        re.fullmatch(STAMP + r"coordinator stopped \(SIGINT; 1 client\(s\) disconnected\)", line)
        for line in lines
    ), lines
    assert not any("Traceback" in line for line in lines), lines


async def test_coord_keeps_its_certificate_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = ("coord", "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state))
    async with cli_process(*args, cwd=tmp_path) as (proc, out):
        first_ca = Path((await out.wait_for(CA_LINE))["path"])
        await out.wait_for(READY)
        proc.send_signal(signal.SIGTERM)  # what a service manager sends: a clean stop too
        assert await wait_exit(proc) == 0
    assert first_ca == (state / "coord.pem").resolve()
    first_pem = await trio.Path(first_ca).read_bytes()
    assert (state / "coord.key").stat().st_mode & 0o777 == 0o600

    async with cli_process(*args, cwd=tmp_path) as (proc, out):
        assert Path((await out.wait_for(CA_LINE))["path"]) == first_ca
        port = int((await out.wait_for(READY))["port"])
        assert any("kept from an earlier run" in line for line in out.lines), out.lines
        # A client that trusted the first run's certificate gets in after the restart.
        config = conec_trio.ClientConfig(
            id="bob", coord_host="127.0.0.1", coord_port=port, ca=first_pem
        )
        async with conec_trio.open_client(config) as bob:
            assert bob.id == "bob"
        proc.send_signal(signal.SIGINT)
        assert await wait_exit(proc) == 0
    assert await trio.Path(first_ca).read_bytes() == first_pem


def test_coord_refuses_cert_without_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coord", "--port", "0", "--cert", str(tmp_path / "c.pem")]) == 1
    assert "--cert and --key go together" in capsys.readouterr().err


# --- certs -----------------------------------------------------------------------------------


def test_certs_ca_and_issue_make_certs_the_coordinator_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["certs", "ca", str(ca_dir)]) == 0
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    assert (ca_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600

    assert main(["certs", "issue", "--ca", str(ca_dir), "alice", str(tmp_path / "alice")]) == 0
    alice_cert = _tls.load_cert((tmp_path / "alice.pem").read_bytes())
    assert (tmp_path / "alice.key").stat().st_mode & 0o777 == 0o600
    _tls.verify_client_cert(alice_cert, [], "alice", ca_pem)
    # Only for that name, and only with that CA.
    with pytest.raises(conec_trio.CertificateError, match="not for client id 'bob'"):
        _tls.verify_client_cert(alice_cert, [], "bob", ca_pem)
    other_ca, _ = certs.make_ca()
    with pytest.raises(conec_trio.CertificateError):
        _tls.verify_client_cert(alice_cert, [], "alice", other_ca)

    # OUT ending in .pem names the certificate file itself; --alt-name adds names.
    out = tmp_path / "coord.pem"
    assert (
        main(["certs", "issue", "--ca", str(ca_dir), "localhost", str(out), "--alt-name", "::1"])
        == 0
    )
    assert _tls.cert_names(_tls.load_cert(out.read_bytes())) == {"localhost", "::1"}
    assert (tmp_path / "coord.key").is_file()
    capsys.readouterr()


def test_certs_never_replace_a_ca_or_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["certs", "ca", str(ca_dir)]) == 0
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    assert main(["certs", "ca", str(ca_dir)]) == 1
    assert "refusing to replace a CA" in capsys.readouterr().err
    assert (ca_dir / "ca.pem").read_bytes() == ca_pem

    issue = ["certs", "issue", "--ca", str(ca_dir), "alice", str(tmp_path / "alice")]
    assert main(issue) == 0
    key = (tmp_path / "alice.key").read_bytes()
    assert main(issue) == 1
    assert "use --force" in capsys.readouterr().err
    assert (tmp_path / "alice.key").read_bytes() == key
    assert main([*issue, "--force"]) == 0
    assert (tmp_path / "alice.key").read_bytes() != key

    assert main(["certs", "issue", "--ca", str(tmp_path / "nope"), "x", str(tmp_path / "x")]) == 1
    assert "is not a CA directory" in capsys.readouterr().err


async def test_issued_certs_work_end_to_end_with_a_client_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["certs", "ca", str(ca_dir)]) == 0
    issue = ["certs", "issue", "--ca", str(ca_dir)]
    assert main([*issue, "127.0.0.1", str(tmp_path / "coord")]) == 0
    assert main([*issue, "alice", str(tmp_path / "alice")]) == 0
    capsys.readouterr()
    coord_config = conec_trio.CoordConfig(
        cert_chain=tmp_path / "coord.pem",
        private_key=tmp_path / "coord.key",
        host="127.0.0.1",
        port=0,
        client_ca=ca_dir / "ca.pem",
    )
    async with conec_trio.open_coordinator(coord_config) as coord:

        def client(client_id: str, **kw: Any) -> conec_trio.ClientConfig:
            return conec_trio.ClientConfig(
                id=client_id,
                coord_host="127.0.0.1",
                coord_port=coord.address[1],
                ca=ca_dir / "ca.pem",
                **kw,
            )

        with trio.fail_after(10):
            alice_config = client(
                "alice", cert_chain=tmp_path / "alice.pem", private_key=tmp_path / "alice.key"
            )
            async with conec_trio.open_client(alice_config):
                assert coord.num_clients == 1
            # A self-signed client certificate is not signed by the client CA: refused.
            with pytest.raises(conec_trio.CertificateError):
                async with conec_trio.open_client(client("mallory")):
                    pass  # pragma: no cover


# --- what a coordinator started by the command line must serve ------------------------------


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_client_reaches_coordinator_over_ipv6(
    coord_config: Callable[..., conec_trio.CoordConfig],
    coord_identity: tuple[bytes, bytes],
) -> None:
    # `conec-trio coord` binds '::' by default; clients told '::1' must get in. (The client
    # once dialled ('::1', port) while replies came from ('::1', port, 0, 0), and aioquic took
    # them for another network path: no handshake ever completed over IPv6.)
    async with conec_trio.open_coordinator(coord_config(host="::")) as coord:
        config = conec_trio.ClientConfig(
            id="alice",
            coord_host="::1",
            coord_port=coord.address[1],
            ca=coord_identity[0],
            connect_timeout=1.0,
        )
        with trio.fail_after(5):
            async with conec_trio.open_client(config):
                assert coord.num_clients == 1


async def test_silent_coordinator_is_a_connect_error_not_a_version_mismatch() -> None:
    # A coordinator that is not running (or a wrong port) must read as such. aioquic ends a
    # silent attempt with its idle timeout, transport code 0x1, which the client once took for
    # the application code of a version mismatch.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # takes datagrams, never answers
        config = conec_trio.ClientConfig(
            id="alice",
            coord_host="127.0.0.1",
            coord_port=silent.getsockname()[1],
            idle_timeout=0.3,
            connect_timeout=5.0,
        )
        with trio.fail_after(5), pytest.raises(conec_trio.ConnectError, match="no answer"):
            async with conec_trio.open_client(config):
                pass  # pragma: no cover


# --- what the programs build on ----------------------------------------------------------------


def _private_imports(path: Path) -> list[str]:
    """The private modules of conec_trio (or private names from it) that ``path`` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names if alias.name.startswith("conec_trio")]
            found += [m for m in modules if any(p.startswith("_") for p in m.split("."))]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            module = node.module or ""
            if node.level == 0 and not module.startswith("conec_trio"):
                continue  # another package
            names = [alias.name for alias in node.names if alias.name != "__version__"]
            parts = module.split(".") + names if module else names
            found += [f"{'.' * node.level}{module} {p}" for p in parts if p.startswith("_")]
    return found


def test_the_command_line_uses_only_the_public_api() -> None:
    package = Path(conec_trio.__file__).parent / "cli"
    sources = sorted(package.glob("*.py"))
    assert len(sources) >= 5
    assert {path.name: _private_imports(path) for path in sources} == {
        path.name: [] for path in sources
    }


def test_the_stream_end_types_and_the_certs_helpers_are_public() -> None:
    assert {"MessageSendChannel", "MessageReceiveChannel"} <= set(conec_trio.__all__)
    assert conec_trio.MessageSendChannel.abort.__doc__
    defined_here = {
        name
        for name, value in vars(certs).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == certs.__name__
    }
    assert defined_here <= set(certs.__all__)
    assert all(hasattr(certs, name) for name in certs.__all__)
