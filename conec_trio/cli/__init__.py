"""The ``conec-trio`` command line (also ``python -m conec_trio``).

Subcommands, one module each:

- ``demo`` (:mod:`.demo`): a coordinator and three clients on loopback, showing every kind of
  stream and how fast it goes, in a few seconds;
- ``coord`` (:mod:`.coord`): run a coordinator until Ctrl-C (SIGINT) or SIGTERM;
- ``certs ca`` / ``certs issue`` (:mod:`.certs`): make a CA, and certificates it signs;
- ``ping`` (:mod:`.ping`): round trips to a peer, each with its time and path;
- ``expose`` / ``forward`` (:mod:`.expose`, :mod:`.forward`): TCP port forwarding over conec,
  whose logic is :mod:`conec_trio.forward`;
- ``status`` (:mod:`.status`): the coordinator's view: clients, broadcast channels with their
  members, and this machine's public address as the coordinator sees it.

Each module has one ``add_<name>_command(subparsers)`` function that builds its parser and
sets ``run`` to a function taking the parsed arguments and returning the exit status; a new
subcommand is one more such module and one more line in :func:`build_parser`. What several
commands share (client options, certificate options, running until a signal) is in
:mod:`.common`. The command line uses the library's public API only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from .certs import add_certs_command
from .coord import add_coord_command
from .demo import add_demo_command
from .expose import add_expose_command
from .forward import add_forward_command
from .ping import add_ping_command
from .status import add_status_command

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``conec-trio`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 1 when the command failed (the reason is printed on
    stderr), 2 for a usage error, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("conec-trio: interrupted", file=sys.stderr, flush=True)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``conec-trio``, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="conec-trio",
        description="COordinated NEtwork Channels for Trio, over QUIC: one coordinator, many "
        "clients, proxied, direct and broadcast message streams.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # One line per command; each add_*_command builds its subparser and sets ``run``.
    add_demo_command(subparsers)
    add_coord_command(subparsers)
    add_certs_command(subparsers)
    add_expose_command(subparsers)
    add_forward_command(subparsers)
    add_ping_command(subparsers)
    add_status_command(subparsers)
    return parser
