"""Shared fixtures: coordinators on 127.0.0.1 port 0 and clients that trust their cert.

The plain cases are conec_trio.testing's pytest plugin's fixtures (``conec_coordinator``,
``conec_client``); these add coordinators with other settings (``coord_config(**overrides)``)
and clients as ``async with`` blocks, for tests that watch what leaving one does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from helpers import ClientFactory

import conec_trio


@pytest.fixture(scope="session")
def coord_identity(conec_coordinator_identity: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """The plugin's self-signed coordinator cert, valid for localhost, 127.0.0.1 and ::1."""
    return conec_coordinator_identity


@pytest.fixture
def coord_config(coord_identity: tuple[bytes, bytes]) -> Callable[..., conec_trio.CoordConfig]:
    def make(**overrides: Any) -> conec_trio.CoordConfig:
        cert, key = coord_identity
        options: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
        options.update(overrides)
        return conec_trio.CoordConfig(cert_chain=cert, private_key=key, **options)

    return make


@pytest.fixture
def coord(conec_coordinator: conec_trio.Coordinator) -> conec_trio.Coordinator:
    """A running coordinator with default settings: the plugin's ``conec_coordinator``."""
    return conec_coordinator


@pytest.fixture
def client_config(
    coord_identity: tuple[bytes, bytes],
) -> Callable[..., conec_trio.ClientConfig]:
    """``client_config(coord, "alice", **overrides)``: a config that reaches ``coord``."""

    def make(
        coordinator: conec_trio.Coordinator, client_id: str, **overrides: Any
    ) -> conec_trio.ClientConfig:
        options: dict[str, Any] = {
            "coord_host": "127.0.0.1",
            "coord_port": coordinator.address[1],
            "ca": coord_identity[0],
        }
        options.update(overrides)
        return conec_trio.ClientConfig(id=client_id, **options)

    return make


@pytest.fixture
def open_client(client_config: Callable[..., conec_trio.ClientConfig]) -> ClientFactory:
    """``async with open_client(coord, "alice") as alice: ...``"""

    @asynccontextmanager
    async def make(
        coordinator: conec_trio.Coordinator, client_id: str, **overrides: Any
    ) -> AsyncIterator[conec_trio.Client]:
        async with conec_trio.open_client(client_config(coordinator, client_id, **overrides)) as c:
            yield c

    return make
