"""What three attacks cost a coordinator (hostile input, rows 5-7): memory, CPU and time.

    python -m benchmarks.hostile_cost relay [--streams 300]
    python -m benchmarks.hostile_cost control [--requests 300000]
    python -m benchmarks.hostile_cost flood [--initials 5000]

The coordinator runs in a child process with default settings on loopback; this process
attacks it and reads the child's resident memory and CPU time from /proc (Linux only).

- relay: a client opens proxied streams to an accomplice that never reads, and writes into
  each until nothing moves.
- control: a raw client that never grants credit on its control stream sends small requests.
- flood: Initials from 127.0.0.2 that never go on with the handshake, then a newcomer from
  127.0.0.1 connects; the time it needs is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import trio

import conec_trio
from conec_trio import certs

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def usage(pid: int) -> tuple[float, float]:
    """(resident MB, CPU seconds) of process ``pid``."""
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * PAGE / 1e6
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / TICK


async def run_coordinator(cert: bytes, key: bytes) -> None:
    config = conec_trio.CoordConfig(cert_chain=cert, private_key=key, host="127.0.0.1", port=0)
    async with conec_trio.open_coordinator(config) as coord:
        print(coord.address[1], flush=True)
        while True:
            stats = coord.statistics()
            print(json.dumps({"held": stats.held_bytes, "clients": stats.clients}), flush=True)
            await trio.sleep(0.5)


class Child:
    def __init__(self, cert: bytes, key: bytes) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.hostile_cost", "coordinator"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([cert.decode(), key.decode()]) + "\n")
        self.proc.stdin.close()
        self.port = int(self.proc.stdout.readline())
        self.last: dict[str, Any] = {}
        self.max_held = 0

    def poll_stats(self) -> None:
        # non-blocking enough: the child prints twice a second
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        for line in self.proc.stdout:
            self.last = json.loads(line)
            self.max_held = max(self.max_held, self.last["held"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def attack_relay(child: Child, ca: bytes, streams: int) -> str:
    def config(cid: str) -> conec_trio.ClientConfig:
        return conec_trio.ClientConfig(
            id=cid, coord_host="127.0.0.1", coord_port=child.port, ca=ca, keepalive=True
        )

    moved = 0
    async with (
        conec_trio.open_client(config("mallory")) as mallory,
        conec_trio.open_client(config("accomplice")),
    ):

        async def fill() -> None:
            nonlocal moved
            send, _ = await mallory.new_proxied_stream("accomplice")
            while True:
                await send.send(b"x" * 65536)
                moved += 65536

        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(fill)
            last, quiet = -1, 0
            while quiet < 4:
                await trio.sleep(0.5)
                child.poll_stats()
                quiet = quiet + 1 if moved == last else 0
                last = moved
            nursery.cancel_scope.cancel()
    held = child.max_held / 1e6
    return f"written by mallory {moved / 1e6:.0f} MB; coordinator held at most {held:.1f} MB"


async def attack_control(child: Child, ca: bytes, requests: int) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from rawquic import RawClient, open_raw_client  # type: ignore[import-not-found]

    from conec_trio._wire import control
    from conec_trio._wire.framing import encode_frame

    class Withholding(RawClient):
        def stream_data(self, conn: Any, stream_id: int, data: bytes, fin: bool) -> None:
            pass  # never consumed: no credit goes back

    async with open_raw_client(("127.0.0.1", child.port), ca) as raw:
        await raw.hello()
        raw.__class__ = Withholding
        payload = b"".join(
            encode_frame(control.encode(control.BroadcastCountRequest(i, "nonexistent")))
            for i in range(1000)
        )
        assert raw.control_sid is not None
        sent = 0
        start = time.monotonic()
        while sent < requests and time.monotonic() - start < 60:
            if raw.conn.send_backlog(raw.control_sid) > 4 << 20:
                await trio.sleep(0.01)  # our own sender is held back: the coordinator stopped
                if (
                    time.monotonic() - start > 10
                    and raw.conn.send_backlog(raw.control_sid) > 4 << 20
                ):
                    break
                continue
            raw.write(raw.control_sid, payload)
            sent += 1000
            await trio.lowlevel.checkpoint()
        await trio.sleep(2)
    return f"requests written {sent}"


async def attack_flood(child: Child, ca: bytes, initials: int) -> str:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from conec_trio._wire import control

    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.2", 0))
    target = ("127.0.0.1", child.port)
    start = time.monotonic()
    for i in range(initials):
        quic = QuicConnection(
            configuration=QuicConfiguration(is_client=True, alpn_protocols=[control.ALPN])
        )
        quic.connect(target, now=time.monotonic())
        for data, _ in quic.datagrams_to_send(now=time.monotonic()):
            await sock.sendto(data, target)
        # spread them over about 10 s
        await trio.sleep_until(
            trio.current_time() + max(0.0, start + 10 * (i + 1) / initials - time.monotonic())
        )
    flood_time = time.monotonic() - start
    t0 = time.monotonic()
    config = conec_trio.ClientConfig(
        id="newcomer", coord_host="127.0.0.1", coord_port=child.port, ca=ca, connect_timeout=30
    )
    try:
        async with conec_trio.open_client(config):
            got_in = f"got in after {time.monotonic() - t0:.2f} s"
    except conec_trio.ConecError as exc:
        got_in = f"failed after {time.monotonic() - t0:.1f} s ({exc})"
    sock.close()
    return f"{initials} Initials in {flood_time:.1f} s; newcomer {got_in}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("attack", choices=["relay", "control", "flood", "coordinator"])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--initials", type=int, default=5000)
    args = parser.parse_args()
    if args.attack == "coordinator":
        cert, key = (s.encode() for s in json.loads(sys.stdin.readline()))
        trio.run(run_coordinator, cert, key)
        return
    cert, key = certs.self_signed_cert(["127.0.0.1"])
    child = Child(cert, key)
    try:
        time.sleep(1)
        rss0, cpu0 = usage(child.proc.pid)
        t0 = time.monotonic()
        if args.attack == "relay":
            what = trio.run(attack_relay, child, cert, args.streams)
        elif args.attack == "control":
            what = trio.run(attack_control, child, cert, args.requests)
        else:
            what = trio.run(attack_flood, child, cert, args.initials)
        rss1, cpu1 = usage(child.proc.pid)
        print(
            f"{args.attack}: {what}; coordinator {rss0:.0f} -> {rss1:.0f} MB resident, "
            f"{cpu1 - cpu0:.1f} s CPU in {time.monotonic() - t0:.1f} s"
        )
    finally:
        child.stop()


if __name__ == "__main__":
    main()
