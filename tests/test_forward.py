"""TCP port forwarding: ``conec-trio forward`` and ``conec-trio expose``, end to end.

Everything runs as real programs (subprocesses), as a user runs them: the coordinator, the
expose and forward sides, ``python -m http.server``, a TCP echo server; the test process only
plays the TCP clients (urllib, plain sockets, in threads). Every wait has a deadline, and every
program still running at the end of a test is killed (see ``forward_helpers``).

In the restart tests the clients use a 2 s idle timeout, so that a killed coordinator or peer
is noticed quickly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from forward_helpers import (
    CONNECTED,
    STAMP,
    WAIT,
    Program,
    Programs,
    ResetServer,
    download_sha256,
    echo_exchange,
    forwarded_ports,
    free_port,
    poll_until,
    read_all,
    reset_close,
    rss_bytes,
    try_echo,
)

from conec_trio import certs
from conec_trio.forward import Backoff, parse_host_port, parse_mapping

T = TypeVar("T")

FILE_SIZE = 50_000_000
# How long the tunnel may take to work again after a restart: loss detection (2 s idle
# timeout), the reconnect backoff (at most 5 s), and a direct channel's set-up.
RECOVERY = 25.0
LOST_NOW = re.compile(STAMP + r"lost the coordinator; reconnecting", re.M)
RECONNECTED = re.compile(STAMP + r"reconnected to the coordinator at ", re.M)
DIRECT_OPEN = re.compile(r"direct channel to 'exp' open via ")


async def blocking(fn: Callable[..., T], *args: Any, within: float = WAIT) -> T:
    """Run a blocking helper in a thread, with a deadline."""
    with trio.fail_after(within):
        return await trio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)


async def wait_until_echo_works(port: int, within: float = RECOVERY) -> None:
    """Poll: a new TCP connection through ``port`` echoes (the tunnel is up end to end)."""
    with trio.fail_after(within):
        while True:
            if await trio.to_thread.run_sync(try_echo, port, abandon_on_cancel=True):
                return
            await trio.sleep(0.1)


def closed_without_data(port: int, timeout: float = 5.0) -> float:
    """Connect, send nothing, and expect the tunnel to close the connection without data.

    Returns how long that took.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        try:
            data = s.recv(1)
        except ConnectionResetError:
            data = b""
    assert data == b"", f"expected the connection closed without data, got {data!r}"
    return time.monotonic() - started


# --- unit: the parts a user types ------------------------------------------------------------


def test_mappings_and_targets_parse_as_documented() -> None:
    m = parse_mapping("8080:web-server:127.0.0.1:80")
    assert (m.local_port, m.peer, m.target.host, m.target.port) == (
        8080,
        "web-server",
        "127.0.0.1",
        80,
    )
    v6 = parse_mapping("0:srv:[::1]:22")
    assert (v6.local_port, v6.target.host, v6.target.port) == (0, "::1", 22)
    assert parse_host_port("LocalHost:5432").key == parse_host_port("localhost:5432").key
    for bad in ["8080:srv:80", "x:srv:h:1", "8080:bad_id:h:1", "8080:srv:h:0", "8080:srv:h:99999",
                "70000:srv:h:1", "8080:srv:::1:22"]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_mapping(bad)


def test_backoff_doubles_to_its_maximum_with_jitter_and_resets() -> None:
    import random

    backoff = Backoff(0.2, 5.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    bases = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0]
    for delay, base in zip(delays, bases, strict=True):
        assert base / 2 <= delay <= base
    assert len(set(delays[5:])) > 1  # jitter: clients of a restarted coordinator spread out
    backoff.reset()
    assert backoff.next_delay() <= 0.2


def test_bad_command_lines_are_refused_before_connecting(tmp_path: Path) -> None:
    import subprocess
    import sys

    cli = [sys.executable, "-m", "conec_trio"]
    usage = subprocess.run(
        [*cli, "forward", "--id", "f", "--coord", "127.0.0.1:1", "8080:srv:nohostport"],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip
    assert usage.returncode == 2
    assert "LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT" in usage.stderr
    missing = subprocess.run(
        [*cli, "expose", "--id", "e", "--coord", "127.0.0.1:1", "--allow", "127.0.0.1:1",
         "--ca", str(tmp_path / "nope.pem")],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip
    assert missing.returncode == 1
    assert "--ca" in missing.stderr
    assert "nope.pem" in missing.stderr


# --- one tunnel shared by the happy-path tests ------------------------------------------------


@dataclass
class Tunnel:
    forward: Program
    expose: Program
    intruder: Program
    targets: dict[str, int]  # target name -> its port
    local: dict[str, int]  # target name -> where forward 'fwd' listens for it
    intruder_echo: int  # where forward 'intruder' listens for the echo server
    resets: ResetServer
    file_sha256: str


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnel]:
    """A coordinator; expose 'exp', for peer 'fwd' only, allowing the targets 'http', 'echo',
    'resets' and 'dead' (nothing listens there); forward 'fwd' with a mapping for each of
    them and for 'refused' (a target expose does not allow); forward 'intruder' (echo)."""
    work = tmp_path_factory.mktemp("tunnel")
    www = work / "www"
    www.mkdir()
    data = os.urandom(FILE_SIZE)
    (www / "big.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    del data
    resets = ResetServer()
    try:
        with Programs(work, idle_timeout=None) as programs:
            _, echo_port = programs.echo_server()
            _, http_port = programs.http_server(www)
            _, coord_port, ca = programs.coord()
            targets = {"http": http_port, "echo": echo_port, "resets": resets.port,
                       "dead": free_port(), "refused": free_port()}  # fmt: skip
            names = list(targets)
            allowed = [f"127.0.0.1:{targets[name]}" for name in names if name != "refused"]
            expose = programs.expose(coord_port, ca, allowed, peers=("fwd",))
            mappings = [f"0:exp:127.0.0.1:{targets[name]}" for name in names]
            forward = programs.forward(coord_port, ca, mappings)
            intruder = programs.forward(
                coord_port, ca, [f"0:exp:127.0.0.1:{echo_port}"], client_id="intruder",
                name="intruder",
            )  # fmt: skip
            local = dict(zip(names, forwarded_ports(forward, len(names)), strict=True))
            [intruder_echo] = forwarded_ports(intruder, 1)
            intruder.wait_line(CONNECTED)
            poll_until(lambda: try_echo(local["echo"]), RECOVERY, "an echo through the tunnel")
            yield Tunnel(forward, expose, intruder, targets, local, intruder_echo, resets, sha)
    finally:
        resets.close()


async def test_http_download_through_the_tunnel_is_intact(tunnel: Tunnel) -> None:
    url = f"http://127.0.0.1:{tunnel.local['http']}/big.bin"
    # new_stream gives a channel a head start of 0.3 s; on a loaded machine a first
    # connection may go through the coordinator while the channel opens: wait for it.
    await tunnel.forward.await_line(DIRECT_OPEN)
    mark = len(tunnel.forward.output())
    digest, size = await blocking(download_sha256, url, within=60)
    assert size == FILE_SIZE
    assert digest == tunnel.file_sha256
    # It went over a direct channel, and the forwarder said how much it moved.
    line = await tunnel.forward.await_line(
        re.compile(rf"-> 127\.0\.0\.1:{tunnel.targets['http']}: closed after .* received$", re.M),
        start=mark,
    )
    assert "50.0 MB received" in line.group(0)
    assert re.search(
        rf"-> 127\.0\.0\.1:{tunnel.targets['http']}: connected \(direct\)", tunnel.forward.output()
    )


async def test_the_path_to_a_peer_is_said_once_at_default_verbosity(tunnel: Tunnel) -> None:
    for _ in range(3):
        assert await blocking(try_echo, tunnel.local["echo"])
    # Status lines, not log records: they show without -v. Many connections, one line.
    direct = re.compile(STAMP + r"exp: direct via 127\.0\.0\.1:\d+$", re.M)
    assert len(direct.findall(tunnel.forward.output())) == 1
    assert "relayed" not in tunnel.forward.output()


async def test_a_peer_that_does_not_listen_is_relayed_and_forward_says_why(
    programs: Programs,
) -> None:
    _, echo_port = await blocking(programs.echo_server)
    _, coord_port, ca = await blocking(programs.coord)
    programs.expose(coord_port, ca, [f"127.0.0.1:{echo_port}"], extra=("--no-listen",))
    forward = programs.forward(coord_port, ca, [f"0:exp:127.0.0.1:{echo_port}"])
    [port] = await blocking(forwarded_ports, forward, 1)
    await wait_until_echo_works(port)
    for _ in range(2):
        assert await blocking(try_echo, port)
    relayed = re.compile(
        STAMP + r"exp: relayed through the coordinator: no direct path: "
        r"peer 'exp' does not accept direct channels \(it runs with listen=False\)$",
        re.M,
    )
    assert len(relayed.findall(forward.output())) == 1, forward.output()
    assert "exp: direct" not in forward.output()


async def test_half_close_passes_through_and_the_echo_keeps_flowing(tunnel: Tunnel) -> None:
    # The echo server half-closes only after it saw our EOF, and most of the echo flows after
    # our shutdown(SHUT_WR): a full echo and then EOF means both went through in order.
    payload = os.urandom(2_000_000)
    assert await blocking(echo_exchange, tunnel.local["echo"], payload) == payload


async def test_many_simultaneous_connections(tunnel: Tunnel) -> None:
    payloads = [os.urandom(100_000 + i) for i in range(24)]
    echoed: dict[int, bytes] = {}
    start = threading.Barrier(len(payloads), timeout=WAIT)

    def one(i: int) -> None:
        with socket.create_connection(("127.0.0.1", tunnel.local["echo"]), timeout=WAIT) as s:
            s.settimeout(WAIT)
            start.wait()  # all connected before any sends: really simultaneous
            s.sendall(payloads[i])
            s.shutdown(socket.SHUT_WR)
            echoed[i] = read_all(s)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(len(payloads)):
                nursery.start_soon(
                    functools.partial(trio.to_thread.run_sync, one, i, abandon_on_cancel=True)
                )
    assert [echoed[i] == payloads[i] for i in range(len(payloads))] == [True] * len(payloads)


async def test_a_target_expose_does_not_allow_is_refused_with_a_logged_reason(
    tunnel: Tunnel,
) -> None:
    await blocking(closed_without_data, tunnel.local["refused"])
    reason = f"refused by 'exp': target 127.0.0.1:{tunnel.targets['refused']} is not allowed"
    await tunnel.forward.await_line(re.compile(re.escape(reason)))


async def test_a_peer_expose_does_not_list_is_refused_with_a_logged_reason(
    tunnel: Tunnel,
) -> None:
    await blocking(closed_without_data, tunnel.intruder_echo)
    await tunnel.intruder.await_line(
        re.compile(re.escape("refused by 'exp': peer 'intruder' may not use this exposer"))
    )
    # The refused peer never reached the target.
    assert f"from intruder (direct) -> 127.0.0.1:{tunnel.targets['echo']}: connected" not in (
        tunnel.expose.output()
    )


async def test_a_target_that_cannot_be_reached_closes_the_client_with_a_logged_reason(
    tunnel: Tunnel,
) -> None:
    await blocking(closed_without_data, tunnel.local["dead"])
    reason = f"refused by 'exp': cannot connect to 127.0.0.1:{tunnel.targets['dead']}: "
    await tunnel.forward.await_line(re.compile(re.escape(reason) + ".*refused", re.I))


async def test_a_target_reset_reaches_the_client_as_a_reset(tunnel: Tunnel) -> None:
    """Even after the client half-closed (so nothing it sends can fail), a target that resets
    its connection must not look like a clean end to the client: that would pass a cut-off
    response for a complete one."""

    def client() -> str:
        with socket.create_connection(("127.0.0.1", tunnel.local["resets"]), timeout=WAIT) as s:
            s.settimeout(WAIT)
            s.sendall(b"reset-me\n")
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(1 << 16):
                    pass
            except ConnectionResetError:
                return "reset"
            return "eof"

    assert await blocking(client) == "reset"


async def test_a_client_reset_reaches_the_target_as_a_reset(tunnel: Tunnel) -> None:
    def client() -> None:
        with socket.create_connection(("127.0.0.1", tunnel.local["resets"]), timeout=WAIT) as s:
            s.settimeout(WAIT)
            s.sendall(b"watch\n")
            assert s.recv(3) == b"ok\n"
            reset_close(s)

    await blocking(client)
    assert await blocking(tunnel.resets.endings.get, True, WAIT) == "reset"


async def test_a_reader_that_stops_reading_holds_back_the_far_writer(tunnel: Tunnel) -> None:
    """Backpressure end to end: we send to the echo server through the tunnel and read
    nothing back. The echo server's writes block, so it stops reading, and the tunnel must
    stop taking our bytes, with bounded memory in forward and expose, then resume."""
    pids = {"forward": tunnel.forward.pid, "expose": tunnel.expose.pid}
    rss_before = {name: rss_bytes(pid) for name, pid in pids.items()}
    chunk = os.urandom(256 * 1024)

    def fill(s: socket.socket) -> int:
        """Send until a send stalls for a second; return how much was taken."""
        s.settimeout(1.0)
        sent = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                sent += s.send(chunk)
            except TimeoutError:
                return sent
        raise AssertionError(f"the tunnel took {sent:,} bytes without ever holding back")

    with socket.create_connection(("127.0.0.1", tunnel.local["echo"]), timeout=WAIT) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sent = await blocking(fill, s, within=40)
        rss_after = {name: rss_bytes(pid) for name, pid in pids.items()}
        # Kernel socket buffers on five sockets and the stream windows hold the rest.
        assert sent < 40_000_000
        for name in pids:
            grown = rss_after[name] - rss_before[name]
            assert grown < 16_000_000, f"{name} grew by {grown:,} bytes holding a stalled stream"

        # Reading again lets everything flow: the echo is intact and in order.
        def drain(n: int) -> bytes:
            s.settimeout(WAIT)
            got = bytearray()
            while len(got) < n:
                more = s.recv(1 << 20)
                assert more, "the connection ended early"
                got += more
            return bytes(got[:n])

        head = await blocking(drain, 3 * len(chunk))
        assert head == chunk * 3


# --- restarts and start order (PTTH's "sadder cases") ------------------------------------------


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[Programs]:
    with Programs(tmp_path) as p:
        yield p


@dataclass
class Setup:
    coord: Program
    coord_port: int
    ca: str
    echo_port: int
    expose: Program
    forward: Program
    port: int  # where forward listens for the echo server


async def start_tunnel(programs: Programs) -> Setup:
    """Echo server, coordinator, ``expose`` and ``forward``, once an echo goes through."""
    _, echo_port = await blocking(programs.echo_server)
    coord, coord_port, ca = await blocking(programs.coord)
    expose = programs.expose(coord_port, ca, [f"127.0.0.1:{echo_port}"])
    forward = programs.forward(coord_port, ca, [f"0:exp:127.0.0.1:{echo_port}"])
    [port] = await blocking(forwarded_ports, forward, 1)
    await wait_until_echo_works(port)
    return Setup(coord, coord_port, ca, echo_port, expose, forward, port)


async def stop(program: Program, how: str) -> None:
    """Ctrl-C (and check the clean exit), or SIGKILL."""
    if how == "ctrl-c":
        program.interrupt()
        assert await blocking(program.wait_exit) == 0
        assert f"{program.name} stopped (SIGINT)" in program.output()
    else:
        program.kill()


async def wait_refused(port: int, forward: Program, reason: str) -> None:
    """Poll until a new connection through ``port`` is refused for ``reason``, as logged by
    ``forward``."""
    pattern = re.compile(re.escape(reason))
    with trio.fail_after(RECOVERY):
        while True:
            mark = len(forward.output())
            await trio.to_thread.run_sync(try_echo, port, abandon_on_cancel=True)
            if pattern.search(forward.output(), mark):
                return
            await trio.sleep(0.1)


def _connection_ended(sock: socket.socket) -> bool:
    """True once the peer closed or reset the connection (reads b"" or fails)."""
    try:
        return sock.recv(100) == b""
    except OSError:
        return True


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_coordinator_restart(programs: Programs, how: str) -> None:
    setup = await start_tunnel(programs)
    forward, expose, port = setup.forward, setup.expose, setup.port
    # A connection carried over the direct channel does not need the coordinator: it goes
    # on while the coordinator is stopped or killed and restarted, and so do new ones.
    await forward.await_line(DIRECT_OPEN)
    early = await blocking(socket.create_connection, ("127.0.0.1", port), WAIT)
    try:
        early.settimeout(WAIT)
        early.sendall(b"before")
        assert await blocking(early.recv, 100) == b"before"
        # Direct from the start, or moved there once the channel is up.
        await forward.await_line(re.compile(STAMP + r"exp: direct via ", re.M), within=RECOVERY)

        mark_f, mark_e = len(forward.output()), len(expose.output())
        if how == "sigterm":
            setup.coord.proc.send_signal(signal.SIGTERM)
            setup.coord.proc.wait(WAIT)
        else:
            setup.coord.kill()
        await forward.await_line(LOST_NOW, start=mark_f, within=RECOVERY)
        await expose.await_line(LOST_NOW, start=mark_e, within=RECOVERY)
        early.sendall(b"during")
        assert await blocking(early.recv, 100) == b"during"
        await wait_until_echo_works(port)  # a new connection, over the open channel

        mark_f, mark_e = len(forward.output()), len(expose.output())
        await blocking(programs.coord, setup.coord_port, "coord2")  # same port, same cert
        await forward.await_line(RECONNECTED, start=mark_f, within=RECOVERY)
        await expose.await_line(RECONNECTED, start=mark_e, within=RECOVERY)
        early.sendall(b"after")
        assert await blocking(early.recv, 100) == b"after"
        await wait_until_echo_works(port)
        assert forward.alive()
        assert expose.alive()
    finally:
        early.close()


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
async def test_expose_restart(programs: Programs, how: str) -> None:
    setup = await start_tunnel(programs)
    await stop(setup.expose, how)
    # While it is away, connections are refused, and the forwarder says why.
    await wait_refused(setup.port, setup.forward, "peer 'exp' is not connected to the coordinator")
    programs.expose(setup.coord_port, setup.ca, [f"127.0.0.1:{setup.echo_port}"], name="expose2")
    await wait_until_echo_works(setup.port)
    assert setup.forward.alive()
    assert setup.coord.alive()


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
async def test_forward_restart(programs: Programs, how: str) -> None:
    setup = await start_tunnel(programs)
    await stop(setup.forward, how)
    # Stopping is no loss of the coordinator: nothing about reconnecting is said.
    assert "lost the coordinator" not in setup.forward.output()
    # The same mapping on the same local port, the same client id.
    mapping = f"{setup.port}:exp:127.0.0.1:{setup.echo_port}"
    programs.forward(setup.coord_port, setup.ca, [mapping], name="forward2")
    await wait_until_echo_works(setup.port)
    assert setup.expose.alive()
    assert setup.coord.alive()


async def test_expose_and_forward_started_before_the_coordinator(programs: Programs) -> None:
    # The coordinator's certificate exists already (as after an earlier run), so the clients
    # can be given --ca before it starts; it keeps these files.
    programs.state_dir.mkdir()
    cert, key = certs.self_signed_cert(["localhost", "127.0.0.1", "::1"])
    ca = programs.state_dir / "coord.pem"
    certs.save_pair(cert, key, ca, programs.state_dir / "coord.key")
    coord_port = free_port(socket.SOCK_DGRAM)
    _, echo_port = await blocking(programs.echo_server)
    expose = programs.expose(coord_port, str(ca), [f"127.0.0.1:{echo_port}"])
    forward = programs.forward(coord_port, str(ca), [f"0:exp:127.0.0.1:{echo_port}"])
    [port] = await blocking(forwarded_ports, forward, 1)

    # Listening, but no coordinator yet: connections are closed at once, with the reason.
    assert await blocking(closed_without_data, port) < 2.0
    await forward.await_line(re.compile(r"refused: not connected to the coordinator"))
    await expose.await_line(re.compile(r"cannot connect to the coordinator .* retrying in"))

    await blocking(programs.coord, coord_port)
    await wait_until_echo_works(port)
    assert expose.alive()
    assert forward.alive()
