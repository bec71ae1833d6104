"""Soak with coordinator restarts: ``python -m benchmarks.soak --restarts 5``.

The coordinator is the real program (``python -m conec_trio coord``) with a fixed certificate
and key, so that each new process on the same port answers the old connections with a QUIC
stateless reset; it also reads the notes its predecessor kept of where the clients are and
sends each of them that reset at once (after a SIGKILL, idle clients would otherwise only
notice at their next keepalive).

The clients sit in a few processes; partners (clients 0-1, 2-3, ...; in different
processes) open a direct channel and one direct stream on it, and both send numbered
messages on it at ``--rate`` per second for the whole run: through every restart, since a
direct channel does not need the coordinator.

Then, ``--restarts`` times: ``--between`` seconds of traffic, the coordinator is stopped
(``--signal``: SIGKILL, SIGTERM, or both in turn, starting with SIGKILL), ``--outage`` seconds
later a new one starts on the same port, and the clock runs from its ``ready on`` line until
every client has lost the old connection and is back (its ``wait_connected`` returned). Each
client process watches its clients' ``connected`` and timestamps each return, so the figure
per restart is the last client's return less the coordinator's.

After the last restart, ``--between`` more seconds of traffic; then every sender closes its
stream and the receivers drain until ``EndOfChannel``. Every message carries (sender,
sequence number, send time); the run fails if any was lost, duplicated or reordered, if any
client was not back within ``--back-timeout`` after a restart, or on any error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

import conec_trio

from ._certs import self_signed_cert
from ._child import from_parent, usage
from ._procs import Link, Processes
from .soak import (
    CONNECT_BATCH,
    HEADER,
    HOST,
    STARTUP_TIMEOUT,
    STOP_TIMEOUT,
    _leaves,
    _percentiles,
    _Seq,
    client_id,
    partner_of,
)

SCAN_INTERVAL = 0.02  # how often a client process looks at its clients' ``connected``
CHANNEL_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------
# The coordinator: a real ``conec-trio coord`` process


class CoordProcess:
    """``python -m conec_trio coord`` on a fixed port with a fixed certificate; knows when
    it said ``ready on``."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        self.command = [
            sys.executable,
            "-m",
            "conec_trio",
            "coord",
            "--host",
            HOST,
            "--port",
            str(port),
            "--cert",
            str(cert),
            "--key",
            str(key),
            # where it notes its clients, so that a restarted one tells them at once
            "--state-dir",
            str(cert.parent / "state"),
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.ready_at = 0.0

    def start(self, timeout: float) -> float:
        """Start it; returns the ``time.monotonic()`` at which it said it is ready."""
        self._ready.clear()
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout):
            raise RuntimeError(
                f"the coordinator did not say 'ready on' within {timeout:g} s: "
                + " | ".join(self.lines[-5:])
            )
        return self.ready_at

    def _read(self, proc: subprocess.Popen[str]) -> None:
        # Drains the pipe for the process's whole life (so that its logging never blocks).
        assert proc.stdout is not None
        for line in proc.stdout:
            if not self._ready.is_set() and "ready on" in line:
                self.ready_at = time.monotonic()
                self._ready.set()
            self.lines.append(line.rstrip())
            del self.lines[:-200]

    def stop(self, signum: int, timeout: float) -> float:
        """Send ``signum`` and wait for the exit; returns the time it was sent."""
        assert self.proc is not None
        sent_at = time.monotonic()
        self.proc.send_signal(signum)
        self.proc.wait(timeout)
        return sent_at

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# Client processes


class _Presence:
    """One client's coordinator connection as its process saw it: ``cycles`` is a list of
    [time the loss was seen, time it was back (None while down)]."""

    __slots__ = ("client", "cycles", "up")

    def __init__(self, client: conec_trio.Client) -> None:
        self.client = client
        self.up = True
        self.cycles: list[list[float | None]] = []

    def back_since(self, t: float) -> tuple[float, float] | None:
        """(loss seen, back) of the cycle that began after ``t``, once it ended."""
        for down, back in self.cycles:
            if down is not None and down >= t and back is not None:
                return down, back
        return None


class _Worker:
    def __init__(self, ids: list[int], params: dict[str, Any]) -> None:
        self.ids = ids
        self.params = params
        self.presence: dict[int, _Presence] = {}
        self.sent: dict[int, int] = {}
        self.seqs: dict[int, _Seq] = {}
        self.out_of_order = 0
        self.ended: set[int] = set()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop_sending = trio.Event()
        self.release = trio.Event()
        self.streams_ready = 0
        self.streams_expected = sum(1 for k in ids if partner_of(k, params["clients"]) is not None)
        self.all_streams = trio.Event()
        self.finished = 0
        self.all_finished = trio.Event()
        self.a_client_returned = trio.Event()  # set (and replaced) on each return
        self.watching = trio.CancelScope()

    def stream_ready(self) -> None:
        self.streams_ready += 1
        if self.streams_ready >= self.streams_expected:
            self.all_streams.set()

    def finish_one(self) -> None:
        self.finished += 1
        if self.finished >= self.streams_expected:
            self.all_finished.set()

    async def watch(self) -> None:
        """Timestamp every client's losses and returns (until ``watching`` is cancelled)."""
        with self.watching:
            await self._watch()

    async def _watch(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                now = time.monotonic()
                for p in self.presence.values():
                    if p.up and not p.client.connected:
                        p.up = False
                        p.cycles.append([now, None])
                        nursery.start_soon(self._back, p)
                await trio.sleep(SCAN_INTERVAL)

    async def _back(self, p: _Presence) -> None:
        await p.client.wait_connected()
        p.cycles[-1][1] = time.monotonic()
        p.up = True
        self.a_client_returned.set()
        self.a_client_returned = trio.Event()

    async def wait_back(self, killed_at: float, limit: float) -> dict[str, Any]:
        """Every client's loss (after ``killed_at``) and return, waiting at most ``limit``."""
        with trio.move_on_after(limit):
            while any(p.back_since(killed_at) is None for p in self.presence.values()):
                await self.a_client_returned.wait()
        cycles = {k: p.back_since(killed_at) for k, p in self.presence.items()}
        return {
            "back": {k: c for k, c in cycles.items() if c is not None},
            "missing": sorted(k for k, c in cycles.items() if c is None),
        }

    def report(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "unique": {k: s.unique for k, s in self.seqs.items()},
            "gaps": sum(s.gaps for s in self.seqs.values()),
            "dup": sum(s.dup for s in self.seqs.values()),
            "out_of_order": self.out_of_order,
            "ended": len(self.ended),
            "streams": len(self.seqs),
            "latencies": self.latencies,
            "errors": self.errors,
            "reconnects": sum(len(p.cycles) for p in self.presence.values()),
            "usage": usage(),
        }


def _clients_main(
    link: Link, cert_pem: bytes, ids: list[int], params: dict[str, Any], lifetime: float
) -> None:
    if params["nice"]:
        os.nice(params["nice"])
    # Each client says when it loses the coordinator and when it is back: thousands of lines.
    logging.getLogger("conec_trio").setLevel(logging.ERROR)
    port = link.recv(STARTUP_TIMEOUT)
    link.send(trio.run(_clients_run, link, port, cert_pem, ids, params, lifetime))


async def _clients_run(
    link: Link,
    port: int,
    cert_pem: bytes,
    ids: list[int],
    params: dict[str, Any],
    lifetime: float,
) -> dict[str, Any]:
    worker = _Worker(ids, params)
    open_channels = trio.Event()
    go = trio.Event()
    with trio.fail_after(lifetime):
        async with trio.open_nursery() as holders:
            for first in range(0, len(ids), CONNECT_BATCH):
                async with trio.open_nursery() as openers:
                    for k in ids[first : first + CONNECT_BATCH]:
                        openers.start_soon(
                            holders.start, _client, k, port, cert_pem, worker, open_channels, go
                        )
            link.send("connected")
            if await from_parent(link, lifetime) is None:  # every process is connected
                raise RuntimeError("the parent went away before the channels")
            open_channels.set()
            with trio.fail_after(CHANNEL_TIMEOUT + 10.0):
                await worker.all_streams.wait()
            link.send("streams")
            if await from_parent(link, lifetime) is None:
                raise RuntimeError("the parent went away before the start")
            go.set()
            holders.start_soon(worker.watch)
            while True:
                message = await from_parent(link, lifetime)
                if message is None:
                    raise RuntimeError("the parent went away during the run")
                if "killed_at" in message:
                    link.send(await worker.wait_back(message["killed_at"], message["limit"]))
                else:  # the end
                    break
            worker.stop_sending.set()
            with trio.move_on_after(params["drain"] + 1.0):
                await worker.all_finished.wait()
            link.send(worker.report())
            await from_parent(link, lifetime)  # stop
            worker.watching.cancel()
            worker.release.set()  # every client leaves its block
    return {"usage": usage()}


async def _client(
    k: int,
    port: int,
    cert_pem: bytes,
    worker: _Worker,
    open_channels: trio.Event,
    go: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = conec_trio.ClientConfig(
        id=client_id(k),
        coord_host=HOST,
        coord_port=port,
        ca=cert_pem,
        idle_timeout=worker.params["idle_timeout"],
    )
    partner = partner_of(k, worker.params["clients"])
    async with conec_trio.open_client(config) as client:
        worker.presence[k] = _Presence(client)
        task_status.started()
        if partner is None:
            await worker.release.wait()
            return
        await open_channels.wait()
        try:
            send, recv = await _direct_stream(client, k, partner)
        except Exception as exc:
            worker.errors.extend(f"{client_id(k)}: {type(e).__name__}: {e}" for e in _leaves(exc))
            worker.stream_ready()
            worker.finish_one()
            await worker.release.wait()
            return
        worker.seqs[k] = _Seq()
        worker.stream_ready()
        await go.wait()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_receive, k, partner, recv, worker)
                nursery.start_soon(_send, k, send, worker)
        except Exception as exc:  # a soak reports failures, it does not stop at the first
            worker.errors.extend(f"{client_id(k)}: {type(e).__name__}: {e}" for e in _leaves(exc))
        finally:
            worker.finish_one()
        await worker.release.wait()


async def _direct_stream(
    client: conec_trio.Client, k: int, partner: int
) -> tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[bytes]]:
    """The lower id opens the channel and the stream; the other one takes it."""
    with trio.fail_after(CHANNEL_TIMEOUT):
        if k < partner:
            await client.wait_for_peer(client_id(partner))
            await client.new_channel(client_id(partner))
            return await client.new_direct_stream(client_id(partner))
        incoming = await client.incoming_streams.receive()
        if incoming.peer != client_id(partner) or not incoming.stream_id.is_direct:
            raise RuntimeError(f"stream {incoming.stream_id} from {incoming.peer!r}")
        return incoming.send, incoming.recv


async def _send(k: int, send: trio.abc.SendChannel[bytes], worker: _Worker) -> None:
    """Numbered messages at a steady pace (a random phase per client) until told to stop."""
    interval = 1.0 / worker.params["rate"]
    padding = bytes(max(0, worker.params["size"] - HEADER.size))
    seq = 0
    worker.sent[k] = 0
    next_at = trio.current_time() + (k % 97) / 97 * interval
    while not worker.stop_sending.is_set():
        with trio.move_on_at(next_at):
            await worker.stop_sending.wait()
        if worker.stop_sending.is_set():
            break
        await send.send(HEADER.pack(k, seq, time.monotonic()) + padding)
        seq += 1
        worker.sent[k] = seq
        next_at += interval
    await send.aclose()


async def _receive(
    k: int, partner: int, recv: trio.abc.ReceiveChannel[bytes], worker: _Worker
) -> None:
    """Count until the partner's clean end; once sending stops, at most ``drain`` seconds."""
    seq_state = worker.seqs[k]
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:

            async def deadline_at_stop() -> None:
                await worker.stop_sending.wait()
                scope.deadline = trio.current_time() + worker.params["drain"]

            nursery.start_soon(deadline_at_stop)
            while True:
                try:
                    msg = await recv.receive()
                except trio.EndOfChannel:
                    worker.ended.add(k)
                    break
                now = time.monotonic()
                sender, seq, sent_at = HEADER.unpack_from(msg)
                if sender != partner:
                    worker.errors.append(f"{client_id(k)}: a message from {sender}")
                    continue
                if seq != seq_state.next:
                    worker.out_of_order += 1  # a gap or a step back
                seq_state.see(seq)
                worker.latencies.append(now - sent_at)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# The parent


def _signals(which: str, restarts: int) -> list[signal.Signals]:
    if which == "kill":
        return [signal.SIGKILL] * restarts
    if which == "term":
        return [signal.SIGTERM] * restarts
    return [signal.SIGKILL if i % 2 == 0 else signal.SIGTERM for i in range(restarts)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    clients, procs_n = args.clients, max(1, min(args.procs, args.clients))
    params = {
        "clients": clients,
        "rate": args.rate,
        "size": args.size,
        "drain": args.drain,
        "nice": args.client_nice,
        "idle_timeout": args.idle_timeout,
    }
    groups = [[k for k in range(clients) if k % procs_n == p] for p in range(procs_n)]
    connect_timeout = STARTUP_TIMEOUT + clients * 0.2
    per_restart = args.between + args.outage + args.back_timeout + STOP_TIMEOUT
    lifetime = connect_timeout + CHANNEL_TIMEOUT + args.restarts * per_restart + 300.0
    cert_pem, key_pem = self_signed_cert()
    wall = time.monotonic()
    restarts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, Processes() as procs:
        cert, key = Path(tmp) / "coord.pem", Path(tmp) / "coord.key"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        port = free_udp_port()
        coord = CoordProcess(port, cert, key)
        try:
            coord.start(STARTUP_TIMEOUT)
            print(f"coordinator: {' '.join(coord.command)}")
            workers = [
                procs.spawn(
                    f"soak clients {p + 1}/{procs_n}",
                    _clients_main,
                    cert_pem,
                    ids,
                    params,
                    lifetime,
                )
                for p, ids in enumerate(groups)
            ]
            for w in workers:
                w.send(port)
            t0 = time.monotonic()
            _expect(workers, "connected", connect_timeout)
            connect_s = time.monotonic() - t0
            t0 = time.monotonic()
            _send_all(workers, "channels")
            _expect(workers, "streams", CHANNEL_TIMEOUT + 20.0)
            channels_s = time.monotonic() - t0
            print(
                f"{clients} clients connected in {connect_s:.1f} s, direct streams up in "
                f"{channels_s:.1f} s; {args.restarts} restarts, {args.between:g} s apart"
            )
            _send_all(workers, {"start": time.monotonic()})
            for signum in _signals(args.signal, args.restarts):
                time.sleep(args.between)
                restarts.append(_restart(coord, signum, workers, args))
                print(_restart_line(len(restarts), restarts[-1], clients))
            time.sleep(args.between)
            _send_all(workers, {"end": time.monotonic()})
            reports = [w.recv(args.drain + STOP_TIMEOUT) for w in workers]
            _send_all(workers, "stop")
            for w in workers:
                w.recv(STOP_TIMEOUT)
            coord.stop(signal.SIGTERM, STOP_TIMEOUT)
        finally:
            coord.kill()
    return _summarize(args, params, reports, restarts, connect_s, time.monotonic() - wall, coord)


def _send_all(workers: list[Any], message: object) -> None:
    for w in workers:
        w.send(message)


def _expect(workers: list[Any], expected: str, timeout: float) -> None:
    for w in workers:
        value = w.recv(timeout)
        if value != expected:
            raise RuntimeError(f"{w.name}: sent {value!r}, expected {expected!r}")


def _restart(
    coord: CoordProcess, signum: signal.Signals, workers: list[Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Stop the coordinator, start a new one on the same port, and wait for every client."""
    killed_at = coord.stop(signum, STOP_TIMEOUT)
    time.sleep(args.outage)
    returned_at = coord.start(STARTUP_TIMEOUT)
    _send_all(workers, {"killed_at": killed_at, "limit": args.back_timeout})
    back: dict[int, tuple[float, float]] = {}
    missing: list[int] = []
    for w in workers:
        answer = w.recv(args.back_timeout + STOP_TIMEOUT)
        back.update(answer["back"])
        missing.extend(answer["missing"])
    lost_seen = [down - killed_at for down, _ in back.values()]
    since_return = [up - returned_at for _, up in back.values()]
    # The reconnect itself: from the later of the loss seen and the return to back.
    reconnecting = [up - max(down, returned_at) for down, up in back.values()]
    return {
        "signal": signum.name,
        "outage_s": round(returned_at - killed_at, 3),
        "back": len(back),
        "missing": missing,
        # From the coordinator's "ready on" to each client's return (wait_connected).
        "all_back_s": max(since_return) if since_return and not missing else None,
        "back_p50_s": statistics.median(since_return) if since_return else None,
        # From the signal to each client seeing the loss (a SIGKILLed coordinator says
        # nothing: its clients learn of it from the new one's stateless reset, on their
        # next packet, which on an idle connection is the keepalive).
        "loss_seen_max_s": max(lost_seen) if lost_seen else None,
        "loss_seen_p50_s": statistics.median(lost_seen) if lost_seen else None,
        "reconnect_max_s": max(reconnecting) if reconnecting else None,
    }


def _restart_line(n: int, r: dict[str, Any], clients: int) -> str:
    if r["all_back_s"] is None:
        head = f"{r['back']}/{clients} back, {len(r['missing'])} NOT BACK"
    else:
        head = f"all {clients} back {r['all_back_s']:.2f} s after its return"
    return (
        f"restart {n} ({r['signal']}, down {r['outage_s']:.2f} s): {head} "
        f"(median {r['back_p50_s']:.2f} s); loss seen {r['loss_seen_p50_s']:.2f} s median, "
        f"{r['loss_seen_max_s']:.2f} s at most after the signal; the reconnect itself "
        f"{r['reconnect_max_s']:.2f} s at most"
    )


def _summarize(
    args: argparse.Namespace,
    params: dict[str, Any],
    reports: list[dict[str, Any]],
    restarts: list[dict[str, Any]],
    connect_s: float,
    wall_s: float,
    coord: CoordProcess,
) -> dict[str, Any]:
    clients = params["clients"]
    sent: dict[int, int] = {}
    unique: dict[int, int] = {}
    latencies: list[float] = []
    errors: list[str] = []
    for r in reports:
        sent.update(r["sent"])
        unique.update(r["unique"])
        latencies.extend(r["latencies"])
        errors.extend(r["errors"])
    expected = sum(
        sent.get(p, 0) for k in range(clients) if (p := partner_of(k, clients)) is not None
    )
    delivered = sum(unique.values())
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "restarts",
        "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]),
        "coordinator_command": " ".join(coord.command),
        "params": {
            **params,
            "procs": len(reports),
            "restarts": args.restarts,
            "signal": args.signal,
            "between": args.between,
            "outage": args.outage,
            "idle_timeout": args.idle_timeout,
        },
        "connect_s": round(connect_s, 3),
        "wall_s": round(wall_s, 2),
        "restarts": restarts,
        "direct": {
            "sent": sum(sent.values()),
            "expected": expected,
            "delivered": delivered,
            "lost": expected - delivered,
            "gaps": sum(r["gaps"] for r in reports),
            "duplicated": sum(r["dup"] for r in reports),
            "out_of_order": sum(r["out_of_order"] for r in reports),
            "clean_ends": sum(r["ended"] for r in reports),
            "streams": sum(r["streams"] for r in reports),
            "latency": _percentiles(latencies),
        },
        "reconnects_seen": sum(r["reconnects"] for r in reports),
        "client_processes": [
            {"cpu_s": r["usage"]["cpu_s"], "peak_rss_mib": r["usage"]["maxrss_kib"] / 1024}
            for r in reports
        ],
        "errors": errors[:500],
        "error_count": len(errors),
    }


def format_summary(r: dict[str, Any]) -> str:
    d, prm = r["direct"], r["params"]
    lat = d["latency"]
    lines = [
        f"soak with restarts: {prm['clients']} clients in {prm['procs']} processes, "
        f"{prm['restarts']} coordinator restarts ({prm['signal']}), direct streams "
        f"{prm['rate']:g} msg/s per client; connect {r['connect_s']:.1f} s, wall "
        f"{r['wall_s']:.1f} s",
        f"  coordinator: {r['coordinator_command']}",
        *("  " + _restart_line(n, x, prm["clients"]) for n, x in enumerate(r["restarts"], start=1)),
        f"  direct: sent {d['sent']}, delivered {d['delivered']}/{d['expected']}, lost "
        f"{d['lost']}, duplicated {d['duplicated']}, out of order {d['out_of_order']}, clean "
        f"ends {d['clean_ends']}/{d['streams']}"
        + (
            ""
            if lat is None
            else f"; latency p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, "
            f"max {lat['max_ms']:.0f} ms"
        ),
        f"  reconnects seen: {r['reconnects_seen']} (expected {prm['restarts'] * prm['clients']})",
        "  client processes: "
        + ", ".join(
            f"CPU {cp['cpu_s']:.1f} s RSS {cp['peak_rss_mib']:.0f} MiB"
            for cp in r["client_processes"]
        ),
        f"  errors: {r['error_count']}",
        *(f"    {e}" for e in r["errors"][:10]),
    ]
    return "\n".join(lines)


def failed(r: dict[str, Any]) -> bool:
    d = r["direct"]
    return bool(
        r["error_count"]
        or d["lost"]
        or d["duplicated"]
        or d["out_of_order"]
        or d["clean_ends"] != d["streams"]
        or any(x["missing"] for x in r["restarts"])
        or r["reconnects_seen"] != r["params"]["restarts"] * r["params"]["clients"]
    )
