"""Console output of the command-line programs (``conec_trio.cli`` and this package).

Status lines (:func:`say`) and log records share one stream, stdout, and one timestamp, so
that what a program said and what it logged read in order; only the error a program exits
with (:func:`error`) goes to stderr, as usage errors do.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["STAMP_FORMAT", "error", "format_address", "say", "setup_logging", "show", "stamp"]

# Shared by status lines and log records: "2025-01-31 12:00:00.123".
STAMP_FORMAT = "%Y-%m-%d %H:%M:%S"


def stamp(when: float | None = None) -> str:
    """The timestamp a line starts with."""
    when = time.time() if when is None else when
    return f"{time.strftime(STAMP_FORMAT, time.localtime(when))}.{int(when % 1 * 1000):03d}"


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return stamp(record.created)


def setup_logging(verbosity: int) -> None:
    """Log to stdout, beside the status lines: warnings by default, info with -v, debug with
    -vv (aioquic's own lines too, only then)."""
    level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if verbosity >= 2:  # else the library keeps aioquic's per-packet lines out of the way
        logging.getLogger("quic").setLevel(logging.DEBUG)


def error(message: str) -> int:
    """Say what went wrong on stderr; returns the exit status for it."""
    print(f"conec-trio: error: {message}", file=sys.stderr, flush=True)
    return 1


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def say(line: str) -> None:
    """Print one timestamped status line at once: scripts wait for our lines, so none may sit
    in a buffer."""
    print(f"{stamp()} {line}", flush=True)


def show(line: str) -> None:
    """Print one line of a command's result (``certs``, the ``demo``'s report), untimestamped."""
    print(line, flush=True)
