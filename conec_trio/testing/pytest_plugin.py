"""A pytest plugin for testing code that uses conec_trio, with pytest-trio.

pytest loads it by itself once conec-trio is installed (a ``pytest11`` entry point); with
plugin autoloading off, load it with ``-p conec_trio.testing.pytest_plugin``. Its fixtures
are for Trio tests (``@pytest.mark.trio``, or ``trio_mode = true``)::

    async def test_hello(conec_coordinator, conec_client):
        alice = await conec_client("alice")
        bob = await conec_client("bob", listen=False)
        send, recv = await alice.new_proxied_stream("bob")
        await send.send(b"hello")
        incoming = await bob.incoming_streams.receive()
        assert await incoming.recv.receive() == b"hello"

- ``conec_coordinator``: a running coordinator on 127.0.0.1, on a free port, with a
  throwaway self-signed certificate: the ``Coordinator`` that ``open_coordinator`` yields.
- ``conec_client``: ``await conec_client("alice", **overrides)`` returns a ``Client``
  connected to that coordinator; ``overrides`` are ``ClientConfig`` fields. Every client it
  made is closed when the test ends.
- ``conec_coordinator_config``: the ``CoordConfig`` the coordinator runs with. Override it
  (a fixture of that name in your conftest.py or test module, which may take this one as an
  argument and ``dataclasses.replace`` it) to test against other limits or a client CA.
- ``conec_coordinator_identity``: ``(cert_pem, key_pem)`` of the coordinator, made once per
  session, valid for localhost, 127.0.0.1 and ::1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import pytest
import trio

import conec_trio
from conec_trio import certs

__all__ = [
    "ClientFactory",
    "conec_client",
    "conec_coordinator",
    "conec_coordinator_config",
    "conec_coordinator_identity",
]


class ClientFactory(Protocol):
    """The ``conec_client`` fixture: ``await conec_client("alice", **overrides)``."""

    def __call__(self, client_id: str, /, **overrides: Any) -> Awaitable[conec_trio.Client]:
        """Connect a client with id ``client_id`` to the test's coordinator and return it.

        ``overrides`` are ``ClientConfig`` fields (``listen=False``, ``idle_timeout=2``, ...);
        the coordinator's address and certificate are filled in unless given. A failure to
        connect raises here, as from ``open_client`` (a ``ConecError`` subclass, such as
        ``IdInUseError`` for an id already connected). The client stays open until the test
        ends, when it is closed like leaving an ``open_client`` block.
        """
        ...


@pytest.fixture(scope="session")
def conec_coordinator_identity() -> tuple[bytes, bytes]:
    """A throwaway self-signed certificate and key (PEM) for the test coordinator, valid for
    localhost, 127.0.0.1 and ::1: made once per test session."""
    return certs.self_signed_cert(["localhost", "127.0.0.1", "::1"])


@pytest.fixture
def conec_coordinator_config(
    conec_coordinator_identity: tuple[bytes, bytes],
) -> conec_trio.CoordConfig:
    """How ``conec_coordinator`` runs: on 127.0.0.1, port 0 (a free port), with
    ``conec_coordinator_identity`` and default settings otherwise. Override this fixture
    to run the coordinator differently."""
    cert, key = conec_coordinator_identity
    return conec_trio.CoordConfig(cert_chain=cert, private_key=key, host="127.0.0.1", port=0)


@pytest.fixture
async def conec_coordinator(
    conec_coordinator_config: conec_trio.CoordConfig,
) -> AsyncIterator[conec_trio.Coordinator]:
    """A coordinator running in this process for the test (see ``conec_coordinator_config``);
    it closes, with every client's connection, when the test ends."""
    async with conec_trio.open_coordinator(conec_coordinator_config) as coordinator:
        yield coordinator


async def _run_client(
    config: conec_trio.ClientConfig,
    test_over: trio.Event,
    *,
    task_status: trio.TaskStatus[conec_trio.Client] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with conec_trio.open_client(config) as client:
        task_status.started(client)
        await test_over.wait()


@pytest.fixture
async def conec_client(
    conec_coordinator: conec_trio.Coordinator,
    conec_coordinator_identity: tuple[bytes, bytes],
) -> AsyncIterator[ClientFactory]:
    """``await conec_client("alice", **overrides)``: a connected ``Client`` of
    ``conec_coordinator`` (see ``ClientFactory``); all of them close when the test ends."""
    # pytest-trio runs each fixture in a task of its own: a client's open_client block (and
    # so its nursery) must be entered and left in one task, here one per client.
    test_over = trio.Event()
    host, port = conec_coordinator.address[:2]
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"  # bound to every address: reach it by the name its cert is for

    async with trio.open_nursery() as nursery:

        async def connect(client_id: str, /, **overrides: Any) -> conec_trio.Client:
            options: dict[str, Any] = {
                "coord_host": host,
                "coord_port": port,
                "ca": conec_coordinator_identity[0],
            }
            options.update(overrides)
            config = conec_trio.ClientConfig(id=client_id, **options)
            client: conec_trio.Client = await nursery.start(_run_client, config, test_over)
            return client

        yield connect
        test_over.set()  # every client leaves its block at once, closing gracefully
