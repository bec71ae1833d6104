"""``conec-trio status`` and the query it is built on (``Client.list_broadcasts``)."""

from __future__ import annotations

import sys
from pathlib import Path

import trio
from helpers import ClientFactory

import conec_trio

CLI = [sys.executable, "-m", "conec_trio"]


async def test_list_broadcasts_names_the_channels_alive_now(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice") as alice:
        assert await alice.list_broadcasts() == frozenset()
        send, recv = await alice.new_broadcast("news")
        await alice.new_broadcast("weather")
        assert await alice.list_broadcasts() == {"news", "weather"}
        await send.aclose()
        await recv.aclose()
        with trio.fail_after(5):
            while await alice.list_broadcasts() != {"weather"}:
                await trio.sleep(0.01)


async def test_status_prints_the_coordinators_view(
    coord: conec_trio.Coordinator,
    open_client: ClientFactory,
    coord_identity: tuple[bytes, bytes],
    tmp_path: Path,
) -> None:
    ca = tmp_path / "coord.pem"
    ca.write_bytes(coord_identity[0])
    async with open_client(coord, "alice") as alice, open_client(coord, "bob") as bob:
        await alice.new_broadcast("news")
        _send, recv = await bob.new_broadcast("news")
        await recv.aclose()  # bob only sends
        with trio.fail_after(30):
            result = await trio.run_process(
                [*CLI, "status", "--coord", f"127.0.0.1:{coord.address[1]}", "--ca", str(ca)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        out = result.stdout.decode()
        assert result.returncode == 0, out + result.stderr.decode()
        lines = out.splitlines()
        assert lines[0].startswith(
            f"coordinator 127.0.0.1:{coord.address[1]} sees this machine at 127.0.0.1:"
        )
        assert lines[1].startswith("3 client(s): alice, bob, status-")
        assert lines[1].endswith("(this status query)")
        assert lines[2] == "1 broadcast channel(s):"
        assert lines[3] == "  news: senders alice, bob; receivers alice"


async def test_status_says_why_it_cannot_connect(tmp_path: Path) -> None:
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with trio.fail_after(30):
        result = await trio.run_process(
            [*CLI, "status", "--coord", f"127.0.0.1:{port}"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr.decode()
