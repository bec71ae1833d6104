"""``conec-trio expose``: the command line of :class:`conec_trio.forward.Exposer`."""

from __future__ import annotations

import argparse
from typing import Any

from .. import ConecError
from ..forward import Exposer, parse_client_id, parse_host_port
from ..forward.console import error, say, setup_logging
from .common import add_client_options, argtype, client_config, run_until_signal

__all__ = ["add_expose_command", "run_expose"]


def add_expose_command(subparsers: Any) -> None:
    """Register ``conec-trio expose``."""
    parser = subparsers.add_parser(
        "expose",
        help="connect forwarding streams from other clients to local TCP targets",
        description="The server side of TCP port forwarding: accept streams from "
        "'conec-trio forward' clients (only the --peer ones, if any are given) and connect "
        "each to its target if --allow lists it (the same host name and port, exactly); "
        "anything else is refused with a reason the forwarding side logs. The coordinator "
        "is retried with backoff at start and after any loss. Ctrl-C exits with status 0.",
    )
    parser.add_argument(
        "--allow",
        action="append",
        required=True,
        metavar="HOST:PORT",
        type=argtype(parse_host_port),
        help="a target peers may reach (repeatable)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME",
        type=argtype(parse_client_id),
        help="a client id that may use this exposer (repeatable; default: any client)",
    )
    add_client_options(parser)
    parser.set_defaults(run=run_expose)


def run_expose(args: argparse.Namespace) -> int:
    """``conec-trio expose``: returns the exit status."""
    setup_logging(args.verbose)
    try:
        config = client_config(args)
    except (ValueError, ConecError) as exc:
        return error(str(exc))
    exposer = Exposer(config, args.allow, args.peer)
    peers = ", ".join(exposer.peers) if exposer.peers else "any client"

    def started(_: object) -> None:
        say(f"exposing {', '.join(str(t) for t in args.allow)} to {peers} as {config.id!r}")

    return run_until_signal(exposer.run, "expose", started)
