"""``conec-trio ping``: round trips to a peer's library, like ``tailscale ping``."""

from __future__ import annotations

import argparse
from typing import Any

import trio

from .. import ConecError, Path, PeerNotFoundError, open_client
from ..forward import parse_client_id
from ..forward.console import error, format_address, say, setup_logging
from .common import add_client_options, argtype, client_config

__all__ = ["add_ping_command", "run_ping"]

# How long one ping may take before it counts as lost.
PING_TIMEOUT = 5.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be a positive number, not {text}")
    return value


def add_ping_command(subparsers: Any) -> None:
    """Register ``conec-trio ping``."""
    parser = subparsers.add_parser(
        "ping",
        help="round trips to a peer, showing the path they take",
        description="Connect as client NAME, try to open a direct channel to PEER in the "
        "background, and send COUNT pings, one per interval. Each is answered by PEER's "
        "library (no application code), over the direct channel once it is up, else through "
        "the coordinator. One line per round trip: the time and the path (the peer's "
        "address when direct). Exit status 0 if any ping was answered.",
    )
    parser.add_argument("peer", metavar="PEER", type=argtype(parse_client_id))
    parser.add_argument(
        "-c", "--count", type=argtype(_positive_int), default=5, metavar="N", help="default 5"
    )
    parser.add_argument(
        "-i",
        "--interval",
        type=argtype(_positive_float),
        default=1.0,
        metavar="SECONDS",
        help="between pings (default 1)",
    )
    add_client_options(parser)
    parser.set_defaults(run=run_ping)


def run_ping(args: argparse.Namespace) -> int:
    """``conec-trio ping``: returns the exit status."""
    setup_logging(args.verbose)
    try:
        config = client_config(args)
    except (ValueError, ConecError) as exc:
        return error(str(exc))
    try:
        answered = trio.run(_ping, config, args.peer, args.count, args.interval)
    except ConecError as exc:
        return error(str(exc))
    except KeyboardInterrupt:
        return 130
    return 0 if answered else 1


async def _ping(config: Any, peer: str, count: int, interval: float) -> int:
    answered = 0
    async with open_client(config) as client, trio.open_nursery() as nursery:

        async def open_channel() -> None:
            try:
                await client.new_channel(peer)
            except ConecError as exc:
                say(f"no direct path to {peer}, pings go through the coordinator: {exc}")

        nursery.start_soon(open_channel)
        for i in range(count):
            if i:
                await trio.sleep(interval)
            with trio.move_on_after(PING_TIMEOUT):
                try:
                    result = await client.ping(peer)
                except PeerNotFoundError as exc:
                    error(str(exc))
                    break
                if result.path is Path.DIRECT:
                    channel = client.statistics().channels.get(peer)
                    where = format_address(*channel.address) if channel else "the channel"
                    via = f"via {where} (direct)"
                else:
                    via = "via the coordinator"
                say(f"pong from {peer} {via} in {result.rtt * 1000:.1f} ms")
                answered += 1
                continue
            say(f"ping {i + 1} to {peer}: no answer within {PING_TIMEOUT:g} s")
        nursery.cancel_scope.cancel()
    return answered
