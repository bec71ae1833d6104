"""TCP port forwarding throughput: one bulk TCP transfer through ``conec-trio forward`` and
``conec-trio expose``, next to the same transfer over plain loopback TCP.

``python -m benchmarks.tunnel [--bytes N]`` runs all three once and prints MB/s; the harness
runs them as the cases ``tunnel_direct`` and ``tunnel_proxied`` (see ``cases.py``).

Every party is its own process: the TCP source and the TCP sink (``benchmarks._procs``
children), and for the tunnel the coordinator, ``expose`` and ``forward`` as the real command
line programs (``python -m conec_trio ...``), their output in a temporary directory. The path::

    source -> forward (127.0.0.1) -> [direct channel | coordinator] -> expose -> sink

``tunnel_direct`` lets ``forward`` open a direct channel to ``expose`` (what it does by
default); ``tunnel_proxied`` runs ``expose --no-listen``, so every stream goes through the
coordinator. The baseline ``loopback_tcp`` connects the source to the sink directly.

The measurement, in the source: connect, send one byte and wait for the sink's one-byte answer
(the path is up end to end: stream opened, target connected), then start the clock, send N
bytes in 64 KiB writes, half-close, and stop the clock when the sink's 8-byte count of what it
received arrives (checked against N). MB/s = N / that time / 10^6.
"""

from __future__ import annotations

import argparse
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ._procs import Link, Processes, Side, pin

HOST = "127.0.0.1"
CHUNK = 64 * 1024
STARTUP_TIMEOUT = 60.0  # a program starting, importing, connecting
CLI = [sys.executable, "-m", "conec_trio"]

# Every status line starts with a timestamp, "2025-01-31 12:00:00.123 ".
_STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
_READY = re.compile(_STAMP + r"ready on \S+:(\d+)$", re.M)
_CA = re.compile(_STAMP + r"clients pass --ca (.+)$", re.M)
_FORWARDING = re.compile(_STAMP + r"listening on 127\.0\.0\.1:(\d+) for ", re.M)
_CONNECTED = re.compile(_STAMP + r"connected to the coordinator at ", re.M)


def loopback_tcp(nbytes: int) -> float:
    """MB/s of the transfer from source to sink over plain loopback TCP."""
    return _measure(nbytes, tunnel=None)


def tunnel_direct(nbytes: int) -> float:
    """MB/s through forward -> direct channel -> expose."""
    return _measure(nbytes, tunnel="direct")


def tunnel_proxied(nbytes: int) -> float:
    """MB/s through forward -> coordinator -> expose."""
    return _measure(nbytes, tunnel="proxied")


def _bulk_timeout(nbytes: int) -> float:
    return 60.0 + nbytes / 1e6  # at least 1 MB/s, whatever the machine


def _measure(nbytes: int, tunnel: str | None) -> float:
    with Processes() as procs, ExitStack() as stack:
        sink = procs.spawn("sink", _sink_main, side="server")
        sink_port = sink.recv(timeout=STARTUP_TIMEOUT)
        if tunnel is None:
            port = sink_port
        else:
            port = stack.enter_context(_tunnel(sink_port, proxied=tunnel == "proxied"))
        source = procs.spawn("source", _source_main, port, nbytes, side="client")
        seconds = source.recv(timeout=STARTUP_TIMEOUT + _bulk_timeout(nbytes))
        received = sink.recv(timeout=10.0)
    if received != nbytes:
        raise RuntimeError(f"the sink received {received:,} bytes, not {nbytes:,}")
    return nbytes / seconds / 1e6


# --------------------------------------------------------------------------------------------
# The tunnel: the three conec-trio programs


class _Program:
    def __init__(self, name: str, argv: list[str], workdir: Path, side: Side) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
            )
        pin(self.proc.pid, side, name)

    def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = pattern.search(text)
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name}: no line matching {pattern.pattern!r} "
            f"({'exited' if self.proc.poll() is not None else 'timed out'}); its output:\n"
            f"{self.log_path.read_text(errors='replace')[-3000:]}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@contextmanager
def _tunnel(sink_port: int, *, proxied: bool) -> Iterator[int]:
    """Coordinator, expose and forward for ``127.0.0.1:sink_port``; yields forward's port."""
    programs: list[_Program] = []
    with tempfile.TemporaryDirectory(prefix="conec-tunnel-bench-") as tmp:
        workdir = Path(tmp)

        # With CPU pinning on: the source's end (forward) on the client side, the rest of the
        # path (coordinator, expose, and the sink) on the server side.
        def start(name: str, side: Side, *args: str) -> _Program:
            program = _Program(name, [*CLI, *args], workdir, side)
            programs.append(program)
            return program

        try:
            coord = start(
                "coord", "server", "coord", "--host", HOST, "--port", "0", "--state-dir", "state"
            )
            coord_port = int(coord.wait_for(_READY).group(1))
            ca = coord.wait_for(_CA).group(1)
            client = ["--coord", f"{HOST}:{coord_port}", "--ca", ca]
            target = f"{HOST}:{sink_port}"
            expose = start(
                "expose", "server",
                "expose", "--id", "exp", *client, "--allow", target, "--peer", "fwd",
                *(["--no-listen"] if proxied else []),
            )  # fmt: skip
            forward = start(
                "forward", "client", "forward", "--id", "fwd", *client, f"0:exp:{target}"
            )
            port = int(forward.wait_for(_FORWARDING).group(1))
            expose.wait_for(_CONNECTED)
            forward.wait_for(_CONNECTED)
            yield port
        finally:
            for program in reversed(programs):
                program.stop()


# --------------------------------------------------------------------------------------------
# The children


def _sink_main(link: Link) -> None:
    """Accept connections; on each: answer the 1-byte hello, count bytes until EOF, answer
    with the count; report the count of the one that carried data."""
    with socket.create_server((HOST, 0)) as server:
        link.send(server.getsockname()[1])
        server.settimeout(STARTUP_TIMEOUT)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(STARTUP_TIMEOUT)
                if conn.recv(1) != b"\x00":
                    continue  # a connection that ended early: the source tries again
                conn.sendall(b"\x00")
                count = 0
                while data := conn.recv(1 << 20):
                    count += len(data)
                conn.sendall(struct.pack("!Q", count))
            if count:
                link.send(count)
                return


def _source_main(link: Link, port: int, nbytes: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        sock = socket.create_connection((HOST, port), timeout=STARTUP_TIMEOUT)
        try:
            sock.sendall(b"\x00")
            if sock.recv(1) == b"\x00":
                break
        except OSError:
            pass
        sock.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"no path through 127.0.0.1:{port} to the sink")
        time.sleep(0.1)
    with sock:
        sock.settimeout(_bulk_timeout(nbytes))
        block = memoryview(bytes(CHUNK))
        t0 = time.perf_counter()
        left = nbytes
        while left:
            n = min(left, CHUNK)
            sock.sendall(block[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 8:
            more = sock.recv(8 - len(answer))
            if not more:
                raise RuntimeError("the sink closed without its count")
            answer += more
        seconds = time.perf_counter() - t0
    (count,) = struct.unpack("!Q", answer)
    if count != nbytes:
        raise RuntimeError(f"the sink counted {count:,} bytes, not {nbytes:,}")
    link.send(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tunnel", description=__doc__)
    parser.add_argument("--bytes", type=int, default=20_000_000, help="transfer size")
    args = parser.parse_args(argv)
    for name, fn in [("loopback_tcp", loopback_tcp), ("tunnel_direct", tunnel_direct),
                     ("tunnel_proxied", tunnel_proxied)]:  # fmt: skip
        print(f"{name:15} {fn(args.bytes):8.1f} MB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
