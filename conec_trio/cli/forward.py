"""``conec-trio forward``: the command line of :class:`conec_trio.forward.Forwarder`."""

from __future__ import annotations

import argparse
from typing import Any

from .. import ConecError
from ..forward import Forwarder, Mapping, parse_mapping
from ..forward.addresses import check_local_ports
from ..forward.console import error, say, setup_logging
from .common import add_client_options, argtype, client_config, run_until_signal

__all__ = ["add_forward_command", "run_forward"]


def add_forward_command(subparsers: Any) -> None:
    """Register ``conec-trio forward``."""
    parser = subparsers.add_parser(
        "forward",
        help="forward local TCP ports to targets behind other clients",
        description="Listen on 127.0.0.1:LOCAL_PORT for each mapping; each TCP connection "
        "becomes one stream to PEER (direct when a channel can be made, else through the "
        "coordinator), whose 'conec-trio expose' connects it to TARGET_HOST:TARGET_PORT. "
        "Bytes flow both ways until both sides closed, half-close included. The coordinator "
        "is retried with backoff at start and after any loss; meanwhile new TCP connections "
        "are closed at once. Prints 'listening on 127.0.0.1:PORT for PEER -> TARGET' for each "
        "mapping once listening (LOCAL_PORT 0 picks a free port), then 'waiting for the "
        "coordinator at HOST:PORT ...', then 'connected to the coordinator ...' once it is. "
        "Ctrl-C exits with status 0.",
    )
    parser.add_argument(
        "mappings",
        nargs="+",
        metavar="LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT",
        type=argtype(parse_mapping),
    )
    add_client_options(parser)
    parser.set_defaults(run=run_forward)


def run_forward(args: argparse.Namespace) -> int:
    """``conec-trio forward``: returns the exit status."""
    setup_logging(args.verbose)
    try:
        check_local_ports(args.mappings)
        config = client_config(args)
    except (ValueError, ConecError) as exc:
        return error(str(exc))
    forwarder = Forwarder(config, args.mappings)

    def started(bound: list[tuple[Mapping, int]]) -> None:
        for mapping, port in bound:
            say(f"listening on 127.0.0.1:{port} for {mapping.peer} -> {mapping.target}")
        if forwarder.link.current is None:
            say(f"waiting for the coordinator at {forwarder.link.where} ...")

    return run_until_signal(forwarder.run, "forward", started)
