"""Processes for the port-forwarding tests: ``conec-trio coord/expose/forward`` as a user runs
them, a TCP echo server, and TCP clients that go through the tunnel.

Every program runs as a real subprocess with its output (stdout and stderr) in a log file, so
a test can wait for a line or look for a logged reason, and nothing blocks on a full pipe.
Every wait has a deadline; :class:`Programs` kills whatever still runs when a test ends.

Run as a script, ``python forward_helpers.py echo`` is the echo server: it prints
``echo on 127.0.0.1:PORT``, echoes every byte back, and answers a half-close (EOF) by
finishing its echo and then half-closing too.
"""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

CLI = [sys.executable, "-m", "conec_trio"]
# ``conec-trio`` with its address space limited to the bytes given as the first argument: a
# program under attack may then fail, but cannot take the machine's memory with it.
_LIMITED = (
    "import resource, sys; limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
    "from conec_trio.cli import main; sys.exit(main(sys.argv[1:]))"
)


def limited_cli(memory_limit: int) -> list[str]:
    """Like :data:`CLI`, for a program that may use at most ``memory_limit`` bytes of
    address space."""
    return [sys.executable, "-c", _LIMITED, str(memory_limit)]


# Every status line starts with a timestamp, "2025-01-31 12:00:00.123 ".
STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
HERE = Path(__file__).resolve()
READY = re.compile(STAMP + r"ready on (?P<host>\S+):(?P<port>\d+)$", re.M)
CA_LINE = re.compile(STAMP + r"clients pass --ca (?P<path>.+)$", re.M)
FORWARDING = re.compile(
    STAMP + r"listening on 127\.0\.0\.1:(?P<port>\d+) for (?P<peer>\S+) -> (?P<target>\S+)$",
    re.M,
)
CONNECTED = re.compile(STAMP + r"connected to the coordinator at ", re.M)
LOST = re.compile(STAMP + r"lost the coordinator ", re.M)
ECHO_READY = re.compile(r"^echo on 127\.0\.0\.1:(?P<port>\d+)$", re.M)
# Deadline of one wait for a program (start-up included: imports take a moment on a busy
# machine).
WAIT = 20.0

T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on 127.0.0.1 a moment ago (TCP, or UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll_until(
    predicate: Callable[[], T | None], timeout: float, what: str, step: float = 0.05
) -> T:
    """Call ``predicate`` until it returns something other than None/False; AssertionError
    naming ``what`` after ``timeout`` seconds. (For sync code: fixtures and threads.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


class Program:
    """One subprocess with its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def search(self, pattern: re.Pattern[str], start: int = 0) -> re.Match[str] | None:
        """The first match of ``pattern`` in the output after character ``start``; fails at
        once if the program has exited without printing it."""
        match = pattern.search(self.output(), start)
        if match is None and not self.alive():
            match = pattern.search(self.output(), start)
            if match is None:
                raise AssertionError(
                    f"{self.name} exited (status {self.proc.returncode}) without printing "
                    f"{pattern.pattern!r}; its output:\n{self.output()}"
                )
        return match

    def wait_line(
        self, pattern: re.Pattern[str], timeout: float = WAIT, start: int = 0
    ) -> re.Match[str]:
        """Wait (sync) for ``pattern`` in the output after character ``start``."""
        try:
            return poll_until(lambda: self.search(pattern, start), timeout, pattern.pattern)
        except AssertionError as exc:
            raise AssertionError(f"{self.name}: {exc}") from None

    async def await_line(
        self, pattern: re.Pattern[str], within: float = WAIT, start: int = 0
    ) -> re.Match[str]:
        """Wait (async) for ``pattern`` in the output after character ``start``."""
        import trio

        with trio.move_on_after(within):
            while True:
                match = self.search(pattern, start)
                if match is not None:
                    return match
                await trio.sleep(0.05)
        raise AssertionError(
            f"{self.name}: no {pattern.pattern!r} within {within:g} s; its output:\n{self.output()}"
        )

    def check_alive(self) -> bool:
        """True, or AssertionError with the output if the program has exited."""
        if not self.alive():
            raise AssertionError(
                f"{self.name} exited (status {self.proc.returncode}); its output:\n{self.output()}"
            )
        return True

    def interrupt(self) -> None:
        """Ctrl-C."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)

    def wait_exit(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout:g} s; its output:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: the program gets no chance to say goodbye to anyone."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        try:
            self.kill()
        finally:
            self._log.close()


class Programs:
    """Starts the programs of one test and kills every one of them at the end."""

    def __init__(self, workdir: Path, idle_timeout: float | None = 2.0) -> None:
        self.workdir = workdir
        # The clients' idle timeout: short, so that a killed coordinator or peer is noticed
        # quickly (None: the library's default).
        self.idle_timeout = idle_timeout
        self.started: list[Program] = []
        self.state_dir = workdir / "coord-state"

    def start(self, name: str, argv: list[str]) -> Program:
        program = Program(name, argv, self.workdir / f"{name}.log", self.workdir)
        self.started.append(program)
        return program

    def close(self) -> None:
        for program in self.started:
            program.stop()

    def __enter__(self) -> Programs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the three conec-trio programs ------------------------------------------------------

    def coord(self, port: int = 0, name: str = "coord") -> tuple[Program, int, str]:
        """A coordinator on 127.0.0.1 whose self-signed cert is kept in ``state_dir`` (the
        same files across restarts). Returns the program, its port and the ``--ca`` file."""
        program = self.start(
            name,
            [
                *CLI,
                "coord",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(self.state_dir),
            ],
        )
        ready = program.wait_line(READY)
        ca = program.wait_line(CA_LINE).group("path")
        return program, int(ready.group("port")), ca

    def client_args(self, client_id: str, coord_port: int, ca: str) -> list[str]:
        args = ["--id", client_id, "--coord", f"127.0.0.1:{coord_port}", "--ca", ca, "-v"]
        if self.idle_timeout is not None:
            args += ["--idle-timeout", str(self.idle_timeout)]
        return args

    def expose(
        self,
        coord_port: int,
        ca: str,
        allow: list[str],
        *,
        client_id: str = "exp",
        peers: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
        name: str = "expose",
        memory_limit: int | None = None,
    ) -> Program:
        cli = CLI if memory_limit is None else limited_cli(memory_limit)
        argv = [*cli, "expose", *self.client_args(client_id, coord_port, ca), *extra]
        for target in allow:
            argv += ["--allow", target]
        for peer in peers:
            argv += ["--peer", peer]
        return self.start(name, argv)

    def forward(
        self,
        coord_port: int,
        ca: str,
        mappings: list[str],
        *,
        client_id: str = "fwd",
        extra: tuple[str, ...] = (),
        name: str = "forward",
    ) -> Program:
        return self.start(
            name, [*CLI, "forward", *self.client_args(client_id, coord_port, ca), *extra, *mappings]
        )

    def echo_server(self, name: str = "echo") -> tuple[Program, int]:
        program = self.start(name, [sys.executable, str(HERE), "echo"])
        return program, int(program.wait_line(ECHO_READY).group("port"))

    def http_server(self, directory: Path, name: str = "http") -> tuple[Program, int]:
        """``python -m http.server`` on 127.0.0.1, ready when it accepts a connection."""
        port = free_port()
        program = self.start(
            name,
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
             str(directory), str(port)],
        )  # fmt: skip
        poll_until(lambda: program.check_alive() and _accepts(port), WAIT, "the HTTP server")
        return program, port


def forwarded_ports(program: Program, count: int) -> list[int]:
    """The local ports a ``forward`` program listens on, in the order of its mappings."""
    program.wait_line(FORWARDING)
    poll_until(lambda: len(FORWARDING.findall(program.output())) >= count, WAIT, "every mapping")
    return [int(m.group("port")) for m in FORWARDING.finditer(program.output())][:count]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --- TCP clients (blocking: run them in a thread) ---------------------------------------------


def echo_exchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Connect to ``port``, send ``payload``, half-close, and read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def try_echo(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> bool:
    """True if an echo through ``port`` works right now (for polling a tunnel's readiness)."""
    try:
        return echo_exchange(port, payload, timeout) == payload
    except OSError:
        return False


def download_sha256(url: str, timeout: float = 30.0) -> tuple[str, int]:
    """GET ``url``: the sha256 of the body and its length."""
    digest = hashlib.sha256()
    size = 0
    with urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(1 << 16):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used so far, user and system (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- a target in a thread: resets ---------------------------------------------------------------


def reset_close(s: socket.socket) -> None:
    """Close ``s`` with a TCP reset (RST) rather than an orderly end (FIN)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


class ResetServer:
    """A TCP target (in a thread of the test process) for reset semantics. Per connection,
    the first line says what to do:

    - ``reset-me``: send ``partial``, then close with a reset;
    - ``watch``: answer ``ok``, read until the connection ends, and put how it ended
      (``"eof"`` or ``"reset"``) in ``endings``.
    """

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.endings: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        try:
            line = conn.makefile("rb").readline()
            if line == b"reset-me\n":
                conn.sendall(b"partial")
                reset_close(conn)
                return
            if line == b"watch\n":
                conn.sendall(b"ok\n")
                try:
                    while conn.recv(1 << 16):
                        pass
                    self.endings.put("eof")
                except ConnectionResetError:
                    self.endings.put("reset")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._server.close()


# --- the echo server (run as a script) ---------------------------------------------------------


def _echo_main() -> None:
    import trio

    async def handler(stream: Any) -> None:
        try:
            while data := await stream.receive_some(1 << 16):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            print(f"echo on 127.0.0.1:{port}", flush=True)

    trio.run(main)


if __name__ == "__main__":
    if sys.argv[1:] == ["echo"]:
        _echo_main()
    else:
        sys.exit(f"usage: {os.path.basename(__file__)} echo")
