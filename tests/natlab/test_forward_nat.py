"""``conec-trio forward`` / ``expose`` across the lab's real NATs, run as a user runs them.

The coordinator runs on ``pub``; ``expose`` and a TCP echo server on host-b; ``forward`` and
the TCP client on host-a. Every program runs inside its namespace and is stopped when the lab
is torn down; every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .lab import COORD_IP, LabFactory, NatLab
from .nodes import COORD_PORT, LIFE, NODE, Node

ECHO_PORT = 7001  # on host-b's loopback
FORWARD_PORT = 7000  # on host-a's loopback
# The first byte of a TCP connection through forward, with no direct path: within this (s).
FIRST_BYTE_BOUND = 1.0
WAIT = 20.0


class Program:
    """A ``conec-trio`` command in a lab namespace, its output (status lines and logs) in a
    file."""

    def __init__(self, lab: NatLab, ns: str, argv: list[str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        cli = [sys.executable, "-m", "conec_trio"]
        self.proc = lab.popen(ns, [*cli, *argv], stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.output(), re.M)) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} within {timeout:g} s; output:\n{self.output()}")
            time.sleep(0.05)
        return match


def probe(lab: NatLab, count: int) -> list[dict[str, Any]]:
    """``count`` TCP connections through forward (from host-a), one after the other."""
    argv = [sys.executable, NODE, "--life", str(LIFE), "tcp-probe"]
    argv += ["--connect", str(FORWARD_PORT), "--count", str(count)]
    done = lab.run("host-a", argv, timeout=LIFE)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[list[Any]]:
    """Started programs, stopped (and their output shown) when the test ends."""
    started: list[Any] = []
    yield started
    for program in reversed(started):
        if isinstance(program, Node):
            program.stop()
        else:
            program.proc.terminate()
            try:
                program.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                program.proc.kill()
                program.proc.wait(5.0)
            print(f"--- {program.log_path.name} ---\n{program.output()[-4000:]}")


@pytest.mark.parametrize("symmetric", ["a", "b"])
def test_forward_through_a_symmetric_nat_answers_within_a_second(
    nat_lab: LabFactory,
    coord_files: tuple[Path, Path],
    tmp_path: Path,
    programs: list[Any],
    symmetric: str,
    record_property: Callable[[str, object], None],
) -> None:
    lab = nat_lab(symmetric={symmetric})
    cert, key = coord_files
    coord = Node(
        lab,
        "pub",
        "coord",
        ["coord", "--host", COORD_IP, "--cert", str(cert), "--key", str(key)],
        tmp_path / "coord.log",
    )
    programs.append(coord)
    coord.expect("ready", timeout=10.0)
    echo = Node(lab, "host-b", "echo", ["tcp-echo", "--listen", str(ECHO_PORT)], tmp_path / "e")
    programs.append(echo)
    echo.expect("ready", timeout=10.0)
    where = ["--coord", f"{COORD_IP}:{COORD_PORT}", "--ca", str(cert)]
    expose = Program(
        lab,
        "host-b",
        ["expose", "--id", "exp", *where, "--allow", f"127.0.0.1:{ECHO_PORT}"],
        tmp_path / "expose.log",
    )
    programs.append(expose)
    forward = Program(
        lab,
        "host-a",
        ["forward", "--id", "fwd", *where, f"{FORWARD_PORT}:exp:127.0.0.1:{ECHO_PORT}"],
        tmp_path / "forward.log",
    )
    programs.append(forward)
    for program in (expose, forward):
        program.wait_line(r"connected to the coordinator at ")
    forward.wait_line(rf"listening on 127\.0\.0\.1:{FORWARD_PORT} ")

    # The first connection finds no direct path and no earlier failure: it must not wait
    # out the hole punch.
    [first] = probe(lab, 1)
    assert first.get("echoed") is True, (first, forward.output())
    assert first["first_byte_ms"] < FIRST_BYTE_BOUND * 1000, first
    forward.wait_line(r"exp: relayed through the coordinator while a direct path is tried$")
    # Once the background attempt has failed, forward says why, once.
    forward.wait_line(
        r"exp: relayed through the coordinator: no direct path: .*symmetric NAT", timeout=WAIT
    )
    later = probe(lab, 3)
    assert all(p.get("echoed") is True for p in later), later
    assert all(p["first_byte_ms"] < FIRST_BYTE_BOUND * 1000 for p in later), later
    assert len(re.findall(r"exp: relayed", forward.output())) == 2, forward.output()
    assert "exp: direct" not in forward.output()
    record_property(
        "timing",
        f"forward, symmetric {symmetric}: first byte after {first['first_byte_ms']} ms, then "
        f"{[p['first_byte_ms'] for p in later]} ms",
    )
