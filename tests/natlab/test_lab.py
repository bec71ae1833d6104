"""Checks that the NAT lab behaves like the NATs it claims to be.

A small stdlib UDP program (``udp_punch.py``) runs inside the lab namespaces: a rendezvous
on ``pub`` and a client on each host. Every wait is bounded: the programs have deadlines
and report JSON; the tests read their output (or poll nftables counters with a deadline).
"""

from __future__ import annotations

import json
import re
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest

from .lab import (
    COORD_IP,
    HOST_A_IP,
    NAMESPACES,
    NAT_A_PUBLIC_IP,
    NAT_B_PUBLIC_IP,
    LabFactory,
    NatLab,
)

PUNCH = str(Path(__file__).with_name("udp_punch.py"))
PORTS = {"a": 5000, "b": 6000}
Report = dict[str, Any]
PROCESS_TIMEOUT = 20.0  # hard bound for any helper process; cases finish in ~1 s


def _json_report(proc: subprocess.Popen[str], what: str) -> Report:
    out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{what} failed (exit {proc.returncode}): {err.strip()}")
    report: Report = json.loads(lines[-1])
    assert "error" not in report, f"{what}: {report['error']}"
    return report


@contextmanager
def rendezvous(lab: NatLab) -> Iterator[Report]:
    """Run the rendezvous on ``pub`` for the ``with`` body; yields a dict that receives
    its final report (``observed``: name -> [ip, port] as seen by the rendezvous)."""
    argv = [sys.executable, PUNCH, "rendezvous", "--bind", COORD_IP]
    argv += ["--timeout", str(PROCESS_TIMEOUT)]
    proc = lab.popen("pub", argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, text=True)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:  # wait for READY, bounded
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=10.0) and proc.stdout.readline().strip() == "READY"
    if not ready:
        proc.kill()
        pytest.fail(f"rendezvous did not start: {proc.communicate(timeout=5)[1]}")
    report: Report = {}
    try:
        yield report
    finally:
        # communicate() closes its stdin, which asks it to stop and report
        report.update(_json_report(proc, "rendezvous"))


def run_clients(lab: NatLab, *extra: str, sides: tuple[str, ...] = ("a", "b")) -> list[Report]:
    """Run one client per side at the same time; return their JSON reports."""
    procs = []
    for side in sides:
        argv = [sys.executable, PUNCH, "client", "--name", side, "--coord-ip", COORD_IP]
        argv += ["--port", str(PORTS[side]), *extra]
        procs.append(lab.popen(f"host-{side}", argv, stdout=PIPE, stderr=PIPE, text=True))
    return [_json_report(proc, f"client {side}") for proc, side in zip(procs, sides, strict=True)]


def punch_pair(lab: NatLab, count: int = 30) -> tuple[Report, Report, Report]:
    """Both hosts register, learn each other's observed address and punch ``count`` times."""
    with rendezvous(lab) as coord:
        a, b = run_clients(lab, "--count", str(count))
    return a, b, coord


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def test_cone_nats_open_both_ways(nat_lab: LabFactory) -> None:
    lab = nat_lab()
    a, b, _ = punch_pair(lab)
    assert b["rx"] > 0, ("a -> b blocked", a, b)
    assert a["rx"] > 0, ("b -> a blocked", a, b)
    assert a["rx_acks"] > 0, (a, b)
    assert b["rx_acks"] > 0, (a, b)
    # Port-preserving cone NATs: each host sees the other at its NAT's IP and its own port.
    assert b["rx_from"] == [[NAT_A_PUBLIC_IP, PORTS["a"]]]
    assert a["rx_from"] == [[NAT_B_PUBLIC_IP, PORTS["b"]]]


@pytest.mark.parametrize("side", ["a", "b"])
def test_symmetric_nat_blocks_punching(nat_lab: LabFactory, side: str) -> None:
    lab = nat_lab(symmetric={side})
    a, b, _ = punch_pair(lab)
    assert a["sent"] == b["sent"] == 30
    assert a["rx"] == b["rx"] == 0, (a, b)
    assert a["rx_acks"] == b["rx_acks"] == 0, (a, b)
    # The punches did reach the NATs and were dropped there as unsolicited.
    for nat in ("nat-a", "nat-b"):
        assert lab.counters(nat)["unsolicited to router dropped"] > 0
    if shutil.which("conntrack"):
        # The symmetric NAT mapped the host's one socket to a different public port per
        # destination (rendezvous, peer); the cone NAT kept the host's port for both.
        # (fully-random could pick the same port twice: about 1 chance in 64000.)
        assert len(mapped_ports(lab, side)) == 2
        other = "b" if side == "a" else "a"
        assert mapped_ports(lab, other) == {PORTS[other]}


def mapped_ports(lab: NatLab, side: str) -> set[int]:
    """Public ports nat-``side`` mapped host-``side``'s client socket to (from conntrack)."""
    out = lab.run(f"nat-{side}", ["conntrack", "-L", "-p", "udp"], check=True).stdout
    ports = set()
    for line in out.splitlines():
        if f"src={lab.HOST_IPS[side]} " in line and f"sport={PORTS[side]} " in line:
            # original tuple first, then the reply tuple, whose dport is the mapped port
            ports.add(int(re.findall(r"dport=(\d+)", line)[1]))
    return ports


def test_unsolicited_inbound_is_dropped(nat_lab: LabFactory) -> None:
    lab = nat_lab()
    with rendezvous(lab) as coord:
        # host-a talks to the rendezvous; the rendezvous then sends 3 packets to host-a's
        # public mapping from another port (unsolicited), then a reply from its own.
        (a,) = run_clients(lab, "--probe", sides=("a",))
    assert a["probe_reply"] is True  # the solicited path works
    assert a["alt_sent"] == 3
    assert a["alt_rx"] == 0, a  # the host never received the unsolicited packets
    # ... because nat-a dropped every one of them (only they hit this counter; the client
    # repeats its probe request if the reply is slow, so there may be several rounds).
    expected = 3 * int(coord["probes"])

    def all_dropped() -> bool:
        return lab.counters("nat-a")["unsolicited to router dropped"] == expected

    assert wait_for(all_dropped), lab.counters("nat-a")


def test_rendezvous_sees_nat_public_address(nat_lab: LabFactory) -> None:
    lab = nat_lab()
    with rendezvous(lab) as coord:
        a, b = run_clients(lab, "--probe")
    assert coord["observed"]["a"] == [NAT_A_PUBLIC_IP, PORTS["a"]]
    assert coord["observed"]["b"] == [NAT_B_PUBLIC_IP, PORTS["b"]]
    assert a["observed"] == [NAT_A_PUBLIC_IP, PORTS["a"]]
    assert b["observed"] == [NAT_B_PUBLIC_IP, PORTS["b"]]
    assert a["local"] == ["0.0.0.0", PORTS["a"]]
    assert a["observed"][0] != HOST_A_IP
    if shutil.which("conntrack"):
        lab.flush_conntrack()
        count = lab.run("nat-a", ["conntrack", "-C"], check=True).stdout.strip()
        assert count == "0"


def test_cone_nats_open_despite_loss(nat_lab: LabFactory) -> None:
    # 30 punches each way, each arriving with probability 0.9 * 0.9 once the peer's own
    # punch has left: P(no punch arrives in one direction) ~ 0.19**28, negligible.
    lab = nat_lab(loss_percent=10)
    a, b, _ = punch_pair(lab, count=30)
    assert b["rx"] > 0, ("a -> b blocked", a, b)
    assert a["rx"] > 0, ("b -> a blocked", a, b)
    # The loss is real: with ~200 packets crossing the 4 loss points at 10%,
    # P(no drop at all) ~ 0.9**200 ~ 1e-9.
    dropped = sum(
        packets
        for ns in ("pub", "nat-a", "nat-b")
        for comment, packets in lab.counters(ns).items()
        if comment.startswith("loss ")
    )
    assert dropped > 0


def test_topology_and_teardown(nat_lab: LabFactory) -> None:
    lab = nat_lab(symmetric={"b"})

    def sysctl(ns: str, key: str) -> str:
        return lab.run(ns, ["sysctl", "-n", key], check=True).stdout.strip()

    for ns in NAMESPACES:
        assert sysctl(ns, "net.ipv4.ip_forward") == ("1" if ns.startswith("nat-") else "0")
        assert sysctl(ns, "net.ipv4.conf.all.rp_filter") == "0"
        assert sysctl(ns, "net.ipv6.conf.all.disable_ipv6") == "1"
    routes = lab.run("host-a", ["ip", "route"], check=True).stdout
    assert "default via 10.0.1.1" in routes
    rules_b = lab.run("nat-b", ["nft", "list", "ruleset"], check=True).stdout
    assert "fully-random" in rules_b
    assert "fully-random" not in lab.run("nat-a", ["nft", "list", "ruleset"], check=True).stdout

    # A process started behind the lab's back is stopped (by PID) by down().
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    stray = subprocess.Popen(["ip", "netns", "exec", lab.ns("host-a"), *sleeper])
    try:

        def inside() -> bool:
            argv = ["ip", "netns", "identify", str(stray.pid)]
            return lab.ns("host-a") in subprocess.run(argv, capture_output=True, text=True).stdout

        assert wait_for(inside)
        lab.down()
        assert stray.wait(timeout=5) != 0
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait(timeout=5)
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.prefix not in existing
    assert not lab.is_up
    lab.down()  # idempotent


# Sends UDP datagrams of the payload sizes given (with DF set, as QUIC does), then "end";
# "3x1200" is three of 1200 bytes in one system call (UDP GSO, as the library sends).
_SEND_SIZES = """
import socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, 10, 3)  # IP_MTU_DISCOVER = IP_PMTUDISC_PROBE: DF, no fragments
dest = (sys.argv[1], int(sys.argv[2]))
for arg in sys.argv[3:]:
    count, _, size = arg.rpartition("x")
    if count:
        segment = [(socket.SOL_UDP, 103, struct.pack("=H", int(size)))]  # UDP_SEGMENT
        sock.sendmsg([b"x" * int(size) * int(count)], segment, 0, dest)
    else:
        sock.sendto(b"x" * int(size), dest)
sock.sendto(b"end", dest)
"""
# Prints the payload size of every datagram received until "end" (bounded by a timeout).
_RECEIVE_SIZES = """
import json, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.settimeout(float(sys.argv[3]))
print("READY", flush=True)
sizes = []
while (data := sock.recv(65536)) != b"end":
    sizes.append(len(data))
print(json.dumps(sizes), flush=True)
"""


def test_udp_size_limit_drops_only_larger_datagrams(nat_lab: LabFactory) -> None:
    lab = nat_lab()
    # Payloads: IP packets of 1400, 1401, 1480 and 228 bytes, then a batch of three 1200s.
    sizes = ["1372", "1373", "1452", "200", "3x1200"]

    def received_at_pub() -> list[int]:
        """Sizes of the datagrams host-a sends to pub that arrive."""
        argv = [sys.executable, "-c", _RECEIVE_SIZES, COORD_IP, "7000", str(PROCESS_TIMEOUT)]
        sink = lab.popen("pub", argv, stdout=PIPE, stderr=PIPE, text=True)
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "READY"  # (it exits at once if it fails)
        lab.run("host-a", [sys.executable, "-c", _SEND_SIZES, COORD_IP, "7000", *sizes], check=True)
        out, err = sink.communicate(timeout=PROCESS_TIMEOUT)
        assert sink.returncode == 0, err
        received: list[int] = json.loads(out)
        return received

    everything = [1372, 1373, 1452, 200, 1200, 1200, 1200]
    assert received_at_pub() == everything
    lab.limit_udp_size("a", 1400)
    # The batch is judged datagram by datagram, as on a real link.
    assert received_at_pub() == [1372, 200, 1200, 1200, 1200]
    assert lab.counters("pub")["oversize outbound nat-a"] == 2
    # Inbound too (to nat-a's public address: counted, then dropped as unsolicited).
    lab.run("pub", [sys.executable, "-c", _SEND_SIZES, NAT_A_PUBLIC_IP, "7000", *sizes], check=True)
    assert lab.counters("nat-a")["oversize inbound"] == 2
    # Side b's link is untouched; a new limit replaces the old one; lifting restores all.
    assert "oversize inbound" not in lab.counters("nat-b")
    lab.limit_udp_size("a", 1300)
    assert received_at_pub() == [200, 1200, 1200, 1200]
    lab.lift_udp_limit("a")
    assert received_at_pub() == everything
    assert "oversize inbound" not in lab.counters("nat-a")
    lab.lift_udp_limit("a")  # nothing left to lift: no error
