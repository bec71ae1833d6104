"""Hostile peers of ``conec-trio expose``, end to end: the programs run as subprocesses (see
``forward_helpers``), and the test process plays the attacking clients and the TCP users.

The attack: a forwarding request of under 180 bytes whose CBOR shared references make a value
with 2**27 leaves. Decoding it is quick; its repr is not, and an exposer that logged it before
checking who sent it spent all its CPU, then all its memory, on any client's request. The
exposer under attack runs with its address space limited, so that a regression fails the
test rather than the machine.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest
import trio
from forward_helpers import (
    CLI,
    WAIT,
    Program,
    Programs,
    cpu_seconds,
    echo_exchange,
    forwarded_ports,
    free_port,
    poll_until,
    try_echo,
)

import conec_trio
from conec_trio import certs

T = TypeVar("T")

EXPOSE_MEMORY_LIMIT = 1 << 30
# How long one answer of the exposer may take while it is under attack.
ANSWER_WITHIN = 5.0


def shared_reference_bomb(levels: int = 27) -> bytes:
    """``{"host": x}`` where x nests ``levels`` arrays ``[inner, inner]`` around ``[]``, each
    level written once and referred to by a CBOR shared reference (tags 28 and 29): a value
    with 2**levels leaves."""
    value = b"\xd8\x1c\x80"  # shareable([]): the innermost, shared as number ``levels``
    for index in range(levels, 0, -1):  # cbor2 numbers shareables from the outside in
        ref = b"\xd8\x1d" + (bytes([index]) if index < 24 else bytes([0x18, index]))
        value = b"\xd8\x1c\x82" + value + ref  # shareable([value, sharedref(index)])
    return b"\xa1\x64host" + value


BOMB = shared_reference_bomb()


def test_the_bomb_is_small_and_would_be_huge() -> None:
    assert len(BOMB) <= 177
    value = cbor2.loads(BOMB)["host"]
    depth = 0
    while value:
        assert value[0] is value[1]  # shared, not copied: 2**27 leaves in 28 lists
        value = value[0]
        depth += 1
    assert depth == 27


async def blocking(fn: Callable[..., T], *args: Any, within: float = WAIT) -> T:
    with trio.fail_after(within):
        return await trio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)


@dataclass
class Site:
    expose: Program
    forward: Program
    coord_port: int
    ca: Path
    local_echo: int  # where forward 'fwd' listens for the echo server

    def client(self, client_id: str) -> conec_trio.ClientConfig:
        return conec_trio.ClientConfig(
            id=client_id, coord_host="127.0.0.1", coord_port=self.coord_port, ca=self.ca
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A coordinator; expose 'exp' for the peers 'fwd' and 'insider', allowing an echo
    server, in limited memory; forward 'fwd' with a mapping to the echo server."""
    with Programs(tmp_path_factory.mktemp("hostile"), idle_timeout=None) as programs:
        _, echo_port = programs.echo_server()
        _, coord_port, ca = programs.coord()
        target = f"127.0.0.1:{echo_port}"
        expose = programs.expose(
            coord_port, ca, [target], peers=("fwd", "insider"), memory_limit=EXPOSE_MEMORY_LIMIT
        )
        forward = programs.forward(coord_port, ca, [f"0:exp:{target}"])
        [local_echo] = forwarded_ports(forward, 1)
        poll_until(lambda: try_echo(local_echo), WAIT, "an echo through the tunnel")
        yield Site(expose, forward, coord_port, Path(ca), local_echo)


@functools.cache
def _payload(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


async def echo_works(site: Site) -> None:
    payload = _payload(64 * 1024)
    assert await blocking(echo_exchange, site.local_echo, payload, within=ANSWER_WITHIN) == payload


async def ask(client: conec_trio.Client, request: bytes) -> Any:
    """Send ``request`` to 'exp' on a new stream: the answer, once the stream has ended."""
    send, recv = await client.new_proxied_stream("exp")
    try:
        with trio.fail_after(ANSWER_WITHIN):
            # The exposer may refuse (and stop reading) before the request arrives.
            with contextlib.suppress(trio.BrokenResourceError):
                await send.send(request)
            answer = cbor2.loads(await recv.receive())
            with pytest.raises(trio.EndOfChannel):  # and then the stream is closed
                await recv.receive()
    finally:
        await send.aclose()
        await recv.aclose()
    return answer


@pytest.fixture
async def intruder(site: Site) -> AsyncIterator[conec_trio.Client]:
    async with conec_trio.open_client(site.client("intruder")) as client:
        yield client


@pytest.fixture
async def insider(site: Site) -> AsyncIterator[conec_trio.Client]:
    async with conec_trio.open_client(site.client("insider")) as client:
        yield client


async def test_row04_an_unlisted_peer_is_refused_before_its_request_is_read_and_others_are_served(
    site: Site, intruder: conec_trio.Client
) -> None:
    cpu_before = cpu_seconds(site.expose.pid)
    attacks = 20
    answers: list[Any] = []

    async def attack() -> None:
        for _ in range(attacks):
            answers.append(await ask(intruder, BOMB))

    async def use_the_tunnel() -> None:
        for _ in range(10):
            await echo_works(site)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attack)
        nursery.start_soon(use_the_tunnel)
    refusal = {"ok": False, "reason": "peer 'intruder' may not use this exposer"}
    assert answers == [refusal] * attacks
    assert site.expose.check_alive()
    # The refusals cost next to nothing: a few milliseconds each at most.
    assert cpu_seconds(site.expose.pid) - cpu_before < 3.0
    await echo_works(site)


async def test_a_listed_peer_gets_a_clear_error_for_a_request_that_is_not_plain_cbor(
    site: Site, insider: conec_trio.Client
) -> None:
    cases = [
        (BOMB, "bad request: the request holds a CBOR tag"),
        (cbor2.dumps({"host": "x" * 5000, "port": 1}), "over the limit of 4096"),
        (b"\xa2\x64host\x7f\x61x\xff\x64port\x01", "indefinite-length"),  # a chunked string
        (b"\x81" * 50 + b"\x00", "nests CBOR containers more than"),
        (cbor2.dumps({"host": "127.0.0.1", "port": 1}) + b"\x00", "bytes after its CBOR value"),
    ]
    for request, reason in cases:
        answer = await ask(insider, request)
        assert answer["ok"] is False
        assert reason in answer["reason"], answer
    await echo_works(site)


async def test_every_log_line_about_peer_input_is_clipped(
    site: Site, insider: conec_trio.Client
) -> None:
    mark = len(site.expose.output())
    host = "h\x1b[2J" + "x" * 3000  # too long to be a host, and a terminal escape
    answer = await ask(insider, cbor2.dumps({"host": host, "port": 1}))
    assert answer == {
        "ok": False,
        "reason": "bad request: the request's 'host' is not a text of 1 to 255 characters",
    }
    # A target that is allowed nowhere, with a terminal escape in it, shown clipped.
    long_host = "\x1b]0;" + "y" * 250
    answer = await ask(insider, cbor2.dumps({"host": long_host, "port": 1}))
    assert "is not allowed" in answer["reason"]
    assert "\x1b" not in answer["reason"]
    refused = re.compile(r"from insider .*refused: .*$", re.M)
    await site.expose.await_line(re.compile(r"y{200}.*is not allowed"), start=mark)
    lines = refused.findall(site.expose.output(), mark)
    assert len(lines) >= 2
    for line in lines:
        assert len(line) < 1200, line
        assert "\x1b" not in line


# --- row 12: what --peer does not do without a client CA ------------------------------------


def expose_argv(coord_port: int, ca: Path, *options: str) -> list[str]:
    """``conec-trio expose`` at default verbosity (no -v), for a coordinator that is not
    there: it starts, says so and keeps retrying."""
    return [*CLI, "expose", "--id", "exp", "--coord", f"127.0.0.1:{coord_port}",
            "--ca", str(ca), "--allow", "127.0.0.1:1", *options]  # fmt: skip


# Every status line starts with a timestamp, "2025-01-31 12:00:00.123 ".
STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
EXPOSING = re.compile(STAMP + r"exposing 127\.0\.0\.1:1 to ", re.M)
SELF_ASSERTED = "self-asserted"


@pytest.mark.parametrize(
    ("options", "warns"),
    [
        pytest.param(("--peer", "fwd"), True, id="peer-without-client-ca"),
        pytest.param(("--peer", "fwd", "--client-ca", "CA"), False, id="peer-with-client-ca"),
        pytest.param((), False, id="any-peer"),
    ],
)
def test_row12_expose_warns_that_peer_ids_are_self_asserted_without_a_client_ca(
    tmp_path: Path, options: tuple[str, ...], warns: bool
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.make_ca()[0])
    argv = expose_argv(free_port(), ca, *(str(ca) if o == "CA" else o for o in options))
    with Programs(tmp_path) as programs:
        expose = programs.start("expose", argv)
        expose.wait_line(EXPOSING)
        output = expose.output()
    # The warning comes before the "exposing" line, so it is in the output by now.
    assert (SELF_ASSERTED in output) == warns, output
    if warns:
        warning = next(line for line in output.splitlines() if SELF_ASSERTED in line)
        assert "WARNING" in warning
        assert "'fwd'" in warning
        assert "--client-ca" in warning
