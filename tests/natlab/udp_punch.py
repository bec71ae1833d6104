"""A tiny UDP hole-punching program used to check the NAT lab itself (stdlib only).

Roles, each run inside a lab namespace:

``rendezvous``
    Binds ``--bind``:``--port`` (on ``pub``), prints ``READY``, then answers every
    ``register`` with the sender's observed address (``wait``) and, once a second client
    of the same session has registered, tells both about each other (``peer``). On a
    ``probe`` request it first sends ``--probe-count`` packets to the observed address
    from a *second* socket (a source the client never talked to: unsolicited for its NAT),
    then one reply from the registered socket. It stops when its stdin is closed (or at
    ``--timeout``) and prints a JSON report of every observed address.

``client``
    Binds ``--port``, registers with the rendezvous (retrying) until it learns the peer,
    then sends ``--count`` punches to the peer's observed address from the same socket
    while listening; every punch received is acknowledged. It stops once all punches are
    sent and both directions are known to work (a punch and an ack were received), or
    ``--linger`` seconds after the last punch, and prints a JSON report. With ``--probe``
    it does the probe exchange instead of punching.

Every loop is bounded by a deadline or a count.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time
from typing import Any

Addr = tuple[str, int]


def send(sock: socket.socket, dest: Addr, **msg: Any) -> None:
    sock.sendto(json.dumps(msg).encode(), dest)


def recv(socks: list[socket.socket], timeout: float) -> tuple[dict[str, Any], Addr] | None:
    """One message from the first readable socket, or None after ``timeout`` seconds."""
    readable, _, _ = select.select(socks, [], [], max(0.0, timeout))
    if not readable:
        return None
    data, addr = readable[0].recvfrom(2048)
    try:
        msg = json.loads(data)
    except ValueError:
        msg = {"t": "garbage"}
    return (msg if isinstance(msg, dict) else {"t": "garbage"}), (addr[0], addr[1])


def rendezvous(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, args.port))
    alt = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the "unsolicited" source
    alt.bind((args.bind, 0))
    print("READY", flush=True)
    sessions: dict[str, dict[str, Addr]] = {}
    observed: dict[str, list[Any]] = {}
    probes = 0
    deadline = time.monotonic() + args.timeout
    stdin_open = True
    while time.monotonic() < deadline:
        watched: list[Any] = [sock, sys.stdin] if stdin_open else [sock]
        readable, _, _ = select.select(watched, [], [], max(0.0, deadline - time.monotonic()))
        if sys.stdin in readable:
            if not sys.stdin.readline():
                break  # stdin closed: the driver is done with us
            continue
        if sock not in readable:
            continue
        got = recv([sock], 0)
        if got is None:
            continue
        msg, addr = got
        name = str(msg.get("name", "?"))
        if msg.get("t") == "register":
            observed[name] = list(addr)
            session = sessions.setdefault(str(msg.get("session", "s")), {})
            session[name] = addr
            others = {n: a for n, a in session.items() if n != name}
            if not others:
                send(sock, addr, t="wait", you=list(addr))
            for other, other_addr in others.items():
                send(sock, addr, t="peer", you=list(addr), peer=other, addr=list(other_addr))
                send(sock, other_addr, t="peer", you=list(other_addr), peer=name, addr=list(addr))
        elif msg.get("t") == "probe":
            probes += 1
            for seq in range(args.probe_count):
                send(alt, addr, t="probe-alt", seq=seq)
            send(sock, addr, t="probe-reply", you=list(addr), alt_sent=args.probe_count)
    report = {
        "role": "rendezvous",
        "observed": observed,
        "probes": probes,
        "alt_port": alt.getsockname()[1],
    }
    print(json.dumps(report), flush=True)
    return 0


def register(
    sock: socket.socket,
    coord: Addr,
    args: argparse.Namespace,
    rep: dict[str, Any],
    deadline: float,
    want_peer: bool,
) -> Addr | None:
    """Register until the rendezvous answers (with a peer if ``want_peer``)."""
    next_send = 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_send:
            send(sock, coord, t="register", name=args.name, session=args.session)
            next_send = now + args.retry
        got = recv([sock], min(next_send, deadline) - now)
        if got is None or got[1] != coord:
            continue
        msg = got[0]
        if msg.get("t") in ("wait", "peer"):
            rep["observed"] = msg["you"]
        if msg.get("t") == "peer":
            rep["peer_name"], rep["peer_addr"] = msg["peer"], msg["addr"]
            return (msg["addr"][0], msg["addr"][1])
        if msg.get("t") == "wait" and not want_peer:
            return coord
    return None


def probe(
    sock: socket.socket, coord: Addr, args: argparse.Namespace, rep: dict[str, Any], deadline: float
) -> None:
    """Ask for a probe until its reply arrives; count unsolicited packets that got in."""
    rep.update(probe_reply=False, alt_rx=0, alt_sent=0)
    next_send = 0.0
    while time.monotonic() < deadline and not rep["probe_reply"]:
        now = time.monotonic()
        if now >= next_send:
            send(sock, coord, t="probe", name=args.name)
            next_send = now + args.retry
        got = recv([sock], min(next_send, deadline) - now)
        if got is None:
            continue
        msg, addr = got
        if msg.get("t") == "probe-alt":
            rep["alt_rx"] += 1
        elif msg.get("t") == "probe-reply" and addr == coord:
            rep["probe_reply"] = True
            rep["alt_sent"] = msg["alt_sent"]
    # Any alt packet that got through was sent before the reply: collect what is queued.
    while (got := recv([sock], 0)) is not None:
        if got[0].get("t") == "probe-alt":
            rep["alt_rx"] += 1


def punch(
    sock: socket.socket,
    coord: Addr,
    peer: Addr,
    args: argparse.Namespace,
    rep: dict[str, Any],
    deadline: float,
) -> None:
    """Punch ``args.count`` times towards ``peer`` and listen; see the module docstring."""
    start = time.monotonic()
    next_send, seq, end = start, 0, deadline
    froms: set[Addr] = set()
    while time.monotonic() < end:
        now = time.monotonic()
        if seq < args.count and now >= next_send:
            send(sock, peer, t="punch", src=args.name, seq=seq)
            seq += 1
            next_send += args.interval
            if seq == args.count:
                end = min(deadline, now + args.linger)
        if seq == args.count and rep["rx"] and rep["rx_acks"]:
            break  # both directions proven
        wake = next_send if seq < args.count else end
        got = recv([sock], min(wake, end) - now)
        if got is None or got[1] == coord:  # late duplicates from the rendezvous
            continue
        msg, addr = got
        if msg.get("t") == "punch":
            rep["rx"] += 1
            froms.add(addr)
            rep.setdefault("first_rx_s", round(time.monotonic() - start, 3))
            send(sock, addr, t="ack", seq=msg.get("seq"))
        elif msg.get("t") == "ack":
            rep["rx_acks"] += 1
            froms.add(addr)
        else:
            rep["other_rx"] += 1
    rep["sent"] = seq
    rep["rx_from"] = sorted([list(a) for a in froms])


def client(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # unconnected on purpose
    sock.bind(("0.0.0.0", args.port))
    coord = (args.coord_ip, args.coord_port)
    deadline = time.monotonic() + args.timeout
    rep: dict[str, Any] = {
        "role": "client",
        "name": args.name,
        "local": list(sock.getsockname()),
        "sent": 0,
        "rx": 0,
        "rx_acks": 0,
        "rx_from": [],
        "other_rx": 0,
    }
    peer = register(sock, coord, args, rep, deadline, want_peer=not args.probe)
    if peer is None:
        rep["error"] = "no answer from the rendezvous"
    elif args.probe:
        probe(sock, coord, args, rep, deadline)
    else:
        punch(sock, coord, peer, args, rep, deadline)
    print(json.dumps(rep), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="role", required=True)
    r = sub.add_parser("rendezvous")
    r.add_argument("--bind", required=True)
    r.add_argument("--port", type=int, default=3478)
    r.add_argument("--timeout", type=float, default=20.0, help="hard bound on run time")
    r.add_argument("--probe-count", type=int, default=3)
    c = sub.add_parser("client")
    c.add_argument("--name", required=True)
    c.add_argument("--session", default="s1")
    c.add_argument("--coord-ip", required=True)
    c.add_argument("--coord-port", type=int, default=3478)
    c.add_argument("--port", type=int, default=0, help="local UDP port (0: ephemeral)")
    c.add_argument("--count", type=int, default=30, help="punches to send")
    c.add_argument("--interval", type=float, default=0.02, help="seconds between punches")
    c.add_argument("--linger", type=float, default=0.5, help="listen after the last punch")
    c.add_argument("--retry", type=float, default=0.1, help="register/probe retry interval")
    c.add_argument("--timeout", type=float, default=10.0, help="hard bound on run time")
    c.add_argument("--probe", action="store_true", help="probe the NAT's filtering instead")
    args = parser.parse_args()
    return rendezvous(args) if args.role == "rendezvous" else client(args)


if __name__ == "__main__":
    sys.exit(main())
