"""Console output of the command-line programs (``conec_trio.cli`` and this package)."""

from __future__ import annotations

import logging
import sys

__all__ = ["error", "format_address", "say", "setup_logging"]


def setup_logging(verbosity: int) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv."""
    level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if verbosity < 2:  # aioquic's own INFO lines (versions, ALPN) are noise at -v
        logging.getLogger("quic").setLevel(logging.WARNING)


def error(message: str) -> int:
    """Say what went wrong on stderr; returns the exit status for it."""
    print(f"conec-trio: error: {message}", file=sys.stderr, flush=True)
    return 1


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def say(line: str) -> None:
    """Print one line at once: scripts wait for our lines, so none may sit in a buffer."""
    print(line, flush=True)
