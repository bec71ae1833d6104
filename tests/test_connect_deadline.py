"""``connect_timeout`` bounds the whole of ``open_client``: a name lookup that hangs fails
within it, naming the lookup, and time spent resolving comes out of the handshake's share."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
import trio.testing

import conec_trio
from conec_trio import certs
from conec_trio.testing import open_fake_network

COORD_NAME = "coordinator.example"
COORD_IP, CLIENT_IP = "192.0.2.1", "10.0.0.2"


class SlowResolver(trio.abc.HostnameResolver):
    """Resolves every name to ``COORD_IP`` after ``delay`` seconds (inf: never). Installed
    with ``set_custom_hostname_resolver``, it lasts for the test's own trio run only."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.asked: list[bytes | str | None] = []

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        self.asked.append(host)
        await trio.sleep(self.delay)
        assert isinstance(port, int)
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", (COORD_IP, port))]

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        raise NotImplementedError


def config(connect_timeout: float) -> conec_trio.ClientConfig:
    cert, _ = certs.self_signed_cert([COORD_NAME])
    return conec_trio.ClientConfig(
        id="alice", coord_host=COORD_NAME, ca=cert, connect_timeout=connect_timeout
    )


async def test_a_hanging_name_lookup_fails_within_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    resolver = SlowResolver(delay=float("inf"))
    trio.socket.set_custom_hostname_resolver(resolver)
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(conec_trio.ConnectError) as info:
        async with conec_trio.open_client(config(connect_timeout=3.0)):
            pytest.fail("connected through a resolver that never answers")
    assert trio.current_time() - start == pytest.approx(3.0)
    assert resolver.asked == [COORD_NAME.encode()]
    assert f"resolving {COORD_NAME} took longer than connect_timeout" in str(info.value)


async def test_resolving_counts_against_the_same_deadline_as_the_handshake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The name resolves after 2 s to an address where no coordinator answers: the whole
    # attempt still ends at connect_timeout, not 2 s later, and blames the silence.
    trio.socket.set_custom_hostname_resolver(SlowResolver(delay=2.0))
    async with open_fake_network() as net:
        net.add_host(COORD_IP)
        net.add_host(CLIENT_IP)
        with net.on_host(CLIENT_IP):
            start = trio.current_time()
            with pytest.raises(conec_trio.ConnectError) as info:
                async with conec_trio.open_client(config(connect_timeout=5.0)):
                    pytest.fail("connected to a coordinator that does not exist")
            assert trio.current_time() - start == pytest.approx(5.0)
    assert "no answer from the coordinator" in str(info.value)
    assert net.sent(by=CLIENT_IP, to=COORD_IP) > 0  # it did try, once resolved
