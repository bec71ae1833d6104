"""What the commands share: reading certificate options, the client options of ``expose`` and
``forward``, and running a program until Ctrl-C (SIGINT) or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from .. import ClientConfig, ConecError, ConfigError
from ..forward import Target, parse_client_id
from ..forward.addresses import parse_coord
from ..forward.console import error, say
from ..forward.link import COORD_CONNECT_TIMEOUT

__all__ = [
    "LOOPBACK_NAMES",
    "add_client_options",
    "argtype",
    "client_config",
    "flag_names",
    "read_cert_and_key",
    "read_pem_option",
    "run_until_signal",
]

# The names a coordinator's self-signed certificate is always valid for.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def read_pem_option(path: str | os.PathLike[str] | None, option: str) -> bytes | None:
    """The PEM file a command-line option names (None stays None); ``ValueError`` saying
    which option is wrong if it cannot be read or is not PEM."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{option}: cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise ValueError(f"{option}: {path} is not a PEM file")
    return data


def read_cert_and_key(args: argparse.Namespace) -> tuple[bytes, bytes] | None:
    """``--cert`` and ``--key`` as PEM, or None when neither is given; ``ValueError`` when
    only one is, or a file is not PEM."""
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together: give both, or neither")
    if args.cert is None:
        return None
    cert = read_pem_option(args.cert, "--cert")
    key = read_pem_option(args.key, "--key")
    assert cert is not None and key is not None
    return cert, key


def argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a parser that raises ``ValueError`` saying what is wrong."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def add_client_options(parser: argparse.ArgumentParser, *, id_required: bool = True) -> None:
    """The options of a program that is a conec client (``expose``, ``forward``)."""
    parser.add_argument(
        "--id",
        required=id_required,
        metavar="NAME",
        help="this client's id" + ("" if id_required else " (default: a random one)"),
    )
    parser.add_argument(
        "--coord",
        required=True,
        metavar="HOST[:PORT]",
        type=argtype(parse_coord),
        help="the coordinator (HOST is also the name its certificate must be valid for; "
        "PORT defaults to 1719)",
    )
    parser.add_argument(
        "--ca",
        metavar="PEM",
        type=Path,
        help="CA of the coordinator's certificate (default: "
        "the system trust store); a coordinator's self-signed certificate works too",
    )
    parser.add_argument("--cert", metavar="PEM", type=Path, help="this client's certificate")
    parser.add_argument("--key", metavar="PEM", type=Path, help="private key of --cert")
    parser.add_argument(
        "--client-ca",
        metavar="PEM",
        type=Path,
        help="CA that peers' certificates must chain to for direct channels",
    )
    parser.add_argument(
        "--no-listen",
        action="store_true",
        help="accept no direct channels (streams to this client go through the coordinator)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="drop a silent connection after this long (the lower of both sides' settings "
        "counts); a lost coordinator or peer is noticed within it",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log every connection: who, to what, how many bytes, why it ended (-vv: debug)",
    )


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The client settings :func:`add_client_options` gave; ``ValueError`` if they are bad."""
    parse_client_id(args.id)
    identity = read_cert_and_key(args)
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        raise ValueError("--idle-timeout must be a positive number of seconds")
    coord: Target = args.coord
    with flag_names():
        return ClientConfig(
            id=args.id,
            coord_host=coord.host,
            coord_port=coord.port,
            ca=read_pem_option(args.ca, "--ca"),
            cert_chain=None if identity is None else identity[0],
            private_key=None if identity is None else identity[1],
            client_ca=read_pem_option(args.client_ca, "--client-ca"),
            listen=not args.no_listen,
            idle_timeout=args.idle_timeout,
            connect_timeout=COORD_CONNECT_TIMEOUT,
        )


# The command-line flag of each library setting, for messages about them.
FLAGS = {
    "ca": "--ca",
    "cert_chain": "--cert",
    "private_key": "--key",
    "client_ca": "--client-ca",
    "coord_host": "--coord",
    "coord_port": "--coord",
}


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Turn a :class:`ConfigError` about a setting into a ``ValueError`` naming its flag
    ("--key: key does not match certificate ...")."""
    try:
        yield
    except ConfigError as exc:
        problem = exc.problem.replace("(cert_chain: ", "(--cert: ")
        raise ValueError(f"{FLAGS.get(exc.setting, exc.setting)}: {problem}") from None


def run_until_signal(
    serve: Callable[..., Any],
    name: str,
    on_started: Callable[[Any], None],
    details: Callable[[], str] | None = None,
) -> int:
    """Run ``serve`` (started with ``nursery.start``) until SIGINT or SIGTERM; returns the
    exit status: 0 then, 1 if it could not start (an ``OSError`` or ``ConecError``, said on
    stderr).

    ``on_started`` gets what ``serve`` passed to ``task_status.started``. On a signal the
    program says ``NAME stopped (SIGNAL)``, with ``details()`` after the signal's name.
    Signals are caught before ``serve`` starts, so a Ctrl-C right after it said it is ready
    still stops it cleanly.
    """

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        info = await nursery.start(serve)
                    except OSError as exc:
                        return error(str(exc.strerror or exc))
                    except ConecError as exc:  # say, a key that does not parse
                        return error(str(exc))
                    on_started(info)
                    async for signum in signals:
                        more = "" if details is None else f"; {details()}"
                        say(f"{name} stopped ({signal.Signals(signum).name}{more})")
                        nursery.cancel_scope.cancel()
                        break
            except BaseExceptionGroup as group:
                # Serving ended for good (an incurable refusal): say why, no traceback.
                refusal, rest = group.split(ConecError)
                if refusal is None or rest is not None:
                    raise
                return error(str(refusal.exceptions[0]))
        return 0

    try:
        return trio.run(main)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was in place
        say(f"{name} stopped")
        return 0
