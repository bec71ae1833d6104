"""Soak test: many clients, steady traffic for a fixed time, nothing may go missing.

``python -m benchmarks.soak [--clients 500] [--seconds 30] [--procs 4] [--rate 1]
[--broadcast-rate 2] [--size 64] [--drain 10] [--client-nice 10] [--json PATH]``

``python -m benchmarks.soak --restarts 5 [--signal kill|term|both] [--between 5]
[--outage 1] [--back-timeout 30] ...``: the coordinator is restarted during the run, with
direct streams carrying numbered messages throughout (see ``soak_restarts``).

One coordinator process, and the clients spread over a few processes (``--procs``, each
holding its share of the clients). Every client

* exchanges proxied messages with a partner (clients 0-1, 2-3, ...; partners sit in different
  processes): the lower id opens the stream, both send on it ``--rate`` messages per second;
* is a member of one broadcast channel on which all clients together send
  ``--broadcast-rate`` messages per second (each client in turn), every message reaching every
  member, the sender included.

Every message carries (sender, sequence number, send time). Receivers count what is delivered,
what is lost (gaps in the sequence, or missing at the end), and what is duplicated, and
measure latency: send times are ``time.monotonic()``, which on Linux is one system-wide clock,
so they compare across processes. The client processes run at a lower priority (nice 10) so
that on a small machine the load generators leave the coordinator, the thing under test, its
share of the CPU. When the time is up every sender closes its streams; the
receivers then drain until ``EndOfChannel`` (at most ``--drain`` seconds); whatever has not
arrived by then counts as lost. The coordinator process reports its peak RSS and the CPU
time it used during the steady phase.

It prints a summary and writes JSON (default ``benchmarks/results/soak.json``). Every wait is
bounded; every process is stopped at the end, killed if it lingers. Exit status 1 if anything
was lost, duplicated or failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import trio

import conec_trio

from ._certs import self_signed_cert
from ._child import from_parent, trio_time, usage
from ._procs import Link, Processes

HOST = "127.0.0.1"
BROADCAST_NAME = "soak"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CONNECT_BATCH = 50  # clients one process connects at once
# (sender index, sequence number, send time as time.monotonic())
HEADER = struct.Struct("!IQd")


def client_id(k: int) -> str:
    return f"soak-{k}"


def partner_of(k: int, clients: int) -> int | None:
    partner = k ^ 1
    return partner if partner < clients else None


# --------------------------------------------------------------------------------------------
# Coordinator process


def _coord_main(link: Link, cert_pem: bytes, key_pem: bytes, lifetime: float) -> None:
    link.send(trio.run(_coord_run, link, cert_pem, key_pem, lifetime))


async def _coord_run(
    link: Link, cert_pem: bytes, key_pem: bytes, lifetime: float
) -> dict[str, Any]:
    config = conec_trio.CoordConfig(cert_chain=cert_pem, private_key=key_pem, host=HOST, port=0)
    report: dict[str, Any] = {}
    with trio.fail_after(lifetime):
        async with conec_trio.open_coordinator(config) as coord:
            link.send(coord.address[1])
            plan = await from_parent(link, lifetime)  # {"start": t, "end": t}
            if plan is None:
                return report
            samples: list[int] = []
            async with trio.open_nursery() as nursery:

                async def sample() -> None:
                    while True:
                        samples.append(coord.num_clients)
                        await trio.sleep(1.0)

                nursery.start_soon(sample)
                await trio.sleep_until(trio_time(plan["start"]))
                report["at_start"] = {**usage(), "clients": coord.num_clients}
                await trio.sleep_until(trio_time(plan["end"]))
                report["at_end"] = {**usage(), "clients": coord.num_clients}
                await from_parent(link, lifetime)  # stop
                nursery.cancel_scope.cancel()
            report["clients_min"] = min(samples) if samples else 0
            report["clients_max"] = max(samples) if samples else 0
    report["final"] = usage()
    return report


# --------------------------------------------------------------------------------------------
# Client processes


class _Seq:
    """Sequence tracking for one sender as seen by one receiver (an ordered stream)."""

    __slots__ = ("dup", "gaps", "next", "unique")

    def __init__(self) -> None:
        self.next = 0
        self.unique = 0
        self.dup = 0
        self.gaps = 0

    def see(self, seq: int) -> None:
        if seq >= self.next:
            self.gaps += seq - self.next
            self.next = seq + 1
            self.unique += 1
        else:
            self.dup += 1


class _ProcStats:
    def __init__(self) -> None:
        self.sent_p2p: dict[int, int] = {}
        self.sent_bcast: dict[int, int] = {}
        self.p2p: dict[int, _Seq] = {}  # receiver -> its partner's sequence
        self.bcast: dict[int, dict[int, _Seq]] = {}  # receiver -> sender -> sequence
        # (send time, latency) per delivered message
        self.lat_p2p: list[tuple[float, float]] = []
        self.lat_bcast: list[tuple[float, float]] = []
        self.bad_p2p_sender = 0
        self.p2p_ended: set[int] = set()  # receivers that saw their partner's clean end
        self.bcast_ended: set[int] = set()
        self.errors: list[str] = []
        self.finished = 0  # clients whose work is over (done or failed)
        self.all_finished = trio.Event()
        self.expected = 0

    def finish_one(self) -> None:
        self.finished += 1
        if self.finished >= self.expected:
            self.all_finished.set()

    def report(self) -> dict[str, Any]:
        bcast_unique: dict[int, int] = {}
        bcast_dup = bcast_gaps = 0
        for seqs in self.bcast.values():
            for sender, s in seqs.items():
                bcast_unique[sender] = bcast_unique.get(sender, 0) + s.unique
                bcast_dup += s.dup
                bcast_gaps += s.gaps
        return {
            "sent_p2p": self.sent_p2p,
            "sent_bcast": self.sent_bcast,
            "p2p_unique": {k: s.unique for k, s in self.p2p.items()},
            "p2p_dup": sum(s.dup for s in self.p2p.values()),
            "p2p_gaps": sum(s.gaps for s in self.p2p.values()),
            "bad_p2p_sender": self.bad_p2p_sender,
            "p2p_ended": len(self.p2p_ended),
            "bcast_receivers": len(self.bcast),
            "bcast_ended": len(self.bcast_ended),
            "bcast_unique": bcast_unique,
            "bcast_dup": bcast_dup,
            "bcast_gaps": bcast_gaps,
            "lat_p2p": self.lat_p2p,
            "lat_bcast": self.lat_bcast,
            "errors": self.errors,
            "usage": usage(),
        }


def _clients_main(
    link: Link, cert_pem: bytes, ids: list[int], params: dict[str, Any], lifetime: float
) -> None:
    if params["nice"]:
        os.nice(params["nice"])
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
    stats = _ProcStats()
    stats.expected = len(ids)
    plan: dict[str, float] = {}
    go = trio.Event()
    release = trio.Event()
    with trio.fail_after(lifetime):
        async with trio.open_nursery() as holders:
            for first in range(0, len(ids), CONNECT_BATCH):
                async with trio.open_nursery() as openers:
                    for k in ids[first : first + CONNECT_BATCH]:
                        openers.start_soon(
                            holders.start,
                            _client,
                            k,
                            port,
                            cert_pem,
                            params,
                            plan,
                            go,
                            release,
                            stats,
                        )
            link.send("connected")
            message = await from_parent(link, lifetime)
            if message is None:
                raise RuntimeError("the parent went away before the start")
            plan.update(message)
            go.set()
            # Every client's work ends by the end of the drain at the latest.
            with trio.move_on_at(trio_time(plan["end"] + params["drain"]) + 1.0):
                await stats.all_finished.wait()
            link.send(stats.report())
            await from_parent(link, lifetime)  # stop
            release.set()
    return {"usage": usage()}


async def _client(
    k: int,
    port: int,
    cert_pem: bytes,
    params: dict[str, Any],
    plan: dict[str, float],
    go: trio.Event,
    release: trio.Event,
    stats: _ProcStats,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = conec_trio.ClientConfig(id=client_id(k), coord_host=HOST, coord_port=port, ca=cert_pem)
    async with conec_trio.open_client(config) as client:
        bsend, brecv = await client.new_broadcast(BROADCAST_NAME)
        task_status.started()
        await go.wait()
        try:
            await _client_work(k, client, bsend, brecv, params, plan, stats)
        except Exception as exc:  # a soak reports failures, it does not stop at the first
            for leaf in _leaves(exc):
                stats.errors.append(f"{client_id(k)}: {type(leaf).__name__}: {leaf}")
        finally:
            stats.finish_one()
        await release.wait()


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _client_work(
    k: int,
    client: conec_trio.Client,
    bsend: trio.abc.SendChannel[bytes],
    brecv: trio.abc.ReceiveChannel[conec_trio.BroadcastMessage[bytes]],
    params: dict[str, Any],
    plan: dict[str, float],
    stats: _ProcStats,
) -> None:
    clients = params["clients"]
    drain_at = trio_time(plan["end"] + params["drain"])
    partner = partner_of(k, clients)
    stats.bcast[k] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive_broadcast, k, brecv, drain_at, stats)
        bcast_interval = clients / params["broadcast_rate"] if params["broadcast_rate"] else 0
        nursery.start_soon(_send_loop, k, bsend, bcast_interval, plan, params, stats.sent_bcast)
        if partner is not None:
            send: trio.abc.SendChannel[bytes]
            recv: trio.abc.ReceiveChannel[bytes]
            with trio.fail_after(30.0):
                if k < partner:
                    send, recv = await client.new_proxied_stream(client_id(partner))
                else:
                    incoming = await client.incoming_streams.receive()
                    if incoming.peer != client_id(partner):
                        raise RuntimeError(f"stream from {incoming.peer!r}, not the partner")
                    send, recv = incoming.send, incoming.recv
            stats.p2p[k] = _Seq()
            nursery.start_soon(_receive_p2p, k, partner, recv, drain_at, stats)
            interval = 1 / params["rate"] if params["rate"] else 0
            nursery.start_soon(_send_loop, k, send, interval, plan, params, stats.sent_p2p)


async def _send_loop(
    k: int,
    send: trio.abc.SendChannel[bytes],
    interval: float,
    plan: dict[str, float],
    params: dict[str, Any],
    sent: dict[int, int],
) -> None:
    """Send at a steady pace (a random phase per client) until the end, then close."""
    seq = 0
    sent[k] = 0
    padding = bytes(max(0, params["size"] - HEADER.size))
    if interval > 0:
        t = plan["start"] + random.Random(k).random() * interval
        while t < plan["end"]:
            await trio.sleep_until(trio_time(t))
            await send.send(HEADER.pack(k, seq, time.monotonic()) + padding)
            seq += 1
            sent[k] = seq
            t += interval
    # Closing ends the partner's stream (or, once every member did, the broadcast channel):
    # not before the end, so that the streams stay in place for the whole run.
    await trio.sleep_until(trio_time(plan["end"]))
    await send.aclose()


async def _receive_p2p(
    k: int,
    partner: int,
    recv: trio.abc.ReceiveChannel[bytes],
    drain_at: float,
    stats: _ProcStats,
) -> None:
    seq_state = stats.p2p[k]
    with trio.move_on_at(drain_at):
        while True:
            try:
                msg = await recv.receive()
            except trio.EndOfChannel:
                stats.p2p_ended.add(k)
                break
            now = time.monotonic()
            sender, seq, sent_at = HEADER.unpack_from(msg)
            if sender != partner:
                stats.bad_p2p_sender += 1
                continue
            seq_state.see(seq)
            stats.lat_p2p.append((sent_at, now - sent_at))


async def _receive_broadcast(
    k: int,
    brecv: trio.abc.ReceiveChannel[conec_trio.BroadcastMessage[bytes]],
    drain_at: float,
    stats: _ProcStats,
) -> None:
    seqs = stats.bcast[k]
    with trio.move_on_at(drain_at):
        while True:
            try:
                msg = await brecv.receive()
            except trio.EndOfChannel:
                stats.bcast_ended.add(k)
                break
            now = time.monotonic()
            sender, seq, sent_at = HEADER.unpack_from(msg.data)
            if msg.sender != client_id(sender):
                stats.errors.append(f"broadcast from {msg.sender!r} claims sender {sender}")
            state = seqs.get(sender)
            if state is None:
                state = seqs[sender] = _Seq()
            state.see(seq)
            stats.lat_bcast.append((sent_at, now - sent_at))


# --------------------------------------------------------------------------------------------
# The parent


def _percentiles(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0

    return {
        "count": len(ordered),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "max_ms": ordered[-1] * 1000.0,
        "mean_ms": statistics.fmean(ordered) * 1000.0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    clients, procs_n = args.clients, max(1, min(args.procs, args.clients))
    params = {
        "clients": clients,
        "rate": args.rate,
        "broadcast_rate": args.broadcast_rate,
        "size": args.size,
        "drain": args.drain,
        "nice": args.client_nice,
    }
    groups = [[k for k in range(clients) if k % procs_n == p] for p in range(procs_n)]
    connect_timeout = STARTUP_TIMEOUT + clients * 0.2
    lifetime = connect_timeout + args.seconds + args.drain + 2 * STOP_TIMEOUT + 30.0
    cert_pem, key_pem = self_signed_cert()
    wall = time.monotonic()
    udp_before = _udp_counters()
    with Processes() as procs:
        coord = procs.spawn("soak coordinator", _coord_main, cert_pem, key_pem, lifetime)
        workers = [
            procs.spawn(
                f"soak clients {p + 1}/{procs_n}", _clients_main, cert_pem, ids, params, lifetime
            )
            for p, ids in enumerate(groups)
        ]
        port = coord.recv(STARTUP_TIMEOUT)
        for w in workers:
            w.send(port)
        connect_start = time.monotonic()
        for w in workers:
            value = w.recv(connect_timeout)
            if value != "connected":
                raise RuntimeError(f"{w.name}: sent {value!r}, expected 'connected'")
        connect_s = time.monotonic() - connect_start
        print(f"{clients} clients connected in {connect_s:.1f} s; running {args.seconds:g} s")
        # A little lead so that every pair has opened its stream before the start.
        start = time.monotonic() + 1.0 + clients * 0.004
        plan = {"start": start, "end": start + args.seconds}
        coord.send(plan)
        for w in workers:
            w.send(plan)
        wait = plan["end"] + args.drain + 1.0 - time.monotonic() + STOP_TIMEOUT
        reports = [w.recv(wait) for w in workers]
        for w in workers:
            w.send("stop")
        coord.send("stop")
        for w in workers:
            w.recv(STOP_TIMEOUT)
        coord_report = coord.recv(STOP_TIMEOUT)
    udp_after = _udp_counters()
    coord_report["udp"] = {
        k: udp_after[k] - udp_before[k]
        for k in ("InDatagrams", "OutDatagrams", "RcvbufErrors", "SndbufErrors")
        if k in udp_after and k in udp_before
    }
    return _summarize(
        args, plan["start"], params, reports, coord_report, connect_s, time.monotonic() - wall
    )


def _by_second(
    samples: list[tuple[float, float]], start: float, seconds: float
) -> list[dict[str, float] | None]:
    buckets: list[list[float]] = [[] for _ in range(max(1, math.ceil(seconds)))]
    for sent_at, lat in samples:
        i = int(sent_at - start)
        if 0 <= i < len(buckets):
            buckets[i].append(lat)
    return [_percentiles(b) for b in buckets]


def _summarize(
    args: argparse.Namespace,
    plan_start: float,
    params: dict[str, Any],
    reports: list[dict[str, Any]],
    coord: dict[str, Any],
    connect_s: float,
    wall_s: float,
) -> dict[str, Any]:
    clients = params["clients"]
    sent_p2p: dict[int, int] = {}
    sent_bcast: dict[int, int] = {}
    p2p_unique: dict[int, int] = {}
    bcast_unique: dict[int, int] = {}
    lat_p2p: list[tuple[float, float]] = []
    lat_bcast: list[tuple[float, float]] = []
    errors: list[str] = []
    for r in reports:
        sent_p2p.update(r["sent_p2p"])
        sent_bcast.update(r["sent_bcast"])
        p2p_unique.update(r["p2p_unique"])
        for sender, n in r["bcast_unique"].items():
            bcast_unique[sender] = bcast_unique.get(sender, 0) + n
        lat_p2p.extend(r["lat_p2p"])
        lat_bcast.extend(r["lat_bcast"])
        errors.extend(r["errors"])
    # Point to point: what each client's partner sent, against what the client got.
    p2p_expected = sum(
        sent_p2p.get(p, 0) for k in range(clients) if (p := partner_of(k, clients)) is not None
    )
    p2p_delivered = sum(p2p_unique.values())
    # Broadcast: every message goes to every member, its sender included.
    members = sum(r["bcast_receivers"] for r in reports)
    bcast_expected = sum(sent_bcast.values()) * members
    bcast_delivered = sum(bcast_unique.values())
    start, end = coord.get("at_start", {}), coord.get("at_end", {})
    steady_cpu = end.get("cpu_s", math.nan) - start.get("cpu_s", math.nan)
    result = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {**params, "seconds": args.seconds, "procs": len(reports)},
        "connect_s": round(connect_s, 3),
        "wall_s": round(wall_s, 2),
        "p2p": {
            "sent": sum(sent_p2p.values()),
            "expected": p2p_expected,
            "delivered": p2p_delivered,
            "lost": p2p_expected - p2p_delivered,
            "gaps": sum(r["p2p_gaps"] for r in reports),
            "duplicated": sum(r["p2p_dup"] for r in reports),
            "wrong_sender": sum(r["bad_p2p_sender"] for r in reports),
            "clean_ends": sum(r["p2p_ended"] for r in reports),
            "streams": len(p2p_unique),
            "latency": _percentiles([lat for _, lat in lat_p2p]),
        },
        "broadcast": {
            "sent": sum(sent_bcast.values()),
            "members": members,
            "expected": bcast_expected,
            "delivered": bcast_delivered,
            "lost": bcast_expected - bcast_delivered,
            "gaps": sum(r["bcast_gaps"] for r in reports),
            "duplicated": sum(r["bcast_dup"] for r in reports),
            "clean_ends": sum(r["bcast_ended"] for r in reports),
            "latency": _percentiles([lat for _, lat in lat_bcast]),
        },
        # Latency of both kinds by the second of the run its message was sent in: a queue
        # that keeps growing shows as a rising line.
        "latency_by_second": _by_second([*lat_p2p, *lat_bcast], plan_start, args.seconds),
        "coordinator": {
            "peak_rss_mib": coord.get("final", {}).get("maxrss_kib", math.nan) / 1024,
            "cpu_steady_s": steady_cpu,
            "cpu_steady_share": steady_cpu / args.seconds,
            "cpu_total_s": coord.get("final", {}).get("cpu_s"),
            "clients_at_start": start.get("clients"),
            "clients_at_end": end.get("clients"),
            "clients_min_sampled": coord.get("clients_min"),
        },
        "udp_system_wide": coord.get("udp", {}),
        "client_processes": [
            {"cpu_s": r["usage"]["cpu_s"], "peak_rss_mib": r["usage"]["maxrss_kib"] / 1024}
            for r in reports
        ],
        "errors": errors[:500],
        "error_count": len(errors),
    }
    return result


def _lat(lat: dict[str, float] | None) -> str:
    if lat is None:
        return "latency -"
    return (
        f"latency p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, "
        f"max {lat['max_ms']:.1f} ms ({lat['count']} samples)"
    )


def _lost(kind: dict[str, Any]) -> str:
    late = kind["lost"] - kind["gaps"]
    return f"{kind['gaps']} in gaps, {late} not arrived by the end of the drain"


def _udp_counters() -> dict[str, int]:
    """The kernel's UDP counters (system-wide: other programs' traffic counts too)."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
    except (OSError, IndexError, ValueError):
        return {}


def format_summary(r: dict[str, Any]) -> str:
    p, b, c = r["p2p"], r["broadcast"], r["coordinator"]
    prm = r["params"]
    lines = [
        f"soak: {prm['clients']} clients in {prm['procs']} processes, {prm['seconds']:g} s; "
        f"pairs {prm['rate']:g} msg/s per client, broadcast {prm['broadcast_rate']:g} msg/s "
        f"in all, {prm['size']} bytes; connect {r['connect_s']:.1f} s, wall {r['wall_s']:.1f} s",
        f"  pairs:     sent {p['sent']}, delivered {p['delivered']}/{p['expected']}, "
        f"lost {p['lost']} ({_lost(p)}), duplicated {p['duplicated']}, "
        f"clean ends {p['clean_ends']}/{p['streams']}; {_lat(p['latency'])}",
        f"  broadcast: sent {b['sent']} to {b['members']} members, delivered "
        f"{b['delivered']}/{b['expected']}, lost {b['lost']} ({_lost(b)}), "
        f"duplicated {b['duplicated']}, clean ends {b['clean_ends']}/{b['members']}; "
        f"{_lat(b['latency'])}",
        f"  coordinator: peak RSS {c['peak_rss_mib']:.0f} MiB, CPU {c['cpu_steady_s']:.2f} s "
        f"during the {prm['seconds']:g} s run ({100 * c['cpu_steady_share']:.0f}% of a core), "
        f"{c['cpu_total_s']:.2f} s in all; clients at start/end {c['clients_at_start']}/"
        f"{c['clients_at_end']}",
        "  client processes: "
        + ", ".join(
            f"CPU {cp['cpu_s']:.1f} s RSS {cp['peak_rss_mib']:.0f} MiB"
            for cp in r["client_processes"]
        ),
        "  latency p50 by second (ms): "
        + " ".join("-" if x is None else f"{x['p50_ms']:.0f}" for x in r["latency_by_second"]),
        "  UDP (system-wide): " + ", ".join(f"{k} {v}" for k, v in r["udp_system_wide"].items()),
        f"  errors: {r['error_count']}",
    ]
    kinds: dict[str, int] = {}
    for e in r["errors"]:
        kind = re.sub(r"soak-\d+", "soak-N", e.split(": ", 1)[1] if ": " in e else e)
        kinds[kind] = kinds.get(kind, 0) + 1
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1])[:10]
    lines.extend(f"    {n} x {kind}" for kind, n in ranked)
    return "\n".join(lines)


def failed(r: dict[str, Any]) -> bool:
    p, b = r["p2p"], r["broadcast"]
    return bool(
        r["error_count"]
        or p["lost"]
        or p["duplicated"]
        or p["wrong_sender"]
        or b["lost"]
        or b["duplicated"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Many conec_trio clients exchanging proxied and broadcast messages at a "
        "steady rate for a fixed time; counts delivered, lost and duplicated messages.",
    )
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0, help="steady phase length")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="messages/s each client sends to its partner"
    )
    parser.add_argument(
        "--broadcast-rate",
        type=float,
        default=2.0,
        help="broadcast messages/s sent by all clients together (each reaches every member)",
    )
    parser.add_argument("--size", type=int, default=64, help="message size in bytes (>= 20)")
    parser.add_argument(
        "--drain", type=float, default=10.0, help="seconds allowed after the end to drain"
    )
    parser.add_argument(
        "--client-nice",
        type=int,
        default=10,
        metavar="N",
        help="run the client processes at this niceness, so that on a small machine the "
        "load generators do not starve the coordinator under test (default 10; 0: off)",
    )
    restarts = parser.add_argument_group(
        "coordinator restarts",
        "With --restarts N, the coordinator is the real program, stopped and started again on "
        "the same port N times, and the traffic is numbered messages on a direct stream per "
        "pair (no proxied or broadcast traffic; --seconds and --broadcast-rate do not apply): "
        "see benchmarks/soak_restarts.py",
    )
    restarts.add_argument("--restarts", type=int, default=0, metavar="N")
    restarts.add_argument(
        "--signal",
        choices=["kill", "term", "both"],
        default="both",
        help="how the coordinator is stopped: SIGKILL, SIGTERM, or in turn starting with "
        "SIGKILL (default)",
    )
    restarts.add_argument(
        "--between", type=float, default=5.0, help="seconds of traffic before each restart"
    )
    restarts.add_argument(
        "--outage", type=float, default=1.0, help="seconds the coordinator stays down"
    )
    restarts.add_argument(
        "--back-timeout",
        type=float,
        default=30.0,
        help="seconds after a restart by which every client must be back",
    )
    restarts.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help="the clients' idle timeout (default: the library's, 10 s). A SIGKILLed "
        "coordinator says nothing: an idle client learns of it from the new one's stateless "
        "reset to its next packet, its keepalive after half this",
    )
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "soak.json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.procs < 1 or args.drain < 0:
        parser.error("--clients, --seconds and --procs must be positive, --drain not negative")
    if args.rate < 0 or args.broadcast_rate < 0:
        parser.error("rates must not be negative")
    args.size = max(args.size, HEADER.size)
    if args.restarts > 0:
        if args.rate <= 0 or args.between <= 0 or args.outage < 0:
            parser.error("with --restarts, --rate and --between must be positive")
        from . import soak_restarts  # it imports this module

        result = soak_restarts.run(args)
        print(soak_restarts.format_summary(result))
        is_failed = soak_restarts.failed(result)
    else:
        result = run(args)
        print(format_summary(result))
        is_failed = failed(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"json: {args.json}")
    return 1 if is_failed else 0


if __name__ == "__main__":
    sys.exit(main())
