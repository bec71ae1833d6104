"""Faults: a client killed mid-stream, the coordinator killed and restarted, packet loss.

What a user depends on when something dies or the network is bad:

- a stream that really died breaks (``trio.BrokenResourceError`` on receive and on send)
  within the idle timeout plus a margin, not later and not never;
- what arrived before the break is exactly what was sent, a prefix: every message once, in
  order, none damaged, none invented from half a message;
- every other stream goes on and loses nothing.

Killed processes get SIGKILL (no goodbye, no QUIC CONNECTION_CLOSE): the others only learn
of it by the idle timeout, so it is short here. The loss tests run on the simulated network
of ``conec_trio.testing`` under trio's ``MockClock`` (seeded loss, minutes of network time in little
wall time), and once across the real NATs of the NAT lab (root only).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import ClientFactory, wait_for

import conec_trio
from conec_trio import IncomingStream, certs
from conec_trio.testing import LOST, Datagram, FakeNetwork, open_fake_network

DEADLINE = 10.0  # seconds: every wait is bounded by it unless told otherwise
# Idle timeout of the coordinator and the clients in the tests with killed processes: a dead
# peer is noticed this long after its last packet...
IDLE = 1.5
# ...so a dead stream must break within this (wall time) after the kill.
PROMPT = IDLE + 2.5
HEADER = 8  # a numbered message starts with its number, 8 bytes big-endian
HERE = Path(__file__).resolve().parent
FAULT_NODE = HERE / "fault_node.py"
DOOMED_SIZE = 40_000  # bytes per message of the killed client: several datagrams each
DOOMED_COUNT = 300  # messages it sends when it is killed while idle


def numbered(n: int, size: int = 64) -> bytes:
    """Message ``n``: its number, then a filler that depends on ``n`` (damage shows)."""
    return n.to_bytes(HEADER, "big") + bytes([n % 251]) * max(0, size - HEADER)


def number(message: bytes) -> int:
    return int.from_bytes(message[:HEADER], "big")


def varied_size(n: int) -> int:
    """Sizes from 8 bytes to several datagrams, so messages straddle packet boundaries."""
    return HEADER + (n * 7919) % 4000


def assert_prefix(received: list[int], what: str) -> None:
    """``received`` is 0, 1, 2, ...: no gap, no duplicate, in order."""
    assert received == list(range(len(received))), f"{what}: not a prefix: {received[:50]}"


# --- subprocesses ------------------------------------------------------------------------------


class Program:
    """A subprocess whose stdout lines are collected as they come (the pipe never fills)."""

    def __init__(self, name: str, proc: trio.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self.eof = trio.Event()
        self._changed = trio.Event()

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        buffer = b""
        try:
            while chunk := await self.proc.stdout.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in lines)
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self.eof.set()
            self._changed.set()

    async def expect(
        self,
        pattern: str,
        within: float = DEADLINE,
        accept: Callable[[re.Match[str]], bool] | None = None,
    ) -> re.Match[str]:
        """The first line matching ``pattern`` (and ``accept``), waiting for it if need be."""
        # The command line's status lines start with a timestamp; fault_node's do not.
        regex = re.compile(r"(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} )?(?:" + pattern + ")")
        seen = 0
        with trio.move_on_after(within):
            while True:
                for line in self.lines[seen:]:
                    match = regex.fullmatch(line)
                    if match is not None and (accept is None or accept(match)):
                        return match
                seen = len(self.lines)
                if self.eof.is_set():
                    break
                await self._changed.wait()
        state = "exited" if self.eof.is_set() else f"said nothing matching within {within:g} s"
        raise AssertionError(f"{self.name} {state} while we waited for {pattern!r}: {self.lines}")

    async def kill(self) -> None:
        """SIGKILL: no goodbye to anyone. Waits (bounded) until it is gone."""
        self.proc.kill()
        with trio.fail_after(DEADLINE):
            await self.proc.wait()

    async def stop(self) -> int:
        """SIGTERM: a clean stop. Waits (bounded) for the exit; returns its status."""
        self.proc.terminate()
        with trio.fail_after(DEADLINE):
            return await self.proc.wait()


@asynccontextmanager
async def run_program(name: str, argv: list[str]) -> AsyncIterator[Program]:
    """Run ``argv``; it is killed when the block ends, whatever happened."""
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, cwd=HERE)
    program = Program(name, proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(program._pump)
            try:
                yield program
            finally:
                with trio.CancelScope(shield=True):
                    await program.kill()
                nursery.cancel_scope.cancel()
    finally:
        proc.kill()  # if starting the pump failed


# --- streams kept busy --------------------------------------------------------------------------


async def ping_pong(
    send: trio.abc.SendChannel[bytes],
    recv: trio.abc.ReceiveChannel[bytes],
    peer: IncomingStream,
    stop: trio.Event,
    after_stop: int = 20,
) -> int:
    """Keep a stream busy until ``stop``, then ``after_stop`` messages more, then end it.

    One numbered message at a time, echoed by ``peer``. Checks that both sides got every
    message exactly once, in order, undamaged, and a clean end. Returns how many went.
    """
    echoed: list[int] = []

    async def echo() -> None:
        async for message in peer.recv:
            echoed.append(number(message))
            assert message == numbered(number(message), varied_size(number(message)))
            await peer.send.send(message)
        await peer.send.aclose()

    count = 0

    async def one() -> None:
        nonlocal count
        message = numbered(count, varied_size(count))
        await send.send(message)
        assert await recv.receive() == message, f"echo {count} is wrong"
        count += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        while not stop.is_set():
            await one()
        for _ in range(after_stop):
            await one()
        await send.aclose()
        with pytest.raises(trio.EndOfChannel):
            await recv.receive()
    assert_prefix(echoed, "the surviving stream")
    assert len(echoed) == count
    return count


class Reader:
    """Receives numbered messages of ``size`` bytes until the stream breaks; records their
    numbers and when it broke. A damaged message (a partial one included) fails the test."""

    def __init__(
        self,
        recv: trio.abc.ReceiveChannel[bytes],
        size: int,
        ack: trio.abc.SendChannel[bytes] | None = None,
    ) -> None:
        self.recv = recv
        self.size = size
        self.ack = ack  # answer each message with its number on this channel, if given
        self.received: list[int] = []
        self.error: BaseException | None = None
        self.broke_at: float | None = None
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                message = await self.recv.receive()
                n = number(message)
                assert message == numbered(n, self.size), f"message {n} damaged"
                self.received.append(n)
                if self.ack is not None:
                    try:
                        await self.ack.send(message[:HEADER])
                    except trio.BrokenResourceError:
                        self.ack = None  # the send side died first: keep reading
        except (trio.BrokenResourceError, trio.EndOfChannel, conec_trio.ConecError) as exc:
            self.error = exc
            self.broke_at = trio.current_time()
        finally:
            self.done.set()

    async def wait_for_count(self, n: int, within: float = DEADLINE) -> None:
        await wait_for(lambda: len(self.received) >= n or self.done.is_set(), within)
        assert len(self.received) >= n, f"stream ended early: {self.error!r}"

    def check_broken(self, what: str) -> None:
        assert isinstance(self.error, trio.BrokenResourceError), f"{what}: {self.error!r}"
        assert_prefix(self.received, what)


class Writer:
    """Sends numbered messages of ``size`` bytes until the stream breaks."""

    def __init__(self, send: trio.abc.SendChannel[bytes], size: int) -> None:
        self.send = send
        self.size = size
        self.sent = 0
        self.error: BaseException | None = None
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                await self.send.send(numbered(self.sent, self.size))
                self.sent += 1
        except (trio.BrokenResourceError, conec_trio.ConecError) as exc:
            self.error = exc
        finally:
            self.done.set()


async def check_dead_ends(
    send: trio.abc.SendChannel[bytes], recv: trio.abc.ReceiveChannel[bytes], what: str
) -> None:
    """Both ends of a broken stream stay broken."""
    with trio.fail_after(DEADLINE):
        with pytest.raises(trio.BrokenResourceError):
            await send.send(b"anyone there?")
        with pytest.raises(trio.BrokenResourceError):
            await recv.receive()


async def open_between(
    opener: conec_trio.Client, acceptor: conec_trio.Client, direct: bool
) -> tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[bytes], IncomingStream]:
    """A proxied or direct stream from ``opener`` to ``acceptor``, both ends."""
    with trio.fail_after(DEADLINE):
        if direct:
            try:
                send, recv = await opener.new_direct_stream(acceptor.id)
            except conec_trio.ChannelError:  # no channel yet
                await opener.new_channel(acceptor.id)
                send, recv = await opener.new_direct_stream(acceptor.id)
        else:
            send, recv = await opener.new_proxied_stream(acceptor.id)
        incoming = await acceptor.incoming_streams.receive()
    assert incoming.stream_id == send.stream_id
    assert incoming.stream_id.is_direct is direct
    return send, recv, incoming


# --- a client process killed mid-stream ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["proxied", "direct"])
# "sending": killed while it sends as fast as it can (the last message arrives in part);
# "idle": killed between messages, everything it sent delivered: the stream must still break,
# not end as if closed cleanly.
@pytest.mark.parametrize("phase", ["sending", "idle"])
async def test_client_killed_mid_stream(
    mode: str,
    phase: str,
    coord_config: Callable[..., conec_trio.CoordConfig],
    open_client: ClientFactory,
    coord_identity: tuple[bytes, bytes],
    tmp_path: Path,
) -> None:
    direct = mode == "direct"
    ca_path = tmp_path / "coord-ca.pem"
    ca_path.write_bytes(coord_identity[0])
    async with (
        conec_trio.open_coordinator(coord_config(idle_timeout=IDLE)) as coord,
        # Short idle timeouts on the survivors too: their keepalives must come often enough
        # for the coordinator's short idle timeout, and bob notices a dead direct peer by it.
        open_client(coord, "bob", idle_timeout=IDLE) as bob,
        open_client(coord, "carol", idle_timeout=IDLE) as carol,
        open_client(coord, "dave", idle_timeout=IDLE) as dave,
    ):
        # An unrelated stream of the same kind, busy from before the kill until after the
        # dead stream broke.
        other_send, other_recv, other_peer = await open_between(carol, dave, direct)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping_pong, other_send, other_recv, other_peer, stop)
            argv = [
                sys.executable, str(FAULT_NODE), "--port", str(coord.address[1]),
                "--ca", str(ca_path), "--id", "doomed", "--peer", "bob", "--mode", mode,
                "--idle-timeout", str(IDLE), "--size", str(DOOMED_SIZE),
                "--count", str(0 if phase == "sending" else DOOMED_COUNT),
            ]  # fmt: skip
            async with run_program("doomed", argv) as doomed:
                await doomed.expect("open")
                with trio.fail_after(DEADLINE):
                    incoming = await bob.incoming_streams.receive()
                assert incoming.peer == "doomed"
                assert incoming.stream_id.is_direct is direct
                reader = Reader(incoming.recv, DOOMED_SIZE, ack=incoming.send)
                nursery.start_soon(reader.run)
                if phase == "sending":
                    # Hundreds of messages delivered and acknowledged, more coming.
                    await doomed.expect(r"acked (\d+)", accept=lambda m: int(m[1]) >= 200)
                else:
                    await doomed.expect(f"all {DOOMED_COUNT} acked")
                await doomed.kill()
                killed_at = trio.current_time()
            acked = [
                int(m[1]) for line in doomed.lines if (m := re.fullmatch(r"acked (\d+)", line))
            ]
            assert not [line for line in doomed.lines if line.startswith("bad ack")], doomed.lines

            with trio.fail_after(PROMPT + 1):
                await reader.done.wait()
            assert reader.broke_at is not None
            assert reader.broke_at - killed_at < PROMPT, "the dead stream broke too late"
            reader.check_broken("bob's stream from the killed client")
            # Everything the killed client saw acknowledged was delivered (once, in order).
            assert len(reader.received) > max(acked)
            if phase == "idle":
                assert len(reader.received) == DOOMED_COUNT
            await check_dead_ends(incoming.send, incoming.recv, "bob's dead stream")
            stop.set()

        # The coordinator let go of the dead client; bob and the others are fine, and the
        # killed client, restarted, gets its name back.
        await wait_for(lambda: coord.client_ids() == ["bob", "carol", "dave"], PROMPT)
        async with open_client(coord, "doomed", idle_timeout=IDLE) as restarted:
            for opener, acceptor in ((bob, carol), (restarted, bob)):
                send, recv, peer = await open_between(opener, acceptor, direct)
                with trio.fail_after(DEADLINE):
                    await send.send(b"still here")
                    assert await peer.recv.receive() == b"still here"
                    await peer.send.send(b"so am I")
                    assert await recv.receive() == b"so am I"


# --- the coordinator killed and restarted -------------------------------------------------------


READY = r"ready on 127\.0\.0\.1:(\d+)"


def coord_argv(port: int, state_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "conec_trio", "coord", "--host", "127.0.0.1",
        "--port", str(port), "--state-dir", str(state_dir),
    ]  # fmt: skip


async def test_coordinator_killed_and_restarted(tmp_path: Path) -> None:
    state_dir = tmp_path / "coord-state"

    def config(client_id: str, port: int, ca: str) -> conec_trio.ClientConfig:
        # reconnect=False: the earlier behaviour, where losing the coordinator is final
        # (test_reconnect covers the default).
        return conec_trio.ClientConfig(
            id=client_id, coord_host="127.0.0.1", coord_port=port, ca=ca, idle_timeout=IDLE,
            reconnect=False,
        )  # fmt: skip

    async with run_program("coord", coord_argv(0, state_dir)) as coord:
        ca = (await coord.expect(r"clients pass --ca (.+)"))[1]
        port = int((await coord.expect(READY))[1])
        leaving = trio.CancelScope()
        with leaving:
            async with (
                conec_trio.open_client(config("alice", port, ca)) as alice,
                conec_trio.open_client(config("bob", port, ca)) as bob,
            ):
                proxied = await open_between(alice, bob, direct=False)
                direct = await open_between(alice, bob, direct=True)
                async with trio.open_nursery() as nursery:
                    # On each stream: alice sends, bob reads, and the other way round.
                    ends = [(proxied[0], proxied[2].recv), (proxied[2].send, proxied[1])]
                    ends += [(direct[0], direct[2].recv), (direct[2].send, direct[1])]
                    writers = [Writer(send, 200) for send, _ in ends]
                    readers = [Reader(recv, 200) for _, recv in ends]
                    for task in (*writers, *readers):
                        nursery.start_soon(task.run)
                    for reader in readers:
                        await reader.wait_for_count(50)

                    incoming_broke = trio.Event()

                    async def expect_broken_incoming() -> None:
                        with pytest.raises(trio.BrokenResourceError):
                            await bob.incoming_streams.receive()
                        incoming_broke.set()

                    nursery.start_soon(expect_broken_incoming)
                    await coord.kill()
                    killed_at = trio.current_time()
                    with trio.fail_after(PROMPT):
                        for task in (*writers, *readers):
                            await task.done.wait()
                        await incoming_broke.wait()
                names = ["bob proxied", "alice proxied", "bob direct", "alice direct"]
                for reader, name in zip(readers, names, strict=True):
                    reader.check_broken(f"{name} read")
                    assert reader.broke_at is not None
                    assert reader.broke_at - killed_at < PROMPT, f"{name} broke too late"
                for writer in writers:
                    assert isinstance(writer.error, trio.BrokenResourceError), writer.error

                # Every call that needs the coordinator says the client is disconnected.
                calls: list[Callable[[], Any]] = [
                    lambda: alice.new_proxied_stream("bob"),
                    lambda: alice.new_proxied_stream(None),
                    lambda: alice.new_stream("bob"),
                    lambda: alice.new_channel("bob"),
                    lambda: alice.new_broadcast("room"),
                    lambda: alice.broadcast_count("room"),
                    lambda: bob.new_stream_with_id("alice", conec_trio.StreamId.proxied(99)),
                ]
                for call in calls:
                    with trio.fail_after(DEADLINE), pytest.raises(conec_trio.DisconnectedError):
                        await call()
                # The direct channel went with the coordinator that vouched for it.
                with trio.fail_after(DEADLINE), pytest.raises(conec_trio.ConecError):
                    await alice.new_direct_stream("bob")
                with trio.fail_after(DEADLINE), pytest.raises(trio.BrokenResourceError):
                    await alice.incoming_streams.receive()
                # Leaving the blocks raises nothing (and does not hang).
                leaving.deadline = trio.current_time() + DEADLINE
        assert not leaving.cancelled_caught, "leaving the client blocks hung"

    # The same port and the same certificate: clients that trust it connect again, by the
    # same names, and talk.
    async with run_program("coord again", coord_argv(port, state_dir)) as coord:
        await coord.expect(r"certificate: .*\(kept from an earlier run\)")
        assert (await coord.expect(r"clients pass --ca (.+)"))[1] == ca
        assert int((await coord.expect(READY))[1]) == port
        async with (
            conec_trio.open_client(config("alice", port, ca)) as alice,
            conec_trio.open_client(config("bob", port, ca)) as bob,
        ):
            for is_direct in (False, True):
                send, recv, peer = await open_between(alice, bob, is_direct)
                stop = trio.Event()
                stop.set()
                with trio.fail_after(DEADLINE):
                    assert await ping_pong(send, recv, peer, stop, after_stop=50) == 50


# --- packet loss on the simulated network ---------------------------------------------------------

COORD_IP = "192.0.2.1"
COORD_PORT = 1719
NAT_A, ALICE_IP = "198.51.100.1", "10.0.1.2"
NAT_B, BOB_IP = "203.0.113.1", "10.0.2.2"
CAROL_IP, DAVE_IP = "192.0.2.3", "192.0.2.4"
PATIENCE = 120.0  # simulated seconds: they cost no wall time


@pytest.fixture(scope="module")
def fake_identity() -> tuple[bytes, bytes]:
    return certs.self_signed_cert([COORD_IP])


@asynccontextmanager
async def open_fake_lab(
    net: FakeNetwork, identity: tuple[bytes, bytes], idle_timeout: float, **impairments: Any
) -> AsyncIterator[tuple[conec_trio.Coordinator, dict[str, conec_trio.Client]]]:
    """A public coordinator; alice and bob behind cone NATs, carol and dave public; direct
    channels alice -> bob and carol -> dave.

    Everyone connects and the channels open on a clean network (delay only); then the
    network gets ``impairments`` (FakeNetwork attributes: loss, duplicate, reorder). What is
    tested here is the streams: at 30 % loss, QUIC's backed-off retransmissions can make a
    handshake outlast the 10 s connect and hello deadlines now and then.
    """
    net.add_host(COORD_IP)
    hosts = {"alice": ALICE_IP, "bob": BOB_IP, "carol": CAROL_IP, "dave": DAVE_IP}
    net.add_host(ALICE_IP, behind=net.add_nat(NAT_A))
    net.add_host(BOB_IP, behind=net.add_nat(NAT_B))
    net.add_host(CAROL_IP)
    net.add_host(DAVE_IP)
    cert, key = identity
    async with AsyncExitStack() as stack:
        coord = await stack.enter_async_context(
            conec_trio.open_coordinator(
                conec_trio.CoordConfig(
                    cert, key, host=COORD_IP, port=COORD_PORT, idle_timeout=idle_timeout
                )
            )
        )
        clients = {}
        for client_id, ip in hosts.items():
            stack.enter_context(net.on_host(ip))
            config = conec_trio.ClientConfig(
                id=client_id, coord_host=COORD_IP, coord_port=COORD_PORT, ca=cert,
                idle_timeout=idle_timeout,
            )  # fmt: skip
            clients[client_id] = await stack.enter_async_context(conec_trio.open_client(config))
        with trio.fail_after(PATIENCE):
            await clients["alice"].new_channel("bob")
            await clients["carol"].new_channel("dave")
        for name, value in impairments.items():
            assert hasattr(net, name), name
            setattr(net, name, value)
        yield coord, clients


async def both_ways(
    send: trio.abc.SendChannel[bytes],
    recv: trio.abc.ReceiveChannel[bytes],
    peer: IncomingStream,
    count: int,
) -> None:
    """``count`` numbered messages each way at once, then a clean end each way; each side
    must get all of them, once, in order, undamaged."""

    async def send_all(channel: trio.abc.SendChannel[bytes]) -> None:
        for n in range(count):
            await channel.send(numbered(n, varied_size(n)))
        await channel.aclose()

    async def receive_all(channel: trio.abc.ReceiveChannel[bytes], what: str) -> None:
        got = []
        async for message in channel:
            n = number(message)
            assert message == numbered(n, varied_size(n)), f"{what}: message {n} damaged"
            got.append(n)
        assert got == list(range(count)), f"{what}: {got}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all, send)
        nursery.start_soon(send_all, peer.send)
        nursery.start_soon(receive_all, peer.recv, "opener -> acceptor")
        nursery.start_soon(receive_all, recv, "acceptor -> opener")


# An hour (simulated: it costs no wall time). At 30 % loss a round trip fails half the time,
# and each failed probe doubles QUIC's wait before the next one (one probe per timeout, as
# aioquic does it): a live path can stay silent for minutes, and a connection with a short
# idle timeout dies of it now and then. This test is about what arrives, not about liveness.
LOSSY_IDLE = 3600.0


@pytest.mark.parametrize(("seed", "loss"), [(1, 0.1), (2, 0.2), (3, 0.3)])
async def test_lossy_network_delivers_every_message_once_in_order(
    autojump_clock: trio.testing.MockClock,
    fake_identity: tuple[bytes, bytes],
    seed: int,
    loss: float,
) -> None:
    async with (
        open_fake_network(seed, delay=(0.005, 0.040)) as net,
        open_fake_lab(
            net, fake_identity, idle_timeout=LOSSY_IDLE, loss=loss, reorder=0.1, duplicate=0.02
        ) as (_, clients),
    ):
        alice, bob = clients["alice"], clients["bob"]
        with trio.fail_after(2 * LOSSY_IDLE):
            proxied = await open_between(alice, bob, direct=False)
            direct = await open_between(alice, bob, direct=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(both_ways, *proxied, 150)
                nursery.start_soon(both_ways, *direct, 150)
        # The impairments were real: QUIC repaired them.
        assert net.dropped[LOST] > 0
        assert net.stats["duplicated"] > 0


@pytest.mark.parametrize("seed", [1, 2])
async def test_vanished_peer_breaks_its_streams_while_others_lose_nothing(
    autojump_clock: trio.testing.MockClock, fake_identity: tuple[bytes, bytes], seed: int
) -> None:
    idle = 4.0
    async with (
        open_fake_network(seed, delay=(0.005, 0.030)) as net,
        open_fake_lab(net, fake_identity, idle_timeout=idle, loss=0.1, reorder=0.05) as (
            coord,
            clients,
        ),
    ):
        alice, bob, carol, dave = (clients[k] for k in ("alice", "bob", "carol", "dave"))
        streams = {
            "proxied": await open_between(alice, bob, direct=False),
            "direct": await open_between(alice, bob, direct=True),
        }
        survivors = [
            await open_between(carol, dave, direct=False),
            await open_between(carol, dave, direct=True),
        ]
        # When did alice's packets last reach each host?
        last_arrival: dict[str, float] = {}

        def note_arrival(datagram: Datagram) -> bool:
            if datagram.sender[0] == ALICE_IP and datagram.final_dst is not None:
                last_arrival[datagram.final_dst[0]] = trio.current_time()
            return False  # a record, not a drop

        stop_noting = net.add_filter(note_arrival)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for survivor in survivors:
                nursery.start_soon(ping_pong, *survivor, stop)
            writers = {kind: Writer(s[0], 1000) for kind, s in streams.items()}
            readers = {kind: Reader(s[2].recv, 1000) for kind, s in streams.items()}
            for task in (*writers.values(), *readers.values()):
                nursery.start_soon(task.run)
            for reader in readers.values():
                await reader.wait_for_count(50, within=PATIENCE)

            stop_noting()
            net.block(ALICE_IP)  # alice vanishes: nothing in or out any more
            blocked_at = trio.current_time()
            with trio.fail_after(idle + 5):
                for reader in readers.values():
                    await reader.done.wait()
            for kind, reader in readers.items():
                reader.check_broken(f"bob's {kind} stream from alice")
                assert reader.broke_at is not None
                # After the idle timeout counted from the last packet of alice's that reached
                # the peer (not before), and promptly after it.
                last_heard = last_arrival[COORD_IP if kind == "proxied" else BOB_IP]
                assert reader.broke_at - last_heard >= idle - 1e-6, kind
                assert reader.broke_at - blocked_at <= idle + 3, kind
                await check_dead_ends(streams[kind][2].send, reader.recv, kind)
            # alice's side of the partition notices too: her sends break.
            with trio.fail_after(idle + 5):
                for writer in writers.values():
                    await writer.done.wait()
            for writer in writers.values():
                assert isinstance(writer.error, trio.BrokenResourceError), writer.error
            stop.set()  # the ping-pongs finish and check that nothing was lost

        await wait_for(lambda: coord.client_ids() == ["bob", "carol", "dave"], PATIENCE)
        send, recv, peer = await open_between(bob, carol, direct=False)
        with trio.fail_after(PATIENCE):
            await send.send(b"bob is still connected")
            assert await peer.recv.receive() == b"bob is still connected"
            await peer.send.send(b"so is carol")
            assert await recv.receive() == b"so is carol"
        assert net.dropped[LOST] > 0


# --- loss across real NATs (NAT lab, root only) --------------------------------------------------


@pytest.mark.natlab
def test_nat_lab_loss_streams_deliver_every_message_once_in_order(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    from natlab.lab import COORD_IP as LAB_COORD_IP
    from natlab.lab import NatLab, available, remove_stale_labs
    from natlab.test_direct_nat import Node

    ok, reason = available()
    if not ok:
        pytest.skip(f"NAT lab unavailable: {reason}")
    remove_stale_labs()
    cert, key = certs.self_signed_cert([LAB_COORD_IP])
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    count = 200
    nodes: list[Node] = []
    with NatLab(loss_percent=10) as lab:
        try:
            coord = Node(
                lab, "pub", "coord",
                ["coord", "--host", LAB_COORD_IP, "--cert", str(tmp_path / "cert.pem"),
                 "--key", str(tmp_path / "key.pem")],
                tmp_path / "coord.log",
            )  # fmt: skip
            nodes.append(coord)
            coord.expect("ready", timeout=10.0)
            common = ["client", "--coord", LAB_COORD_IP, "--ca", str(tmp_path / "cert.pem")]
            a = Node(lab, "host-a", "a", [*common, "--id", "a"], tmp_path / "a.log")
            # b does not listen: a's new_stream to b goes through the coordinator at once.
            b = Node(lab, "host-b", "b", [*common, "--id", "b", "--no-listen"], tmp_path / "b.log")
            nodes += [a, b]
            for node in (a, b):
                node.expect("connected", timeout=15.0)

            def logs() -> str:
                return "\n".join(n.log() for n in nodes)

            # Proxied: a -> coordinator -> b. Every message must come back as sent, in turn:
            # a loss, a duplicate or a swap shows as a wrong echo or a missing one.
            proxied = a.command(f"stream b {count}", timeout=30.0)
            assert "error" not in proxied, (proxied, logs())
            assert proxied["is_direct"] is False, proxied
            assert proxied["echoed"] == count, proxied
            seen = b.expect("incoming", timeout=10.0, peer="a")
            assert (seen["is_direct"], seen["echoed"], seen["error"]) == (False, count, None)

            # Direct: b dials a (a listens) through both NATs.
            direct = b.command(f"open a {count}", timeout=30.0)
            assert "error" not in direct, (direct, logs())
            assert direct["is_direct"] is True, direct
            assert direct["echoed"] == count, direct
            seen = a.expect("incoming", timeout=10.0, peer="b")
            assert (seen["is_direct"], seen["echoed"], seen["error"]) == (True, count, None)

            dropped = sum(
                packets
                for ns in ("pub", "nat-a", "nat-b")
                for comment, packets in lab.counters(ns).items()
                if comment.startswith("loss ")
            )
            assert dropped > 0  # the loss was real
            record_property(
                "timing",
                f"10% loss: {count} echoes proxied in {proxied['elapsed_ms']:.0f} ms, direct "
                f"in {direct['exchange_ms']:.0f} ms; {dropped} packets dropped",
            )
        finally:
            for node in reversed(nodes):
                node.stop()
