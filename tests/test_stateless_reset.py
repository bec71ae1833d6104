"""Stateless resets (RFC 9000 section 10.3): a server restarted with the same key tells its
predecessor's clients at once that their connection is gone; its answers are smaller than
what caused them, rate-limited, and a reset with the wrong token changes nothing."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from conec_trio import _tls, certs
from conec_trio._quic import (
    ConnectionSettings,
    Identity,
    QuicConn,
    QuicEndpoint,
    make_udp_socket,
    stateless_reset_key,
)
from conec_trio._quic._endpoint import LARGEST_STATELESS_RESET
from conec_trio._quic._reset import stateless_reset_token
from conec_trio._util import TokenBucket

DEADLINE = 10.0
IDLE = 30.0  # far beyond every wait here: a close seen comes from the reset


def identity(name: str) -> Identity:
    cert_pem, key_pem = certs.self_signed_cert([name])
    chain = _tls.load_cert_chain_pem(cert_pem)
    return Identity(chain[0], tuple(chain[1:]), _tls.load_private_key(key_pem))


SERVER = identity("server")
KEY = stateless_reset_key(SERVER.private_key)


def settings(who: Identity, reset_key: bytes | None = None) -> ConnectionSettings:
    return ConnectionSettings(
        alpn="reset-test",
        idle_timeout=IDLE,
        stream_window=1 << 16,
        connection_window=1 << 20,
        max_streams=10,
        identity=who,
        reset_key=reset_key,
    )


@asynccontextmanager
async def server(port: int = 0) -> AsyncIterator[QuicEndpoint]:
    """A server endpoint with SERVER's key. On leaving, its socket closes before anything
    else, as when the process is killed: its connections say nothing."""
    sock = make_udp_socket(socket.AF_INET, "127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            endpoint = QuicEndpoint(sock, nursery)
            endpoint.accept_connections(lambda: settings(SERVER, KEY), lambda conn: None)
            await nursery.start(endpoint.run)
            yield endpoint
            sock.close()
            nursery.cancel_scope.cancel()
    finally:
        sock.close()


@asynccontextmanager
async def client_to(address: tuple[str, int]) -> AsyncIterator[QuicConn]:
    sock = make_udp_socket(socket.AF_INET, "127.0.0.1", 0)
    try:
        async with trio.open_nursery() as nursery:
            endpoint = QuicEndpoint(sock, nursery)
            await nursery.start(endpoint.run)
            conn = endpoint.connect(address, settings(identity("client")))
            with trio.fail_after(DEADLINE):
                await conn.settled.wait()
            assert conn.is_open
            yield conn
            nursery.cancel_scope.cancel()
    finally:
        sock.close()


def short_header(cid: bytes, size: int, tail: bytes = b"") -> bytes:
    body = os.urandom(size - 1 - len(cid) - len(tail))
    return bytes([0x40 | (os.urandom(1)[0] & 0x3F)]) + cid + body + tail


async def run_server_until(
    killed: trio.Event, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    async with server() as endpoint:
        task_status.started(endpoint.local_address[1])
        await killed.wait()


async def test_a_server_restarted_with_the_same_key_resets_its_predecessors_connections() -> None:
    async with trio.open_nursery() as nursery:
        killed = trio.Event()
        port = await nursery.start(run_server_until, killed)
        async with client_to(("127.0.0.1", port)) as conn:
            peer_cid = conn.quic._peer_cid
            # derived, not random: the successor can make the same token
            assert peer_cid.stateless_reset_token == stateless_reset_token(KEY, peer_cid.cid)
            killed.set()  # its socket closes first: not a word to the client
            await trio.testing.wait_all_tasks_blocked()
            assert conn.is_open
            conn.send_stream_data(conn.next_stream_id(), b"anyone there?")
            async with server(port):
                with trio.fail_after(2.0):
                    await conn.closed.wait()
            assert "stateless reset" in conn.close_reason


async def test_a_reset_with_the_wrong_token_is_ignored() -> None:
    async with server() as endpoint, client_to(endpoint.local_address) as conn:
        now = trio.current_time()
        address = endpoint.local_address
        wrong_key = stateless_reset_key(identity("mallory").private_key)
        cid = conn.quic._peer_cid.cid
        for forged_token in (stateless_reset_token(wrong_key, cid), os.urandom(16)):
            conn.datagram_received(short_header(os.urandom(8), 40, forged_token), address, now)
            conn.process_events()
            assert conn.is_open
        # the right token closes it: the forged ones did reach the check
        genuine = short_header(os.urandom(8), 40, stateless_reset_token(KEY, cid))
        conn.datagram_received(genuine, address, now)
        conn.process_events()
        assert not conn.is_open


async def replies_to(
    endpoint: QuicEndpoint, datagrams: list[bytes], sentinel_cid: bytes
) -> list[bytes]:
    """Send ``datagrams`` to ``endpoint`` from a plain socket, then one that is answered
    (``sentinel_cid``); return what came back before the sentinel's answer (datagrams are
    handled in order, so nothing answered later belongs to ``datagrams``)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        for data in [*datagrams, short_header(sentinel_cid, 100)]:
            await sock.sendto(data, endpoint.local_address)
        sentinel_token = stateless_reset_token(KEY, sentinel_cid)
        replies = []
        with trio.fail_after(DEADLINE):
            while True:
                reply = await sock.recv(2048)
                if reply.endswith(sentinel_token):
                    return replies
                replies.append(reply)


async def test_the_server_answers_unknown_ids_with_fewer_bytes_than_it_got() -> None:
    async with server() as endpoint:
        sizes = [20, 21, 22, 30, 43, 44, 45, 100, 1200]
        cids = {size: os.urandom(8) for size in sizes}
        datagrams = [short_header(cids[size], size) for size in sizes]
        reflected_cid = os.urandom(8)
        reflected = short_header(reflected_cid, 40, stateless_reset_token(KEY, reflected_cid))
        replies = await replies_to(endpoint, [*datagrams, reflected], os.urandom(8))
        by_token = {reply[-16:]: reply for reply in replies}
        assert len(by_token) == len(replies)
        for size, cid in cids.items():
            reply = by_token.pop(stateless_reset_token(KEY, cid), None)
            if size <= 21:
                assert reply is None, f"answered a {size}-byte datagram"
                continue
            assert reply is not None, f"no reset for a {size}-byte datagram"
            assert 21 <= len(reply) < size
            assert len(reply) <= LARGEST_STATELESS_RESET
            assert reply[0] & 0xC0 == 0x40  # it looks like any short-header packet
        assert by_token == {}  # nothing for the reflected reset either


async def test_resets_are_rate_limited() -> None:
    async with server() as endpoint:
        endpoint.reset_budget = TokenBucket(rate=0.0, burst=5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            for _ in range(50):
                sock.sendto(short_header(os.urandom(8), 60), endpoint.local_address)
            # loopback delivers at once: once the endpoint is idle it has read all 50
            await trio.testing.wait_all_tasks_blocked()
            answered = []
            while True:
                try:
                    answered.append(sock.recv(2048))
                except BlockingIOError:
                    break
        assert len(answered) == 5
