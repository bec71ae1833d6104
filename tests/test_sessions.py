"""Client sessions: connecting, being counted, leaving, idling, and every way connecting fails.

Covers the "Entry points" and "Errors" parts of the API contract: ``open_client`` returns with
the client counted by the coordinator and raises a specific ``ConecError`` subclass (never an
ExceptionGroup) with a message saying what to fix when connecting fails, leaving nothing
running behind.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
from helpers import ClientFactory, wait_for

import conec_trio
from conec_trio import certs
from conec_trio._config import canonical_id, check_client_id
from conec_trio._wire import control

CoordConfigFactory = Callable[..., conec_trio.CoordConfig]
ClientConfigFactory = Callable[..., conec_trio.ClientConfig]


# --- helpers -------------------------------------------------------------------------------


def open_fds() -> set[str]:
    """Open file descriptors, after closing whatever only garbage collection would close."""
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def task_count(*, exclude: trio.Nursery | None = None) -> int:
    """Every task in this trio run (the test's fixtures included), except those under
    ``exclude``."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            if nursery is not exclude:
                stack.extend(nursery.child_tasks)
    return count


def coordinator_tasks(coord: conec_trio.Coordinator) -> int:
    """Tasks the coordinator runs now."""
    return task_count() - task_count(exclude=coord._nursery)


async def expect_open_client_error(
    config: conec_trio.ClientConfig,
    error: type[conec_trio.ConecError],
    *,
    within: float = 5.0,
    coord: conec_trio.Coordinator | None = None,
) -> conec_trio.ConecError:
    """``open_client(config)`` raises exactly ``error`` within ``within`` seconds, before the
    body runs, and leaves no socket open and no task running (``coord``'s own tasks aside).
    """
    not_ours = None if coord is None else coord._nursery
    fds_before = open_fds()
    tasks_before = task_count(exclude=not_ours)
    body_ran = False
    start = trio.current_time()
    with trio.fail_after(within):
        # A nursery around the call, as a user would have: it must exit promptly too.
        async with trio.open_nursery():
            with pytest.raises(conec_trio.ConecError) as excinfo:
                async with conec_trio.open_client(config):
                    body_ran = True
    elapsed = trio.current_time() - start
    assert not body_ran
    # The error itself, not an ExceptionGroup or another subclass.
    assert type(excinfo.value) is error, (
        f"expected {error.__name__}, got {type(excinfo.value).__name__}: {excinfo.value}"
    )
    assert elapsed < within
    assert open_fds() <= fds_before, "open_client leaked file descriptors when it failed"
    assert task_count(exclude=not_ours) == tasks_before, "open_client left tasks running"
    return excinfo.value


async def roundtrip_with_coordinator(
    coord: conec_trio.Coordinator, client: conec_trio.Client, payload: bytes = b"ping"
) -> None:
    """``client`` opens a stream to the coordinator; one message each way."""
    with trio.fail_after(5):
        send, recv = await client.new_proxied_stream(None)
        await send.send(payload)
        incoming = await coord.incoming_streams.receive()
        assert incoming.peer == client.id
        assert await incoming.recv.receive() == payload
        await incoming.send.send(payload[::-1])
        assert await recv.receive() == payload[::-1]
        await send.aclose()
        await incoming.send.aclose()


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def localhost_resolves_to(address: str) -> bool:
    try:
        infos = socket.getaddrinfo("localhost", None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    return any(info[4][0] == address for info in infos)


class _FixedResolver(trio.abc.HostnameResolver):
    """Resolves one name to the given addresses, in that order (numeric hosts never get
    here: trio handles them itself)."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name
        self.addresses = addresses

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        name = host.decode() if isinstance(host, bytes) else host
        if name != self.name:
            raise socket.gaierror(socket.EAI_NONAME, f"test resolver only knows {self.name!r}")
        out = []
        for address in self.addresses:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (0, fam):
                continue
            out.extend(socket.getaddrinfo(address, port, fam, type, proto, socket.AI_NUMERICHOST))
        return out

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        raise NotImplementedError


@contextmanager
def resolver(name: str, addresses: list[str]) -> Iterator[None]:
    previous = trio.socket.set_custom_hostname_resolver(_FixedResolver(name, addresses))
    try:
        yield
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


@contextmanager
def silent_udp_port() -> Iterator[int]:
    """A bound UDP port that never answers (a black hole, not even ICMP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def closed_udp_port() -> int:
    """A UDP port nobody is bound to (the kernel answers with ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- being counted, leaving ------------------------------------------------------------------


async def test_open_client_returns_counted_and_leaving_uncounts_promptly(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    assert coord.num_clients == 0
    async with open_client(coord, "alice") as alice:
        # Counted as soon as open_client returns, no waiting.
        assert coord.num_clients == 1
        assert coord.client_ids() == ["alice"]
        async with open_client(coord, "bob"):
            assert coord.num_clients == 2
        # bob said goodbye: gone well before any idle timeout (10 s by default).
        await wait_for(lambda: coord.num_clients == 1, timeout=2)
        assert coord.client_ids() == ["alice"]
        await roundtrip_with_coordinator(coord, alice)
    await wait_for(lambda: coord.num_clients == 0, timeout=2)


async def test_leaving_the_block_closes_the_clients_socket_at_once(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    fds_before = open_fds()
    tasks_before = task_count()
    async with open_client(coord, "alice") as alice:
        assert open_fds() != fds_before  # it does hold a socket while open
        await roundtrip_with_coordinator(coord, alice)
    # Leaving returns only when everything the client started is down.
    assert open_fds() <= fds_before
    # The coordinator side may still be in its closing period; the client's tasks are gone.
    await wait_for(lambda: task_count() <= tasks_before, timeout=3)


async def test_same_id_can_reconnect_after_leaving(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "alice"):
        pass
    # The id is free again once the first session is gone.
    await wait_for(lambda: coord.num_clients == 0, timeout=2)
    async with open_client(coord, "alice") as again:
        assert coord.client_ids() == ["alice"]
        await roundtrip_with_coordinator(coord, again)


async def test_vanished_client_is_dropped_after_its_idle_timeout(
    coord: conec_trio.Coordinator,
    open_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idle_timeout = 0.6
    async with open_client(coord, "ghost", keepalive=False, idle_timeout=idle_timeout) as ghost:
        assert coord.num_clients == 1
        # The client's host vanishes: nothing it sends reaches the network any more, so not
        # even its CONNECTION_CLOSE on leaving the block.
        endpoint = ghost._socket
        assert endpoint is not None

        async def lost(datagrams: Any) -> None:
            await trio.lowlevel.checkpoint()

        monkeypatch.setattr(endpoint, "send_datagrams", lost)
    left = trio.current_time()
    await wait_for(lambda: coord.num_clients == 0, timeout=idle_timeout + 3)
    elapsed = trio.current_time() - left
    # Dropped by the idle timeout, not by a goodbye that slipped through.
    assert elapsed >= idle_timeout * 0.5, f"dropped after {elapsed:.2f} s: no real vanishing"


async def test_keepalive_keeps_an_idle_client_connected(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    idle_timeout = 0.6
    async with open_client(coord, "idler", keepalive=True, idle_timeout=idle_timeout) as idler:
        # Idleness itself is the behaviour under test: the client does nothing for three idle
        # timeouts of real time. (The only fixed sleep in this file; without keepalive the
        # client would be gone long before it ends, see the next test.)
        await trio.sleep(3 * idle_timeout)
        assert coord.num_clients == 1
        assert coord.client_ids() == ["idler"]
        await roundtrip_with_coordinator(coord, idler)


@pytest.mark.parametrize(
    ("coord_idle", "client_idle"),
    [(None, 0.6), (0.6, None)],
    ids=["client-sets-timeout", "coordinator-sets-timeout"],
)
async def test_without_keepalive_an_idle_client_is_dropped(
    coord_config: CoordConfigFactory,
    open_client: ClientFactory,
    coord_idle: float | None,
    client_idle: float | None,
) -> None:
    # The lower of both sides' idle timeouts applies, whichever side sets it.
    async with (
        conec_trio.open_coordinator(coord_config(idle_timeout=coord_idle)) as coord,
        open_client(
            coord, "idler", keepalive=False, idle_timeout=client_idle, reconnect=False
        ) as idler,
    ):
        assert coord.num_clients == 1
        await wait_for(lambda: coord.num_clients == 0, timeout=4)
        # The client knows it too (reconnecting off: the loss is final): its methods raise
        # ConecError, incoming streams break.
        with trio.fail_after(4):
            with pytest.raises(conec_trio.ConecError):
                await idler.new_proxied_stream(None)
            with pytest.raises(trio.BrokenResourceError):
                await idler.incoming_streams.receive()
    # ... and leaving the block afterwards raised nothing.


async def test_user_exception_in_the_block_propagates_as_itself(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    class Oops(Exception):
        pass

    with trio.fail_after(5):
        with pytest.raises(Oops) as excinfo:
            async with open_client(coord, "alice"):
                raise Oops("from the user")
    assert type(excinfo.value) is Oops
    assert str(excinfo.value) == "from the user"
    await wait_for(lambda: coord.num_clients == 0, timeout=2)

    # A ConecError of the user's own making is not rewritten either.
    mine = conec_trio.PeerNotFoundError("raised by user code")
    with trio.fail_after(5):
        with pytest.raises(conec_trio.PeerNotFoundError) as excinfo2:
            async with open_client(coord, "alice"):
                raise mine
    assert excinfo2.value is mine


async def test_cancelling_the_block_from_outside_says_goodbye(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    # Cancelling the block (a timeout around a session, Ctrl-C) is leaving it: the coordinator
    # must see the client go at once, not after its idle timeout. Which of the client's tasks
    # trio wakes first on cancellation is random, so try a few times.
    for _ in range(12):
        with trio.fail_after(5):
            with trio.CancelScope() as scope:
                async with open_client(coord, "alice"):
                    assert coord.num_clients == 1
                    scope.cancel()
                    await trio.sleep_forever()
        assert scope.cancelled_caught
        # Well under the 10 s idle timeout: only a goodbye explains it.
        await wait_for(lambda: coord.num_clients == 0, timeout=2)


# --- addresses -------------------------------------------------------------------------------


async def test_coordinator_address_is_the_bound_address(
    coord_config: CoordConfigFactory, open_client: ClientFactory
) -> None:
    async with conec_trio.open_coordinator(coord_config(host="127.0.0.1", port=0)) as coord:
        host, port = coord.address
        assert host == "127.0.0.1"
        assert isinstance(port, int)
        assert port != 0
        # Really bound there: nobody else can take that port.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            with pytest.raises(OSError, match="in use") as excinfo:
                other.bind((host, port))
            assert excinfo.value.errno == errno.EADDRINUSE
        async with open_client(coord, "alice", coord_host=host, coord_port=port) as alice:
            await roundtrip_with_coordinator(coord, alice)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no IPv6 loopback")
async def test_coordinator_address_on_ipv6_loopback(
    coord_config: CoordConfigFactory, open_client: ClientFactory
) -> None:
    async with conec_trio.open_coordinator(coord_config(host="::1")) as coord:
        host, port = coord.address
        assert host == "::1"
        assert port != 0
        async with open_client(coord, "alice", coord_host="::1", connect_timeout=3) as alice:
            await roundtrip_with_coordinator(coord, alice)


async def test_localhost_reaches_a_coordinator_on_127_0_0_1(
    coord_config: CoordConfigFactory, open_client: ClientFactory
) -> None:
    async with conec_trio.open_coordinator(coord_config(host="127.0.0.1")) as coord:
        start = trio.current_time()
        async with open_client(coord, "alice", coord_host="localhost") as alice:
            assert trio.current_time() - start < 2
            await roundtrip_with_coordinator(coord, alice)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no IPv6 loopback")
@pytest.mark.skipif(
    not localhost_resolves_to("::1"),
    reason="'localhost' does not resolve to ::1 here (see the test with a custom resolver)",
)
async def test_localhost_reaches_a_coordinator_on_ipv6_loopback(
    coord_config: CoordConfigFactory, open_client: ClientFactory
) -> None:
    async with conec_trio.open_coordinator(coord_config(host="::1")) as coord:
        start = trio.current_time()
        async with open_client(coord, "alice", coord_host="localhost", connect_timeout=3) as alice:
            assert trio.current_time() - start < 2
            await roundtrip_with_coordinator(coord, alice)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no IPv6 loopback")
@pytest.mark.parametrize(
    ("bound", "resolved"),
    [
        ("127.0.0.1", ["::1", "127.0.0.1"]),
        ("::1", ["127.0.0.1", "::1"]),
    ],
    ids=["bound-v4-v6-resolved-first", "bound-v6-v4-resolved-first"],
)
async def test_every_resolved_address_is_tried(
    coord_config: CoordConfigFactory,
    open_client: ClientFactory,
    bound: str,
    resolved: list[str],
) -> None:
    # "localhost" resolves to both loopbacks, the unanswered one first: open_client must not
    # give up on it, nor wait for it to time out.
    async with conec_trio.open_coordinator(coord_config(host=bound)) as coord:
        with resolver("localhost", resolved):
            start = trio.current_time()
            async with open_client(
                coord, "alice", coord_host="localhost", connect_timeout=3
            ) as alice:
                elapsed = trio.current_time() - start
                assert elapsed < 2, f"open_client took {elapsed:.2f} s"
                assert coord.num_clients == 1
                await roundtrip_with_coordinator(coord, alice)
                # The losing attempt was hung up on: one connection, counted once.
                assert coord.num_clients == 1


# --- connecting fails: each a specific ConecError saying what to fix ------------------------


@pytest.mark.parametrize("kind", ["black-hole", "port-unreachable"])
async def test_unreachable_coordinator_is_a_connect_error(
    client_config: ClientConfigFactory, coord: conec_trio.Coordinator, kind: str
) -> None:
    connect_timeout = 1.5
    with silent_udp_port() as silent:
        port = silent if kind == "black-hole" else closed_udp_port()
        config = client_config(coord, "alice", coord_port=port, connect_timeout=connect_timeout)
        start = trio.current_time()
        err = await expect_open_client_error(
            config, conec_trio.ConnectError, within=connect_timeout + 2, coord=coord
        )
        elapsed = trio.current_time() - start
    assert elapsed < connect_timeout + 1.5
    message = str(err)
    assert f"127.0.0.1:{port}" in message
    assert "running" in message or "host and port" in message, message


async def test_unreachable_coordinator_with_short_idle_timeout_is_a_connect_error(
    client_config: ClientConfigFactory, coord: conec_trio.Coordinator
) -> None:
    # The handshake attempt idles out before connect_timeout ends: still "no answer".
    with silent_udp_port() as port:
        err = await expect_open_client_error(
            client_config(coord, "alice", coord_port=port, connect_timeout=3, idle_timeout=0.5),
            conec_trio.ConnectError,
            coord=coord,
        )
    assert f"127.0.0.1:{port}" in str(err)


async def test_wrong_ca_is_a_certificate_error(
    coord: conec_trio.Coordinator, client_config: ClientConfigFactory
) -> None:
    other_ca, _ = certs.self_signed_cert(["localhost", "127.0.0.1"])
    err = await expect_open_client_error(
        client_config(coord, "alice", ca=other_ca, connect_timeout=3),
        conec_trio.CertificateError,
        coord=coord,
    )
    message = str(err)
    assert "certificate" in message
    assert "'ca'" in message or "ca setting" in message.lower(), message
    assert coord.num_clients == 0


@pytest.mark.parametrize(
    ("cert_names", "bind", "coord_host"),
    [
        (["localhost"], "127.0.0.2", "127.0.0.2"),  # an IP the cert does not name
        (["127.0.0.1"], "127.0.0.1", "localhost"),  # a DNS name the cert does not name
    ],
    ids=["ip-not-in-cert", "name-not-in-cert"],
)
async def test_coord_host_not_in_coordinator_cert_is_a_certificate_error(
    client_config: ClientConfigFactory,
    cert_names: list[str],
    bind: str,
    coord_host: str,
) -> None:
    if bind == "127.0.0.2":
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((bind, 0))
        except OSError:
            pytest.skip("127.0.0.2 is not a loopback address here")
    cert, key = certs.self_signed_cert(cert_names)
    config = conec_trio.CoordConfig(cert_chain=cert, private_key=key, host=bind, port=0)
    async with conec_trio.open_coordinator(config) as coord:
        err = await expect_open_client_error(
            client_config(coord, "alice", coord_host=coord_host, ca=cert, connect_timeout=3),
            conec_trio.CertificateError,
            coord=coord,
        )
        assert "coord_host" in str(err), str(err)
        assert coord.num_clients == 0


async def test_unresolvable_host_is_a_connect_error(
    coord: conec_trio.Coordinator, client_config: ClientConfigFactory
) -> None:
    err = await expect_open_client_error(
        client_config(coord, "alice", coord_host="no-such-host.invalid", connect_timeout=3),
        conec_trio.ConnectError,
        within=10,
        coord=coord,
    )
    assert "no-such-host.invalid" in str(err)
    assert "resolve" in str(err)


async def test_duplicate_id_is_refused_and_the_first_client_stays(
    coord: conec_trio.Coordinator,
    open_client: ClientFactory,
    client_config: ClientConfigFactory,
) -> None:
    async with open_client(coord, "alice") as first:
        err = await expect_open_client_error(
            client_config(coord, "alice"), conec_trio.IdInUseError, coord=coord
        )
        assert "'alice'" in str(err)
        assert "already connected" in str(err)
        # The first one still holds the name and still works.
        assert coord.client_ids() == ["alice"]
        await roundtrip_with_coordinator(coord, first)
        async with open_client(coord, "bob") as bob:
            with trio.fail_after(5):
                send, _ = await bob.new_proxied_stream("alice")
                await send.send(b"hi alice")
                incoming = await first.incoming_streams.receive()
                assert incoming.peer == "bob"
                assert await incoming.recv.receive() == b"hi alice"
        assert coord.client_ids() == ["alice"]


@pytest.mark.parametrize(
    "bad_id",
    ["bad id!", "", "-x", "x-", "a" * 300, "a" * 64, "a..b", "ä", "under_score", "a\r\n", "\na"],
)
async def test_invalid_id_is_refused_before_any_network_activity(
    client_config: ClientConfigFactory,
    coord: conec_trio.Coordinator,
    monkeypatch: pytest.MonkeyPatch,
    bad_id: str,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("open_client touched the network for an invalid id")

    monkeypatch.setattr(trio.socket, "getaddrinfo", no_network)
    monkeypatch.setattr(conec_trio._connect, "make_udp_socket", no_network)
    with silent_udp_port() as port:
        err = await expect_open_client_error(
            client_config(coord, bad_id, coord_port=port),
            conec_trio.InvalidIdError,
            within=1,
            coord=coord,
        )
    assert repr(bad_id) in str(err)
    assert "letters, digits" in str(err)


async def test_valid_ids_that_look_odd_are_accepted(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    for ok in ["a", "a" * 63, "node-1.example", "10.0.0.1", "UPPER"]:
        async with open_client(coord, ok) as client:
            assert coord.client_ids() == [ok.lower()]  # ids are registered in lowercase
            assert client.id == ok.lower()
        await wait_for(lambda: coord.num_clients == 0, timeout=2)


async def test_row11_id_with_a_trailing_newline_is_invalid(
    client_config: ClientConfigFactory, coord: conec_trio.Coordinator
) -> None:
    # The check used "$", which also matches just before a final newline.
    err = await expect_open_client_error(
        client_config(coord, "alice\n"), conec_trio.InvalidIdError, within=1, coord=coord
    )
    assert repr("alice\n") in str(err)
    with pytest.raises(conec_trio.InvalidIdError):
        check_client_id("alice\n")


def test_row10_ids_are_canonical_in_lowercase() -> None:
    assert check_client_id("Alice.EXAMPLE") == "alice.example"
    assert canonical_id("Bob") == "bob"
    # Only ASCII is folded: str.lower maps KELVIN SIGN onto "k", which would let a name that
    # is no valid id look up a valid one.
    assert canonical_id("\u212aelly") == "\u212aelly"
    with pytest.raises(conec_trio.InvalidIdError):
        check_client_id("\u212aelly")


async def test_row10_peers_are_found_whatever_the_case_of_their_name(
    coord: conec_trio.Coordinator, open_client: ClientFactory
) -> None:
    async with open_client(coord, "Alice") as alice, open_client(coord, "bob") as bob:
        assert alice.id == "alice"
        assert coord.client_ids() == ["alice", "bob"]
        with trio.fail_after(5):
            send, _ = await bob.new_proxied_stream("ALICE")
            await send.send(b"proxied")
            incoming = await alice.incoming_streams.receive()
            assert (incoming.peer, await incoming.recv.receive()) == ("bob", b"proxied")
            await bob.new_channel("aLiCe")
            send, _ = await bob.new_direct_stream("ALICE")  # the channel opened as "aLiCe"
            await send.send(b"direct")
            incoming = await alice.incoming_streams.receive()
            assert incoming.stream_id.is_direct
            assert (incoming.peer, await incoming.recv.receive()) == ("bob", b"direct")
            send, _ = await alice.new_stream("BOB")  # over the channel bob opened
            await send.send(b"back")
            incoming = await bob.incoming_streams.receive()
            assert incoming.stream_id.is_direct
            assert (incoming.peer, await incoming.recv.receive()) == ("alice", b"back")


class _VersionProxy:
    """The ``control`` module as one side sees it, with another protocol version."""

    def __init__(self, version: int) -> None:
        self.PROTOCOL_VERSION = version

    def __getattr__(self, name: str) -> Any:
        return getattr(control, name)


@pytest.mark.parametrize("newer", ["client", "coordinator"])
async def test_version_mismatch_is_refused_saying_so(
    coord: conec_trio.Coordinator,
    client_config: ClientConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
    newer: str,
) -> None:
    # Both sides read control.PROTOCOL_VERSION when they need it; in one process they share
    # the module, so give one side its own view of it.
    real = control.PROTOCOL_VERSION
    other = 7919
    module = conec_trio._connect if newer == "client" else conec_trio._coordinator
    monkeypatch.setattr(module, "control", _VersionProxy(other))
    err = await expect_open_client_error(
        client_config(coord, "alice"), conec_trio.VersionMismatchError, coord=coord
    )
    message = str(err)
    assert "version" in message
    assert re.search(rf"version {real}\b", message), message
    assert re.search(rf"version {other}\b", message), message
    assert coord.num_clients == 0


async def test_refused_clients_do_not_disturb_the_coordinator(
    coord: conec_trio.Coordinator,
    open_client: ClientFactory,
    client_config: ClientConfigFactory,
) -> None:
    other_ca, _ = certs.self_signed_cert(["127.0.0.1"])
    async with open_client(coord, "alice") as alice:
        for _ in range(3):
            await expect_open_client_error(
                client_config(coord, "alice"), conec_trio.IdInUseError, coord=coord
            )
            await expect_open_client_error(
                client_config(coord, "bob", ca=other_ca),
                conec_trio.CertificateError,
                coord=coord,
            )
        async with open_client(coord, "bob"):
            assert coord.client_ids() == ["alice", "bob"]
        await roundtrip_with_coordinator(coord, alice)


# --- the coordinator's side of comings and goings ------------------------------------------


async def test_leaving_the_coordinator_block_frees_its_port(
    coord_config: CoordConfigFactory, open_client: ClientFactory
) -> None:
    fds_before = open_fds()
    async with conec_trio.open_coordinator(coord_config()) as coord:
        port = coord.address[1]
        async with open_client(coord, "alice") as alice:
            await roundtrip_with_coordinator(coord, alice)
    assert open_fds() <= fds_before, "the coordinator's socket is still open"
    # A coordinator restarted on the same port (as a service on its fixed port is) works.
    async with (
        conec_trio.open_coordinator(coord_config(port=port)) as again,
        open_client(again, "alice") as alice,
    ):
        await roundtrip_with_coordinator(again, alice)


async def test_failed_handshakes_leave_no_coordinator_task_behind(
    coord: conec_trio.Coordinator, client_config: ClientConfigFactory
) -> None:
    other_ca, _ = certs.self_signed_cert(["127.0.0.1"])
    baseline = coordinator_tasks(coord)
    await expect_open_client_error(
        client_config(coord, "alice", ca=other_ca), conec_trio.CertificateError, coord=coord
    )
    # QUIC's closing period on loopback is a few milliseconds; 2 s is plenty.
    await wait_for(lambda: coordinator_tasks(coord) <= baseline, timeout=2)


# --- stateless retry -------------------------------------------------------------------------


async def test_stateless_retry_coordinator_relays_between_clients(
    coord_config: CoordConfigFactory, open_client: ClientFactory
) -> None:
    async with (
        conec_trio.open_coordinator(coord_config(stateless_retry=True)) as coord,
        open_client(coord, "alice") as alice,
        open_client(coord, "bob") as bob,
    ):
        assert coord.num_clients == 2
        with trio.fail_after(5):
            send, recv = await alice.new_proxied_stream("bob")
            await send.send(b"hello bob")
            incoming = await bob.incoming_streams.receive()
            assert incoming.peer == "alice"
            assert incoming.stream_id == send.stream_id
            assert await incoming.recv.receive() == b"hello bob"
            await incoming.send.send(b"hello alice")
            assert await recv.receive() == b"hello alice"
        await roundtrip_with_coordinator(coord, alice)
