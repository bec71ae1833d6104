"""``conec-trio status``: the coordinator's view, as a client sees it.

Connects as a short-lived client (a random id unless ``--id``), and prints where the
coordinator sees this machine (its public address, behind a NAT), the clients connected, and
the broadcast channels with their members.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable
from typing import Any

import trio

from .. import BroadcastNotFoundError, ClientConfig, ConecError, open_client
from ..forward.console import error, setup_logging
from ..forward.link import probing_the_port
from .common import add_client_options, client_config

__all__ = ["add_status_command", "run_status"]


def add_status_command(subparsers: Any) -> None:
    """Register ``conec-trio status``."""
    parser = subparsers.add_parser(
        "status",
        help="show the coordinator's view: clients, broadcast channels, this machine's "
        "public address",
        description="Connect to the coordinator as a short-lived client and print the "
        "address it sees this machine at (the public address, behind a NAT), the clients "
        "connected now and the broadcast channels with their senders and receivers.",
    )
    add_client_options(parser, id_required=False)
    parser.set_defaults(run=run_status)


def run_status(args: argparse.Namespace) -> int:
    """``conec-trio status``: returns the exit status."""
    setup_logging(args.verbose)
    if args.id is None:
        args.id = f"status-{secrets.token_hex(4)}"
    args.no_listen = True  # it takes no direct channels
    try:
        config = client_config(args)
    except (ValueError, ConecError) as exc:
        return error(str(exc))
    try:
        for line in trio.run(coordinator_view, config):
            print(line, flush=True)
    except ConecError as exc:
        return error(str(exc))
    return 0


async def coordinator_view(config: ClientConfig) -> list[str]:
    """The lines ``status`` prints; a coordinator port nobody listens on is said at once."""
    async with probing_the_port(config) as connected:
        return await _query(config, connected)


async def _query(config: ClientConfig, connected: Callable[[], None]) -> list[str]:
    async with open_client(config) as client:
        connected()
        seen = client.statistics().observed_address
        peers = sorted(await client.list_peers())
        channels: list[tuple[str, frozenset[str], frozenset[str]]] = []
        for name in sorted(await client.list_broadcasts()):
            try:
                senders, receivers = await client.broadcast_members(name)
            except BroadcastNotFoundError:
                continue  # gone since the list was made
            channels.append((name, senders, receivers))
    where = f"{config.coord_host}:{config.coord_port}"
    here = "an unknown address" if seen is None else f"{seen[0]}:{seen[1]}"
    lines = [f"coordinator {where} sees this machine at {here}"]
    shown = [f"{p} (this status query)" if p == client.id else p for p in peers]
    lines.append(f"{len(peers)} client(s): {', '.join(shown)}")
    lines.append(f"{len(channels)} broadcast channel(s)" + (":" if channels else ""))
    for name, senders, receivers in channels:
        lines.append(
            f"  {name}: senders {', '.join(sorted(senders)) or '-'}; "
            f"receivers {', '.join(sorted(receivers)) or '-'}"
        )
    return lines
