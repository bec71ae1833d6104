"""Staying connected: a client reconnects by itself after losing the coordinator, its direct
channels go on meanwhile, and the coordinator takes a returning client back at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import wait_for
from test_faults import READY, Program, coord_argv, run_program

import conec_trio
from conec_trio import certs

DEADLINE = 10.0
BACK_WITHIN = 2.0  # seconds from the coordinator's return to every client connected again


class Stop:
    """``set()`` stops a coordinator; ``stopped`` is set once its port is free again."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.stopped = trio.Event()

    def set(self) -> None:
        self.requested.set()


async def run_coordinator(
    config: conec_trio.CoordConfig,
    stop: Stop,
    *,
    task_status: trio.TaskStatus[conec_trio.Coordinator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A coordinator in its own task, so that a test can stop it and start another: ``stop``
    is set again once its socket is closed."""
    async with conec_trio.open_coordinator(config) as coord:
        task_status.started(coord)
        await stop.requested.wait()
    stop.stopped.set()


class NumberedFlow:
    """Numbered messages on one stream until ``stop``, then a clean end; the reader checks
    that none is lost, duplicated or reordered."""

    def __init__(self, send: trio.abc.SendChannel[bytes], recv: trio.abc.ReceiveChannel[bytes]):
        self.send, self.recv = send, recv
        self.back: trio.abc.ReceiveChannel[bytes] | None = None  # the sender's receive end
        self.sent = 0
        self.received = 0
        self.stop = trio.Event()

    async def write(self) -> None:
        while not self.stop.is_set():
            await self.send.send(self.sent.to_bytes(8, "big") + b"x" * 500)
            self.sent += 1
            if self.sent % 16 == 0:
                await trio.sleep(0.001)  # a steady flow, not a flood
        await self.send.aclose()

    async def read(self) -> None:
        async for message in self.recv:
            n = int.from_bytes(message[:8], "big")
            assert n == self.received, f"got message {n}, expected {self.received}"
            self.received += 1

    async def flows(self, more: int = 50) -> None:
        """Wait until ``more`` further messages arrived."""
        target = self.received + more
        await wait_for(lambda: self.received >= target, timeout=DEADLINE)


async def direct_and_proxied(
    alice: conec_trio.Client, bob: conec_trio.Client
) -> tuple[NumberedFlow, Any, Any]:
    """A numbered flow alice -> bob on a direct stream, and a proxied stream's two ends."""
    with trio.fail_after(DEADLINE):
        await alice.new_channel("bob")
        dsend, drecv = await alice.new_direct_stream("bob")
        await dsend.send(b"")
        direct_in = await bob.incoming_streams.receive()
        assert await direct_in.recv.receive() == b""
        psend, precv = await alice.new_proxied_stream("bob")
        await psend.send(b"hi")
        proxied_in = await bob.incoming_streams.receive()
        assert await proxied_in.recv.receive() == b"hi"
    flow = NumberedFlow(dsend, direct_in.recv)
    flow.back = drecv
    return flow, precv, proxied_in.recv


async def echo_to_itself(client: conec_trio.Client) -> None:
    """A proxied stream from ``client`` to itself carries a message (its incoming_streams
    work)."""
    send, _ = await client.new_proxied_stream(client.id)
    await send.send(b"ping")
    incoming = await client.incoming_streams.receive()
    assert await incoming.recv.receive() == b"ping"


async def test_direct_stream_flows_through_a_coordinator_restart(
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
) -> None:
    stop_first, stop_second = Stop(), Stop()
    async with trio.open_nursery() as nursery:
        coord = await nursery.start(run_coordinator, coord_config(), stop_first)
        port = coord.address[1]
        async with (
            conec_trio.open_client(client_config(coord, "alice")) as alice,
            conec_trio.open_client(client_config(coord, "bob")) as bob,
        ):
            flow, proxied_out, proxied_in = await direct_and_proxied(alice, bob)
            async with trio.open_nursery() as streams:
                streams.start_soon(flow.write)
                streams.start_soon(flow.read)
                await flow.flows()

                stop_first.set()
                await wait_for(lambda: not alice.connected and not bob.connected)
                with trio.fail_after(DEADLINE):
                    await stop_first.stopped.wait()
                # Streams through the coordinator break; the direct one goes on.
                with trio.fail_after(DEADLINE):
                    for end in (proxied_out, proxied_in):
                        with pytest.raises(trio.BrokenResourceError):
                            await end.receive()
                call_done = trio.Event()

                async def call_during_the_outage() -> None:
                    await echo_to_itself(alice)
                    call_done.set()

                streams.start_soon(call_during_the_outage)
                await flow.flows()
                assert not call_done.is_set()
                assert "bob" in alice.statistics().channels

                await nursery.start(run_coordinator, coord_config(port=port), stop_second)
                returned = trio.current_time()
                with trio.fail_after(BACK_WITHIN):
                    await alice.wait_connected()
                    await bob.wait_connected()
                print(f"back {trio.current_time() - returned:.3f} s after the coordinator")
                with trio.fail_after(DEADLINE):
                    await call_done.wait()
                await flow.flows()
                flow.stop.set()
            assert flow.received == flow.sent
            # New streams through the new coordinator work.
            with trio.fail_after(DEADLINE):
                psend, _ = await bob.new_proxied_stream("alice")
                await psend.send(b"again")
                incoming = await alice.incoming_streams.receive()
                assert await incoming.recv.receive() == b"again"
        stop_second.set()


@asynccontextmanager
async def coord_program_with_alice_and_bob(
    state_dir: Path, **options: Any
) -> AsyncIterator[tuple[Program, int, conec_trio.Client, conec_trio.Client]]:
    """``conec-trio coord`` (its state in ``state_dir``) and clients alice and bob on it."""
    async with run_program("coord", coord_argv(0, state_dir)) as coord:
        ca = (await coord.expect(r"clients pass --ca (.+)"))[1]
        port = int((await coord.expect(READY))[1])

        def config(client_id: str) -> conec_trio.ClientConfig:
            return conec_trio.ClientConfig(
                id=client_id, coord_host="127.0.0.1", coord_port=port, ca=ca, **options
            )

        async with (
            conec_trio.open_client(config("alice")) as alice,
            conec_trio.open_client(config("bob")) as bob,
        ):
            yield coord, port, alice, bob


async def test_direct_stream_flows_while_the_coordinator_process_is_killed(
    tmp_path: Path,
) -> None:
    # Default settings: a killed coordinator says nothing, and its successor (same key)
    # answers the clients' next packets with stateless resets (and sends one at once to the
    # clients its predecessor noted), long before their idle timeout (10 s). Calls made
    # during the outage keep both clients sending.
    state_dir = tmp_path / "coord-state"
    async with coord_program_with_alice_and_bob(state_dir) as (coord, port, alice, bob):
        assert alice.config.idle_timeout is None  # the library's default applies
        flow, proxied_out, _ = await direct_and_proxied(alice, bob)
        async with trio.open_nursery() as streams:
            streams.start_soon(flow.write)
            streams.start_soon(flow.read)
            await flow.flows()
            await coord.kill()
            bob_call, alice_call = trio.Event(), trio.Event()

            async def bob_calls_during_the_outage() -> None:
                await echo_to_itself(bob)
                bob_call.set()

            async def alice_calls_during_the_outage() -> None:
                await echo_to_itself(alice)
                alice_call.set()

            streams.start_soon(bob_calls_during_the_outage)
            streams.start_soon(alice_calls_during_the_outage)
            await flow.flows()
            assert not bob_call.is_set()
            assert not alice_call.is_set()
            async with run_program("coord again", coord_argv(port, state_dir)) as again:
                await again.expect(READY)
                with trio.fail_after(BACK_WITHIN):
                    with pytest.raises(trio.BrokenResourceError):
                        await proxied_out.receive()
                    await bob_call.wait()
                    await alice_call.wait()
                assert alice.connected
                assert bob.connected
                await flow.flows()
                flow.stop.set()
        assert flow.received == flow.sent


async def test_a_crashed_coordinators_successor_tells_its_clients_at_once(
    tmp_path: Path,
) -> None:
    # The clients' keepalive comes only every 30 s: without the restart notes (written by
    # `coord` in its state dir), idle clients would not notice the crash for that long.
    state_dir = tmp_path / "coord-state"
    notes = state_dir / "clients"

    def noted() -> int:
        return len(notes.read_text().splitlines()) if notes.exists() else 0

    clients = coord_program_with_alice_and_bob(state_dir, idle_timeout=60.0)
    async with clients as (coord, port, alice, bob):
        await wait_for(lambda: noted() == 2, timeout=DEADLINE)
        await coord.kill()
        # nobody told them yet
        assert alice.connected
        assert bob.connected
        async with run_program("coord again", coord_argv(port, state_dir)) as again:
            await again.expect(READY)
            with trio.fail_after(BACK_WITHIN):
                await wait_for(lambda: not alice.connected and not bob.connected)
                await alice.wait_connected()
                await bob.wait_connected()
            await echo_to_itself(alice)
            await wait_for(lambda: noted() == 2, timeout=DEADLINE)
            # A clean stop tells every client itself: it leaves its notes empty.
            assert await again.stop() == 0
            assert noted() == 0


def fixed_identity(client_id: str) -> dict[str, bytes]:
    cert, key = certs.self_signed_cert([client_id])
    return {"cert_chain": cert, "private_key": key}


async def test_same_id_and_certificate_replace_the_stale_session_at_once(
    coord: conec_trio.Coordinator, client_config: Callable[..., conec_trio.ClientConfig]
) -> None:
    identity = fixed_identity("alice")
    async with conec_trio.open_client(client_config(coord, "alice", **identity)) as old:
        # The coordinator still holds the old connection: the same id and certificate
        # connect again (as after a network change) and are let in at once.
        with trio.fail_after(DEADLINE):
            async with conec_trio.open_client(client_config(coord, "alice", **identity)) as new:
                assert coord.client_ids() == ["alice"]
                await echo_to_itself(new)
                # The replaced connection was not stale here: it stops reconnecting, so two
                # processes with one identity do not take turns.
                with pytest.raises(conec_trio.IdInUseError):
                    await old.wait_connected()
                assert not old.connected
                assert new.connected
                assert coord.client_ids() == ["alice"]


async def test_another_certificate_under_a_connected_id_is_refused(
    coord: conec_trio.Coordinator, client_config: Callable[..., conec_trio.ClientConfig]
) -> None:
    async with conec_trio.open_client(client_config(coord, "alice")) as alice:
        with trio.fail_after(DEADLINE), pytest.raises(conec_trio.IdInUseError):
            async with conec_trio.open_client(client_config(coord, "alice")):
                pass  # pragma: no cover
        assert alice.connected
        await echo_to_itself(alice)


def silence(client: conec_trio.Client) -> None:
    """Make ``client`` vanish as a killed process does: nothing it sends leaves any more."""
    sock: Any = client._socket.sock  # type: ignore[union-attr]
    sock.sendto_nowait = lambda data, addr: True
    sock.send_batch_nowait = lambda datagrams, start: len(datagrams) - start


async def test_a_peer_back_with_another_certificate_closes_its_stale_channel_at_once(
    coord: conec_trio.Coordinator, client_config: Callable[..., conec_trio.ClientConfig]
) -> None:
    async with (
        conec_trio.open_client(client_config(coord, "alice")) as alice,
        conec_trio.open_client(client_config(coord, "bob")) as old_bob,
    ):
        flow, _, _ = await direct_and_proxied(alice, old_bob)
        assert flow.back is not None
        silence(old_bob)
        # The coordinator forgets the dead process (as at its idle timeout); the direct
        # channel would only time out after its own idle timeout (10 s).
        coord._clients["bob"].conn.close(0, "gone")
        await wait_for(lambda: coord.client_ids() == ["alice"])
        async with conec_trio.open_client(client_config(coord, "bob")) as new_bob:
            # Alice heard at once that bob has another certificate now: her channel to
            # the dead process closed, and its streams broke.
            with trio.fail_after(2.0), pytest.raises(trio.BrokenResourceError):
                await flow.back.receive()
            assert "bob" not in alice.statistics().channels
            # A channel to the new bob opens.
            with trio.fail_after(DEADLINE):
                await alice.new_channel("bob")
                send, _ = await alice.new_direct_stream("bob")
                await send.send(b"hello new bob")
                incoming = await new_bob.incoming_streams.receive()
                assert await incoming.recv.receive() == b"hello new bob"


async def test_an_incurable_refusal_stops_reconnecting_and_surfaces_from_wait_connected(
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
) -> None:
    stop_first, stop_second = Stop(), Stop()
    ca_pem, _ = certs.make_ca()
    async with trio.open_nursery() as nursery:
        coord = await nursery.start(run_coordinator, coord_config(), stop_first)
        port = coord.address[1]
        async with conec_trio.open_client(client_config(coord, "alice")) as alice:
            assert alice.connected
            await alice.wait_connected()  # at once
            stop_first.set()
            await wait_for(lambda: not alice.connected)
            with trio.fail_after(DEADLINE):
                await stop_first.stopped.wait()
            # The new coordinator demands certificates from a CA: alice's is self-signed.
            strict = coord_config(port=port, client_ca=ca_pem)
            await nursery.start(run_coordinator, strict, stop_second)
            with trio.fail_after(DEADLINE), pytest.raises(conec_trio.CertificateError):
                await alice.wait_connected()
            # From then on: as with reconnect=False.
            with trio.fail_after(DEADLINE):
                with pytest.raises(conec_trio.DisconnectedError):
                    await alice.new_proxied_stream("alice")
                with pytest.raises(trio.BrokenResourceError):
                    await alice.incoming_streams.receive()
                with pytest.raises(conec_trio.CertificateError):
                    await alice.wait_connected()
        stop_second.set()


async def test_wait_connected_with_reconnect_off_raises_disconnected_after_a_loss(
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
) -> None:
    stop = Stop()
    async with trio.open_nursery() as nursery:
        coord = await nursery.start(run_coordinator, coord_config(), stop)
        async with conec_trio.open_client(client_config(coord, "alice", reconnect=False)) as alice:
            await alice.wait_connected()
            stop.set()
            await wait_for(lambda: not alice.connected)
            with trio.fail_after(DEADLINE), pytest.raises(conec_trio.DisconnectedError):
                await alice.wait_connected()


async def test_leaving_while_a_reconnect_resolves_the_coordinator_raises_nothing(
    coord_config: Callable[..., conec_trio.CoordConfig],
    client_config: Callable[..., conec_trio.ClientConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # trio resumes a task from a shielded checkpoint (the one after resolving a host) even
    # if its scope was cancelled meanwhile: the reconnect then dials from a socket whose
    # endpoint has closed. That must end the reconnect, not crash the block's exit.
    stop = Stop()
    resolve = trio.socket.getaddrinfo
    async with trio.open_nursery() as nursery:
        coord = await nursery.start(run_coordinator, coord_config(), stop)
        with trio.CancelScope() as leave:
            async with conec_trio.open_client(client_config(coord, "alice")) as alice:

                async def resolve_while_the_block_is_left(*args: Any, **kwargs: Any) -> Any:
                    result = await resolve(*args, **kwargs)
                    leave.cancel()
                    with trio.CancelScope(shield=True):
                        # until the client's other tasks have gone as far as they can: its
                        # endpoint's tasks have ended
                        await trio.testing.wait_all_tasks_blocked()
                    return result

                monkeypatch.setattr(trio.socket, "getaddrinfo", resolve_while_the_block_is_left)
                stop.set()  # alice loses the coordinator and reconnects after a backoff
                await trio.sleep_forever()
        assert leave.cancelled_caught
        assert not alice.connected
