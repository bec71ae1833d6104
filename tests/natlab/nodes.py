"""Driving ``conec_node.py`` processes in the NAT lab: one :class:`Node` per process, a
:class:`Scene` for a coordinator and two clients (the ``scene`` fixture in ``conftest.py``).

A test drives the nodes through their stdin (one command per line) and reads their JSON
lines from stdout: it waits for lines, never for time. Every wait has a deadline; every
process has a hard bound on its life.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest

from .lab import NatLab

NODE = str(Path(__file__).with_name("conec_node.py"))
COORD_PORT = 4433
LIFE = 60.0  # hard bound on every node process (seconds)
Event = dict[str, Any]


class Node:
    """One ``conec_node.py`` process in a lab namespace, driven through stdin/stdout."""

    def __init__(self, lab: NatLab, ns: str, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log = log.open("wb")
        argv = [sys.executable, NODE, "--life", str(LIFE), "--port", str(COORD_PORT), *argv]
        self.proc = lab.popen(ns, argv, stdin=PIPE, stdout=PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buffer = b""
        self._unread: list[Event] = []
        self._eof = False
        self.observed: list[Any] = []  # a client's address as the coordinator saw it

    def log(self) -> str:
        """The node's stderr (its library logs), for failure messages."""
        if not self._log.closed:
            self._log.flush()
        return f"--- {self.name} log ---\n{self.log_path.read_text(errors='replace')[-6000:]}"

    def _read_event(self, deadline: float) -> Event | None:
        while b"\n" not in self._buffer:
            if self._eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([self._fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self._eof = True
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            event: Event = json.loads(line)
        except ValueError:
            pytest.fail(f"{self.name} printed a non-JSON line {line!r}\n{self.log()}")
        return event

    def expect(self, event: str, timeout: float, **match: Any) -> Event:
        """The first (not yet consumed) line of kind ``event`` whose fields equal ``match``."""
        return self.expect_where(
            event,
            timeout,
            lambda e: all(e.get(k) == v for k, v in match.items()),
            str(match or ""),
        )

    def expect_where(
        self, event: str, timeout: float, predicate: Callable[[Event], bool], what: str
    ) -> Event:
        """The first (not yet consumed) line of kind ``event`` that ``predicate`` accepts
        (``what`` describes it in the failure message)."""

        def matches(e: Event) -> bool:
            return e.get("event") == event and predicate(e)

        for seen in self._unread:
            if matches(seen):
                self._unread.remove(seen)
                return seen
        deadline = time.monotonic() + timeout
        while (new := self._read_event(deadline)) is not None:
            if matches(new):
                return new
            self._unread.append(new)
        said = "exited" if self._eof else f"said nothing more within {timeout:g} s"
        pytest.fail(
            f"{self.name} {said} while we waited for {event} {what}; "
            f"unconsumed: {self._unread[-20:]}\n{self.log()}"
        )

    def pending(self, event: str) -> list[Event]:
        """Lines of kind ``event`` read while waiting for others and not consumed yet."""
        return [e for e in self._unread if e.get("event") == event]

    def send(self, line: str) -> None:
        """Start one command (see ``conec_node.py``); its result line comes later."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def command(self, line: str, timeout: float = 25.0) -> Event:
        """Run one command and return its ``result`` line."""
        self.send(line)
        return self.expect("result", timeout, cmd=line.split()[0])

    def stop(self) -> None:
        """Close stdin (the node leaves cleanly), wait for it, bounded."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5.0)
        self.proc.stdout.close()  # type: ignore[union-attr]
        self._log.close()


class Scene:
    """A lab with a coordinator on ``pub`` and clients ``a`` and ``b`` (on host-a/host-b)."""

    def __init__(self, lab: NatLab, a: Node, b: Node, coord: Node) -> None:
        self.lab = lab
        self.a = a
        self.b = b
        self.coord = coord
        self.clients = {"a": a, "b": b}

    def forget_mappings(self) -> None:
        """Make both NATs forget every mapping, then re-map the coordinator connections."""
        self.lab.flush_conntrack()
        for node in (self.a, self.b):
            assert "error" not in node.command("ping"), node.log()

    def logs(self) -> str:
        return "\n".join(n.log() for n in (self.coord, self.a, self.b))


SceneFactory = Callable[..., Scene]
