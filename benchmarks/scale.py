"""Scale: one coordinator holding many clients, what each costs it, and relaying among them.

``python -m benchmarks.scale [--clients 10 100 1000] [--idle 20] [--relay 5] [--json PATH]``
runs the measurement once per client count and prints a summary; the harness runs it as the
``scale_*`` cases (see ``cases.py``), one measurement per client count and round, each case
reading one of its numbers.

One coordinator process and one or two client processes (``spawn``), on 127.0.0.1:

1. **Connect.** The client processes connect their clients one process after the other, each
   in batches of 100 at a time (the last may be smaller), every client held open until the end.
   A process holds whole batches: one process up to 100 clients, two beyond that (1000 clients:
   two processes of 500). Each process times its own part, from the first ``open_client``
   entry until its last client is up, and the connect time is the sum: the same work, batch
   after batch, as ``connect_many`` does from one process (every config left at its defaults,
   so each client makes its ephemeral certificate inside ``open_client``, as there).
2. **Memory.** The coordinator's resident set (``VmRSS`` in ``/proc/<pid>/status``, read by
   the parent) once it listens and before any client, and again at the end of the idle
   window; the difference over the number of clients is the RSS per client.
3. **Idle CPU.** One second after the last client is up, the parent reads the coordinator's
   CPU time (``utime + stime`` in ``/proc/<pid>/stat``, every thread), waits out the idle
   window with every client connected and idle (default client config: keepalive on), and
   reads it again; idle CPU is that time over the window, in % of one core. The coordinator
   must still count every client afterwards.
4. **Relay.** Clients pair up across the client processes (client i with client i + N/2); the
   lower opens a proxied stream to its partner (``new_proxied_stream``), the partner takes it
   from ``incoming_streams``. Then, for the relay window, every pair plays ping-pong at once:
   a 64-byte message (pair, sequence number, ``time.monotonic()`` at sending) one way, the
   partner's own message back, the next one when it has arrived. So N/2 messages are in the
   coordinator at any time and everything goes through it. At the end of the window the
   opener stops and closes; messages still under way are waited for (at most 10 s). Reported:
   messages delivered during the window per second, messages lost (sent, never delivered) and
   duplicated or out of order (checked by sequence number), one-way latency p50/p99 (the
   monotonic clock is one system-wide clock on Linux, so times compare across processes), and
   the coordinator's CPU over the window in % of one core (100% = one core busy). The client
   processes run the relay at nice 10, so that on a small machine the load generators leave
   the coordinator, the thing under test, its core.

The connect time is judged against ``baseline_aioquic.connect_many`` for the same number of
connections (one process, batches of 100); everything else is an absolute number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

import conec_trio

from ._certs import self_signed_cert
from ._child import from_parent, trio_time, usage
from ._procs import Child, Link, Processes
from .harness import STOPPED

HOST = "127.0.0.1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
CONNECT_BATCH = 100
MAX_CLIENT_PROCS = 2
SETTLE_SECONDS = 1.0  # after the last client is up, before the idle window
MESSAGE_SIZE = 64
RELAY_DRAIN = 10.0  # seconds allowed after the relay window for messages under way
RELAY_NICE = 10
# (pair index, sequence number, send time as time.monotonic()), padded to MESSAGE_SIZE
HEADER = struct.Struct("!IQd")
PADDING = bytes(MESSAGE_SIZE - HEADER.size)
WARMUP = b"w" * MESSAGE_SIZE


def client_id(k: int) -> str:
    return f"scale-{k}"


# --------------------------------------------------------------------------------------------
# Reading another process (Linux /proc)


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` now (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 3; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


# --------------------------------------------------------------------------------------------
# The measurement (called in the harness process)


def measure(
    clients: int,
    idle_seconds: float,
    relay_seconds: float,
    batch: int = CONNECT_BATCH,
    relay_nice: int = RELAY_NICE,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One coordinator, ``clients`` clients: connect, memory, idle CPU, then relay between
    ``clients / 2`` pairs for ``relay_seconds`` (0: no relay). Returns a flat dict of numbers
    (see the module docstring). With ``profile``, py-spy samples the coordinator over the
    relay window into that file (raw, collapsed stacks)."""
    if clients < 2 or clients % 2:
        raise ValueError("clients must be an even number of at least 2")
    if batch < 1 or idle_seconds <= 0 or relay_seconds < 0:
        raise ValueError("batch and idle_seconds must be positive, relay_seconds not negative")
    batches = [list(range(i, min(i + batch, clients))) for i in range(0, clients, batch)]
    nprocs = min(MAX_CLIENT_PROCS, len(batches))
    per_proc = math.ceil(len(batches) / nprocs)
    groups = [
        [k for b in batches[p * per_proc : (p + 1) * per_proc] for k in b] for p in range(nprocs)
    ]
    connect_timeout = STARTUP_TIMEOUT + clients * 0.2
    lifetime = (
        2 * STARTUP_TIMEOUT + connect_timeout + idle_seconds + relay_seconds + RELAY_DRAIN + 300
    )
    cert_pem, key_pem = self_signed_cert()
    result: dict[str, Any] = {"clients": clients, "client_processes": nprocs}
    with Processes() as procs:
        coord = procs.spawn(
            "scale coordinator", _coord_main, cert_pem, key_pem, lifetime, side="server"
        )
        workers = [
            procs.spawn(
                f"scale clients {p + 1}/{nprocs}",
                _clients_main,
                cert_pem,
                ids,
                clients,
                batch,
                relay_nice,
                lifetime,
                side="client",
            )
            for p, ids in enumerate(groups)
        ]
        port = coord.recv(STARTUP_TIMEOUT)
        for w in workers:
            w.send(port)
        for w in workers:
            _expect(w, "ready", STARTUP_TIMEOUT)
        pid = _pid(coord)
        rss_before = rss_bytes(pid)

        # 1. Connect, one process after the other.
        connect_s = 0.0
        for w in workers:
            w.send("connect")
            connect_s += float(w.recv(connect_timeout))
        result["connect_s"] = connect_s
        _expect_count(coord, clients, "after connecting")

        # 2, 3. Idle.
        time.sleep(SETTLE_SECONDS)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(idle_seconds)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        rss_after = rss_bytes(pid)
        result["idle_window_s"] = t1 - t0
        result["idle_cpu_percent"] = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        result["rss_before_bytes"] = rss_before
        result["rss_after_bytes"] = rss_after
        result["rss_per_client_bytes"] = (rss_after - rss_before) / clients
        _expect_count(coord, clients, "after the idle window")

        # 4. Relay. Where it fails, the figures above still stand: the failure is where
        # this coordinator stops (STOPPED), and the processes are stopped on the way out.
        if relay_seconds > 0:
            try:
                result.update(_relay(coord, pid, workers, clients, relay_seconds, profile))
            except RuntimeError as exc:  # a child's failure (ChildError) or a wrong answer
                reason = str(exc).splitlines()[0]
                result[STOPPED] = f"relaying between {clients // 2} pairs: {reason}"
                return result

        for w in workers:
            w.send("stop")
        usage = [w.recv(STOP_TIMEOUT) for w in workers]
        coord.send("stop")
        coord_usage = coord.recv(STOP_TIMEOUT)
    result["client_cpu_s"] = sum(u["cpu_s"] for u in usage)
    result["client_peak_rss_bytes"] = max(u["maxrss_kib"] for u in usage) * 1024
    result["coord_peak_rss_bytes"] = coord_usage["maxrss_kib"] * 1024
    return result


def _relay(
    coord: Child,
    pid: int,
    workers: list[Child],
    clients: int,
    seconds: float,
    profile: Path | None = None,
) -> dict[str, Any]:
    pairing = time.monotonic()
    for w in workers:
        w.send("pair")
    for w in workers:
        _expect(w, "paired", STARTUP_TIMEOUT + clients * 0.1)
    pairing_s = time.monotonic() - pairing
    udp_before = udp_counters()
    start = time.monotonic() + 0.5
    plan = {"start": start, "end": start + seconds}
    for w in workers:
        w.send(plan)
    time.sleep(max(0.0, plan["start"] - time.monotonic()))
    spy = None if profile is None else _profile(pid, seconds, profile)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(max(0.0, plan["end"] - time.monotonic()))
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    if spy is not None:
        spy.wait(STOP_TIMEOUT)
    reports = [w.recv(seconds + RELAY_DRAIN + STOP_TIMEOUT) for w in workers]
    udp_after = udp_counters()
    sent = sum(r["sent"] for r in reports)
    delivered = sum(r["delivered"] for r in reports)
    in_window = sum(r["delivered_in_window"] for r in reports)
    latencies = sorted(lat for r in reports for lat in r["latencies"])
    errors = [e for r in reports for e in r["errors"]]
    out_of_order = sum(r["duplicated"] + r["gaps"] for r in reports)
    lost = sent - delivered
    _expect_count(coord, clients, "after relaying")

    def at(q: float) -> float:
        if not latencies:
            return math.nan
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000.0

    return {
        "relay_pairs": clients // 2,
        # Opening every pair's stream and one warm-up round trip on each, all at once.
        "relay_pairing_s": pairing_s,
        "relay_window_s": seconds,
        "relay_sent": sent,
        "relay_delivered": delivered,
        "relay_msgs_per_s": in_window / seconds,
        "relay_lost": lost,
        "relay_out_of_order": out_of_order,
        "relay_lost_or_dup": lost + out_of_order + len(errors),
        "relay_p50_ms": at(0.50),
        "relay_p99_ms": at(0.99),
        "relay_max_ms": latencies[-1] * 1000.0 if latencies else math.nan,
        "relay_mean_ms": statistics.fmean(latencies) * 1000.0 if latencies else math.nan,
        "relay_cpu_percent": 100.0 * (cpu1 - cpu0) / (t1 - t0),
        # The client processes together, over the same window (they are the load generators).
        "relay_client_cpu_percent": 100.0 * sum(r["cpu_s"] for r in reports) / seconds,
        # System-wide (other programs count too): datagrams the kernel dropped for a full
        # receive buffer while the relay ran, drain included.
        "relay_udp_rcvbuf_errors": udp_after.get("RcvbufErrors", 0)
        - udp_before.get("RcvbufErrors", 0),
        "relay_errors": len(errors),
        "relay_error_samples": errors[:20],
    }


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start py-spy sampling process ``pid`` for ``seconds`` (without pausing it) into
    ``out``, in py-spy's raw format (collapsed stacks, one per line, with counts)."""
    beside = Path(sys.executable).parent / "py-spy"  # a virtualenv's, else the PATH's
    command = [
        str(beside) if beside.exists() else "py-spy",
        "record",
        "--nonblocking",
        "--format",
        "raw",
        "-r",
        "250",
    ]
    command += ["-d", str(max(1, int(seconds))), "-p", str(pid), "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def udp_counters() -> dict[str, int]:
    """The kernel's UDP counters (system-wide), empty where there are none to read."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
    except (OSError, IndexError, ValueError):
        return {}


def _pid(child: Child) -> int:
    pid = child.pid
    if pid is None:
        raise RuntimeError(f"{child.name}: no process id")
    return pid


def _expect(child: Child, expected: str, timeout: float) -> None:
    value = child.recv(timeout)
    if value != expected:
        raise RuntimeError(f"{child.name}: sent {value!r}, expected {expected!r}")


def _expect_count(coord: Child, clients: int, when: str) -> None:
    coord.send("count")
    count = coord.recv(STARTUP_TIMEOUT)
    if count != clients:
        raise RuntimeError(f"the coordinator counts {count} clients {when}, not {clients}")


# --------------------------------------------------------------------------------------------
# Children (trio side)


def _coord_main(link: Link, cert_pem: bytes, key_pem: bytes, lifetime: float) -> None:
    link.send(trio.run(_coord_run, link, cert_pem, key_pem, lifetime))


async def _coord_run(
    link: Link, cert_pem: bytes, key_pem: bytes, lifetime: float
) -> dict[str, float]:
    """Coordinate until the parent says stop; answer ``count`` with ``num_clients``."""
    config = conec_trio.CoordConfig(cert_chain=cert_pem, private_key=key_pem, host=HOST, port=0)
    with trio.fail_after(lifetime):
        async with conec_trio.open_coordinator(config) as coord:
            link.send(coord.address[1])
            while await from_parent(link, lifetime) == "count":
                link.send(coord.num_clients)
    return usage()


class _RelayStats:
    def __init__(self) -> None:
        self.sent = 0
        self.delivered = 0
        self.delivered_in_window = 0
        self.duplicated = 0
        self.gaps = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.cpu_s = 0.0  # this process's CPU time over the window

    def report(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "delivered_in_window": self.delivered_in_window,
            "duplicated": self.duplicated,
            "gaps": self.gaps,
            "latencies": self.latencies,
            "errors": self.errors,
            "cpu_s": self.cpu_s,
        }


def _clients_main(
    link: Link,
    cert_pem: bytes,
    ids: list[int],
    clients: int,
    batch: int,
    relay_nice: int,
    lifetime: float,
) -> None:
    port = link.recv(STARTUP_TIMEOUT)
    link.send(
        trio.run(_clients_run, link, port, cert_pem, ids, clients, batch, relay_nice, lifetime)
    )


async def _clients_run(
    link: Link,
    port: int,
    cert_pem: bytes,
    ids: list[int],
    clients: int,
    batch: int,
    relay_nice: int,
    lifetime: float,
) -> dict[str, float]:
    """Hold this process's clients; obey ``connect``, ``pair``, a relay plan, ``stop``."""
    held: dict[int, conec_trio.Client] = {}
    streams: dict[int, tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[bytes]]] = {}
    release = trio.Event()
    with trio.fail_after(lifetime):
        async with trio.open_nursery() as holders:
            link.send("ready")
            while True:
                message = await from_parent(link, lifetime)
                if message == "connect":
                    link.send(await _connect(holders, port, cert_pem, ids, batch, held, release))
                elif message == "pair":
                    await _pair(held, clients, streams)
                    link.send("paired")
                elif isinstance(message, dict):
                    if relay_nice:
                        os.nice(relay_nice)
                    stats = _RelayStats()
                    await _relay_run(streams, clients, message, stats)
                    link.send(stats.report())
                else:  # "stop", or the parent has gone
                    break
            release.set()
    return usage()


async def _hold(
    k: int,
    port: int,
    cert_pem: bytes,
    held: dict[int, conec_trio.Client],
    release: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = conec_trio.ClientConfig(id=client_id(k), coord_host=HOST, coord_port=port, ca=cert_pem)
    async with conec_trio.open_client(config) as client:
        held[k] = client
        task_status.started()
        await release.wait()


async def _connect(
    holders: trio.Nursery,
    port: int,
    cert_pem: bytes,
    ids: list[int],
    batch: int,
    held: dict[int, conec_trio.Client],
    release: trio.Event,
) -> float:
    """Open this process's clients, ``batch`` at a time; seconds until the last is up."""
    start = time.perf_counter()
    for first in range(0, len(ids), batch):
        async with trio.open_nursery() as openers:
            for k in ids[first : first + batch]:
                openers.start_soon(holders.start, _hold, k, port, cert_pem, held, release)
    elapsed = time.perf_counter() - start
    if len(held) != len(ids):
        raise RuntimeError(f"{len(held)} clients up, not {len(ids)}")
    return elapsed


def _partner(k: int, clients: int) -> int:
    return (k + clients // 2) % clients


async def _pair(
    held: dict[int, conec_trio.Client],
    clients: int,
    streams: dict[int, tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[bytes]]],
) -> None:
    """Each client here gets its stream to or from its partner (the lower id opens), and
    the pair makes one warm-up round trip on it (not counted in the relay)."""

    async def one(k: int, client: conec_trio.Client) -> None:
        partner = _partner(k, clients)
        if k < partner:
            send, recv = streams[k] = await client.new_proxied_stream(client_id(partner))
            await send.send(WARMUP)
            if await recv.receive() != WARMUP:
                raise RuntimeError(f"{client_id(k)}: a wrong warm-up answer")
        else:
            incoming = await client.incoming_streams.receive()
            if incoming.peer != client_id(partner):
                raise RuntimeError(f"{client_id(k)}: a stream from {incoming.peer!r}")
            streams[k] = (incoming.send, incoming.recv)
            if await incoming.recv.receive() != WARMUP:
                raise RuntimeError(f"{client_id(k)}: a wrong warm-up message")
            await incoming.send.send(WARMUP)

    with trio.fail_after(STARTUP_TIMEOUT + clients * 0.1):
        async with trio.open_nursery() as nursery:
            for k, client in held.items():
                nursery.start_soon(one, k, client)


async def _relay_run(
    streams: dict[int, tuple[trio.abc.SendChannel[bytes], trio.abc.ReceiveChannel[bytes]]],
    clients: int,
    plan: dict[str, float],
    stats: _RelayStats,
) -> None:
    start, end = plan["start"], plan["end"]
    drain_at = trio_time(end + RELAY_DRAIN)

    def received(msg: bytes, pair: int, expected: int) -> int:
        """Check and count one message; the next sequence number expected."""
        now = time.monotonic()
        got_pair, seq, sent_at = HEADER.unpack_from(msg)
        if got_pair != pair or len(msg) != MESSAGE_SIZE:
            stats.errors.append(f"pair {pair}: a message of pair {got_pair}, {len(msg)} bytes")
        if seq < expected:
            stats.duplicated += 1
            return expected
        stats.gaps += seq - expected
        stats.delivered += 1
        if now <= end:
            stats.delivered_in_window += 1
        stats.latencies.append(now - sent_at)
        return seq + 1

    async def opener(pair: int) -> None:
        send, recv = streams[pair]
        seq = expected = 0
        await trio.sleep_until(trio_time(start))
        with trio.move_on_at(drain_at):
            while time.monotonic() < end:
                await send.send(HEADER.pack(pair, seq, time.monotonic()) + PADDING)
                stats.sent += 1
                seq += 1
                expected = received(await recv.receive(), pair, expected)
            await send.aclose()
            async for msg in recv:  # nothing more is due: anything here is out of turn
                expected = received(msg, pair, expected)

    async def answerer(k: int) -> None:
        pair = _partner(k, clients)
        send, recv = streams[k]
        seq = expected = 0
        with trio.move_on_at(drain_at):
            async for msg in recv:
                expected = received(msg, pair, expected)
                await send.send(HEADER.pack(pair, seq, time.monotonic()) + PADDING)
                stats.sent += 1
                seq += 1
            await send.aclose()

    async def guarded(fn: Any, arg: int) -> None:
        try:
            await fn(arg)
        except Exception as exc:  # report, and let the other pairs go on
            stats.errors.append(f"{client_id(arg)}: {type(exc).__name__}: {exc}")

    async def window_cpu() -> None:
        await trio.sleep_until(trio_time(start))
        cpu0 = usage()["cpu_s"]
        await trio.sleep_until(trio_time(end))
        stats.cpu_s = usage()["cpu_s"] - cpu0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(window_cpu)
        for k in streams:
            if k < _partner(k, clients):
                nursery.start_soon(guarded, opener, k)
            else:
                nursery.start_soon(guarded, answerer, k)


# --------------------------------------------------------------------------------------------
# Standalone


def format_summary(r: dict[str, Any]) -> str:
    lines = [
        f"{r['clients']} clients ({r['client_processes']} client process(es)): connected in "
        f"{r['connect_s']:.2f} s; coordinator RSS {r['rss_before_bytes'] / 2**20:.1f} -> "
        f"{r['rss_after_bytes'] / 2**20:.1f} MiB = {r['rss_per_client_bytes'] / 1000:.1f} kB "
        f"per client; idle CPU {r['idle_cpu_percent']:.2f}% over {r['idle_window_s']:.1f} s",
    ]
    if "relay_pairs" in r:
        lines.append(
            f"  relay: {r['relay_pairs']} streams opened and warmed up (one round trip each) in "
            f"{r['relay_pairing_s']:.2f} s; ping-pong for {r['relay_window_s']:g} s: "
            f"{r['relay_msgs_per_s']:,.0f} msgs/s delivered; sent {r['relay_sent']}, delivered "
            f"{r['relay_delivered']}, lost {r['relay_lost']}, duplicated/out of order "
            f"{r['relay_out_of_order']}, errors {r['relay_errors']}; latency p50 "
            f"{r['relay_p50_ms']:.1f} ms, p99 {r['relay_p99_ms']:.1f} ms, max "
            f"{r['relay_max_ms']:.1f} ms; CPU: coordinator {r['relay_cpu_percent']:.0f}%, client "
            f"processes {r['relay_client_cpu_percent']:.0f}%; UDP receive-buffer drops "
            f"(system-wide) {r['relay_udp_rcvbuf_errors']}"
        )
        lines.extend(f"    {e}" for e in r["relay_error_samples"])
    if STOPPED in r:
        lines.append(f"  stopped here: {r[STOPPED]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="One coordinator holding many conec_trio clients: connect time, "
        "coordinator RSS per client, idle CPU, and relaying between all the pairs at once.",
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument("--relay", type=float, default=5.0, help="relay window, seconds (0: none)")
    parser.add_argument(
        "--relay-nice", type=int, default=RELAY_NICE, help="client niceness while relaying"
    )
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "scale.json", metavar="PATH")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="sample the coordinator with py-spy over the relay window into PATH (raw "
        "collapsed stacks; with several client counts, the last run's)",
    )
    args = parser.parse_args(argv)
    if any(n < 2 or n % 2 for n in args.clients):
        parser.error("client counts must be even and at least 2")
    if args.idle <= 0 or args.relay < 0:
        parser.error("--idle must be positive, --relay not negative")
    results = []
    failed = False
    for n in args.clients:
        r = measure(n, args.idle, args.relay, relay_nice=args.relay_nice, profile=args.profile)
        print(format_summary(r), flush=True)
        results.append(r)
        failed = failed or bool(r.get("relay_lost_or_dup")) or STOPPED in r
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"json: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
