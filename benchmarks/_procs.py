"""Child processes for benchmarks: spawn them, talk to them over a pipe, always clean up.

Every benchmark runs its peers in separate processes (``spawn`` start method), so the
interpreter lock of one side never slows the other. The parent process only orchestrates:

    with Processes() as procs:
        server = procs.spawn("server", server_main, arg1, arg2)
        client = procs.spawn("client", client_main, arg3)
        port = server.recv(timeout=30)      # what the child passed to ``link.send``
        client.send(port)
        value = client.recv(timeout=60)

A child target is a module-level function ``target(link: Link, *args) -> None``; it reports
values with ``link.send(value)`` and reads the parent's messages with ``link.recv(timeout)``
(or waits on ``link.fileno()`` from its event loop). An exception in the child is sent to the
parent, which raises ``ChildError`` carrying the child's traceback. Every wait has a timeout,
and leaving the ``with`` block stops every child: politely when all went well (the pipe closes,
the child is expected to notice and exit), with terminate/kill otherwise or if it lingers.

CPU pinning: ``spawn(..., side="server")`` or ``side="client"`` names the side of the
measurement a child belongs to. Once the harness has called ``configure_pinning(True)``, each
side runs on its own set of CPUs (``os.sched_setaffinity``), so that the scheduler never puts
both ends of a measurement on one core while the other idles: a run that did so would be a
second mode in the samples. With one CPU, or where the call is refused, children run unpinned
and ``pinning_report`` says so. Without ``configure_pinning`` (the modules run on their own)
nothing is pinned.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Literal

_CTX = multiprocessing.get_context("spawn")

# How long a child may take to exit on its own after the parent is done with it.
_EXIT_GRACE = 5.0


Side = Literal["server", "client"]


@dataclass(frozen=True)
class Pinning:
    """The CPUs each side of a measurement runs on (``None``: not pinned, and why)."""

    server: tuple[int, ...] | None = None
    client: tuple[int, ...] | None = None
    reason: str = "not asked for"

    def cpus(self, side: Side) -> tuple[int, ...] | None:
        return self.server if side == "server" else self.client

    def describe(self) -> str:
        if self.server is None or self.client is None:
            return f"none ({self.reason})"
        return (
            f"server/coordinator side on CPU {_cpu_list(self.server)}, "
            f"client side on CPU {_cpu_list(self.client)}"
        )


def _cpu_list(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


_pinning = Pinning()
# Children whose pinning was refused after the plan was made: they ran unpinned.
_refused: list[str] = []


def configure_pinning(enabled: bool) -> Pinning:
    """Plan the pinning of every child spawned from now on and return the plan.

    The CPUs this process may use are split in two: the first half for the server side,
    the rest for the client side (which may hold several processes). Falls back to no
    pinning with one CPU or where ``sched_setaffinity`` is missing or refused."""
    global _pinning
    _refused.clear()
    if not enabled:
        _pinning = Pinning(reason="turned off")
        return _pinning
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        # Setting our own mask to what it is already asks whether the call is allowed here.
        os.sched_setaffinity(0, cpus)
    except AttributeError:
        _pinning = Pinning(reason="sched_setaffinity is not available on this system")
        return _pinning
    except OSError as exc:
        _pinning = Pinning(reason=f"sched_setaffinity refused: {exc.strerror or exc}")
        return _pinning
    if len(cpus) < 2:
        _pinning = Pinning(reason=f"only CPU {_cpu_list(cpus)} is available")
        return _pinning
    half = len(cpus) // 2
    _pinning = Pinning(server=cpus[:half], client=cpus[half:], reason="")
    return _pinning


def pin(pid: int | None, side: Side | None, name: str) -> None:
    """Pin process ``pid`` to ``side``'s CPUs, if pinning is on; a refusal is only recorded
    (the process runs unpinned), so that a measurement never fails for it. The process must
    not have started any thread yet: a thread keeps the mask it was created with."""
    cpus = _pinning.cpus(side) if side is not None else None
    if cpus is None or pid is None:
        return
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError as exc:
        _refused.append(f"{name}: {exc.strerror or exc}")


def pinning_report() -> dict[str, Any]:
    """The plan and what came of it, for the results: CPUs per side (None: unpinned), the
    reason when unpinned, and the children whose pinning was refused."""
    return {
        "server_cpus": list(_pinning.server) if _pinning.server is not None else None,
        "client_cpus": list(_pinning.client) if _pinning.client is not None else None,
        "description": _pinning.describe(),
        "refused": list(_refused),
    }


class ChildError(RuntimeError):
    """A benchmark child process failed, died, or did not answer in time."""


_ERROR = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::.*)?$")
_GROUP_SIZE = re.compile(r"\((\d+) sub-exceptions?\)")


def error_line(text: str) -> str:
    """The line of a formatted traceback that says what went wrong: its last line, or in an
    exception group the first error that is not a group (the one that cancelled the rest;
    a group's own line says only how many it holds), with the largest group's size."""
    lines = text.strip().splitlines()
    in_group = any("Exception Group Traceback" in line for line in lines)
    found = "?"
    for line in lines if in_group else reversed(lines):
        line = line.lstrip(" |")
        if _ERROR.match(line) and not line.startswith(("ExceptionGroup", "BaseExceptionGroup")):
            found = line
            break
    sizes = [int(n) for n in _GROUP_SIZE.findall(text)]
    return f"{found} (one of {max(sizes)} errors)" if sizes and max(sizes) > 1 else found


class Link:
    """The child's end of its pipe to the parent."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def send(self, value: object) -> None:
        """Send a (picklable) value to the parent."""
        self._conn.send(("ok", value))

    def recv(self, timeout: float) -> Any:
        """The parent's next message; raises TimeoutError, or EOFError if the parent is gone."""
        if not self._conn.poll(timeout):
            raise TimeoutError(f"no message from the parent within {timeout:g} s")
        return self._conn.recv()

    def poll(self) -> bool:
        """True if a message (or EOF) is waiting."""
        return self._conn.poll(0)

    def fileno(self) -> int:
        """File descriptor that becomes readable when the parent sends something or goes away."""
        return self._conn.fileno()


def _child_entry(conn: Connection, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    try:
        target(Link(conn), *args)
    except BaseException:
        with contextlib.suppress(OSError):  # the parent may be gone already
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        conn.close()


class Child:
    """The parent's handle on one child process."""

    def __init__(self, name: str, process: BaseProcess, conn: Connection) -> None:
        self.name = name
        self._process = process
        self._conn = conn

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def send(self, value: object) -> None:
        """Send a (picklable) value to the child."""
        try:
            self._conn.send(value)
        except OSError as exc:
            raise ChildError(f"{self.name}: cannot send (child exited?)") from exc

    def recv(self, timeout: float) -> Any:
        """The next value the child sent with ``link.send``.

        Raises ChildError if the child failed (with its traceback), exited without answering,
        or did not answer within ``timeout`` seconds.
        """
        if not self._conn.poll(timeout):
            state = "is still running" if self._process.is_alive() else "has exited"
            raise ChildError(f"{self.name}: no answer within {timeout:g} s ({state})")
        try:
            tag, value = self._conn.recv()
        except EOFError:
            self._process.join(1.0)
            raise ChildError(
                f"{self.name}: exited (code {self._process.exitcode}) without answering"
            ) from None
        if tag == "error":
            raise ChildError(f"{self.name} failed: {error_line(str(value))}\n{value}")
        return value

    def stop(self, grace: float) -> None:
        """Close the pipe, wait up to ``grace`` seconds for an exit, then terminate, then kill."""
        self._conn.close()
        self._process.join(grace)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(2.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(2.0)


class Processes:
    """Owns the children spawned in a ``with`` block and stops all of them on the way out."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def __enter__(self) -> Processes:
        return self

    def spawn(
        self, name: str, target: Callable[..., None], *args: Any, side: Side | None = None
    ) -> Child:
        """Start ``target(link, *args)`` in a new (spawned) process, pinned to ``side``'s
        CPUs when pinning is on (see ``configure_pinning``)."""
        parent_conn, child_conn = _CTX.Pipe()
        process = _CTX.Process(
            target=_child_entry, args=(child_conn, target, args), name=name, daemon=True
        )
        process.start()
        # Right after the start the child is still in interpreter start-up: no thread yet.
        pin(process.pid, side, name)
        child_conn.close()  # so that the parent sees EOF when the child exits
        child = Child(name, process, parent_conn)
        self._children.append(child)
        return child

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        grace = _EXIT_GRACE if exc_type is None else 0.0
        deadline = time.monotonic() + grace
        for child in reversed(self._children):
            child.stop(max(0.0, deadline - time.monotonic()))
        self._children.clear()
