"""``conec-trio coord``: run a coordinator until Ctrl-C (SIGINT) or SIGTERM."""

from __future__ import annotations

import argparse
import datetime
import errno
import functools
import ipaddress
import logging
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .. import ConecError, CoordConfig, Coordinator, open_coordinator
from ..certs import save_pair, self_signed_cert
from ..forward.console import error, format_address, say, setup_logging
from .common import LOOPBACK_NAMES, flag_names, read_cert_and_key, read_pem_option, run_until_signal

__all__ = ["COORD_CERT_FILE", "COORD_KEY_FILE", "add_coord_command", "run_coord"]

log = logging.getLogger(__name__)

# The library's default port (a dataclass field's default is its class attribute).
DEFAULT_PORT: int = CoordConfig.port
# Files of the coordinator's self-signed certificate inside ``coord --state-dir``.
COORD_CERT_FILE = "coord.pem"
COORD_KEY_FILE = "coord.key"
# Where the clients are, for telling them at once after a crash (CoordConfig.restart_notes).
RESTART_NOTES_FILE = "clients"
DEFAULT_STATE_DIR = "conec-coord"


def add_coord_command(subparsers: Any) -> None:
    """Register ``conec-trio coord``."""
    parser = subparsers.add_parser(
        "coord",
        help="run a coordinator until Ctrl-C",
        description="Run a coordinator until Ctrl-C (SIGINT) or SIGTERM; both exit with status "
        "0. Without --cert it uses a self-signed certificate for localhost, 127.0.0.1 and ::1 "
        "(and --host, if that is a specific name or address), made on first use and kept in "
        "--state-dir, and prints the file clients pass as --ca. When it is bound, it prints "
        "the line 'ready on HOST:PORT' (scripts can wait for it).",
    )
    parser.add_argument(
        "--host",
        help="address to bind (default: '::', every IPv6 and IPv4 address where the OS "
        "allows, else 0.0.0.0)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"UDP port (default: {DEFAULT_PORT}; 0 picks a free port)",
    )
    parser.add_argument("--cert", metavar="PEM", type=Path, help="certificate chain, PEM")
    parser.add_argument("--key", metavar="PEM", type=Path, help="private key of --cert, PEM")
    parser.add_argument(
        "--client-ca",
        metavar="PEM",
        type=Path,
        help="admit only clients whose certificate this CA signed (for their id)",
    )
    parser.add_argument(
        "--stateless-retry",
        action="store_true",
        help="validate client addresses with a QUIC Retry before a connection costs state",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(DEFAULT_STATE_DIR),
        help=f"where the self-signed certificate is kept when --cert is not given (files "
        f"{COORD_CERT_FILE} and {COORD_KEY_FILE}), and where the clients' addresses are noted "
        f"({RESTART_NOTES_FILE}) so that after a crash a restarted coordinator tells them at "
        f"once (default: ./{DEFAULT_STATE_DIR}/)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log clients coming and going (-vv: debug)",
    )
    parser.set_defaults(run=run_coord)


def run_coord(args: argparse.Namespace) -> int:
    """``conec-trio coord``: returns the exit status."""
    setup_logging(args.verbose)
    if not 0 <= args.port <= 65535:
        return error(f"--port must be 0 to 65535, not {args.port}")
    try:
        identity = read_cert_and_key(args)
        client_ca = read_pem_option(args.client_ca, "--client-ca")
        if identity is None:
            identity = _coord_identity(args.state_dir, args.host)
        else:
            say(f"certificate: {args.cert.resolve()} (clients pass its CA as --ca)")
    except (OSError, ValueError, ConecError) as exc:
        return error(str(exc))
    if client_ca is None:
        say("clients: any client whose certificate is valid for its id (no --client-ca)")
    else:
        say(f"clients: only those with a certificate signed by {args.client_ca.resolve()}")
    cert_pem, key_pem = identity
    try:
        with flag_names():
            configs = [
                CoordConfig(
                    cert_chain=cert_pem,
                    private_key=key_pem,
                    host=host,
                    port=args.port,
                    client_ca=client_ca,
                    stateless_retry=args.stateless_retry,
                    restart_notes=args.state_dir / RESTART_NOTES_FILE,
                )
                for host in ([args.host] if args.host is not None else ["::", "0.0.0.0"])
            ]
    except ValueError as exc:
        return error(str(exc))
    if args.cert is None and (args.host is None or _is_unspecified(args.host)):
        log.warning(
            "the self-signed certificate is valid for %s only, but the coordinator listens on "
            "every address: clients on other machines cannot verify it. Give --host NAME (the "
            "name or address they use) or --cert",
            ", ".join(LOOPBACK_NAMES),
        )
    running: list[Coordinator] = []

    def started(coord: Coordinator) -> None:
        running.append(coord)
        say(f"ready on {format_address(*coord.address)}")

    def details() -> str:
        return f"{running[0].num_clients} client(s) disconnected"

    return run_until_signal(functools.partial(_serve, configs), "coordinator", started, details)


async def _serve(configs: list[CoordConfig], *, task_status: trio.TaskStatus[Coordinator]) -> None:
    """Run a coordinator with the first of ``configs`` whose address can be bound (the
    others are fallbacks for systems without IPv6)."""
    for i, config in enumerate(configs):
        bound = False
        try:
            async with open_coordinator(config) as coord:
                bound = True
                task_status.started(coord)
                await trio.sleep_forever()
        except OSError as exc:
            if bound:
                raise
            where = format_address(config.host, config.port)
            fallback = i + 1 < len(configs) and exc.errno in (
                errno.EAFNOSUPPORT,
                errno.EADDRNOTAVAIL,
            )
            if not fallback:
                raise OSError(exc.errno, f"cannot bind {where}: {exc}") from exc
            log.info("cannot bind %s (%s); trying %s", config.host, exc, configs[i + 1].host)


def _coord_identity(state_dir: Path, host: str | None) -> tuple[bytes, bytes]:
    """The coordinator's self-signed certificate: the one in ``state_dir`` when it still fits.

    Keeping it across restarts lets clients that already trust it reconnect.
    """
    names = list(LOOPBACK_NAMES)
    if host is not None and host not in names and not _is_unspecified(host):
        names.append(host)
    cert_path = state_dir / COORD_CERT_FILE
    key_path = state_dir / COORD_KEY_FILE
    reused = _load_fitting_identity(cert_path, key_path, names)
    if reused is not None:
        made = "kept from an earlier run"
        cert_pem, key_pem = reused
    else:
        made = "made now"
        cert_pem, key_pem = self_signed_cert(names)
        state_dir.mkdir(parents=True, exist_ok=True)
        save_pair(cert_pem, key_pem, cert_path, key_path)
    say(f"certificate: self-signed for {', '.join(names)} ({made})")
    say(f"clients pass --ca {cert_path.resolve()}")
    return cert_pem, key_pem


def _is_unspecified(host: str) -> bool:
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _load_fitting_identity(
    cert_path: Path, key_path: Path, names: list[str]
) -> tuple[bytes, bytes] | None:
    """The saved certificate and key if they exist, match, are valid for a day more and
    cover ``names`` (as subjectAltNames, the way ``certs`` makes them); else None."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm, x509.ExtensionNotFound):
        return None
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    if cert.not_valid_after_utc < soon or key.public_key() != cert.public_key():
        return None
    covered = set(san.get_values_for_type(x509.DNSName))
    covered.update(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    if not set(names) <= covered:
        return None
    return cert_pem, key_pem
