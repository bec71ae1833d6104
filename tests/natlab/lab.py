"""A NAT lab built from Linux network namespaces, for hole-punching tests.

Topology (every namespace name carries a per-lab prefix, see :attr:`NatLab.prefix`)::

    pub     br0 198.51.100.1/24             the "internet"; the coordinator runs here
     |-- nat-a   eth-pub 198.51.100.2 | eth-lan 10.0.1.1 -- host-a  eth0 10.0.1.2
     `-- nat-b   eth-pub 198.51.100.3 | eth-lan 10.0.2.1 -- host-b  eth0 10.0.2.2

The NAT routers use nftables masquerade. By default that is Linux's usual behaviour:
port-preserving, endpoint-independent mapping with address+port-dependent filtering
(a "port-restricted cone"). A side listed in ``symmetric`` uses ``masquerade
fully-random`` instead, which picks a new public port per destination (a symmetric NAT).
Like a home router, each NAT drops unsolicited inbound packets, both those it would
forward and those addressed to the router itself. The input filter matters: without it
an unsolicited packet to the public IP leaves a conntrack entry that makes the next
outbound mapping change port, which breaks simultaneous punching.

``loss_percent`` emulates packet loss "on the wire" of each NAT's public link, in both
directions, with nftables ``numgen random`` drops on netdev ingress hooks (the nat's
``eth-pub`` for inbound, the bridge port in ``pub`` for outbound). tc netem is not used
because many kernels (and containers) lack ``sch_netem``; so delay cannot be emulated.

:meth:`NatLab.limit_udp_size` makes one NAT's public link drop every UDP packet above a
size, silently, as a path whose MTU dropped mid-session does (the same netdev ingress
hooks, in a table of its own); :meth:`NatLab.lift_udp_limit` takes it away again. Both
ends of every public link segment UDP GSO batches (``gso_max_segs 1``), so these rules see
one datagram at a time, as a router on the way would.

Every interface is created directly inside a lab namespace (veth pairs are created with
both ends in lab namespaces), so the caller's own network namespace is never touched, and
the interface names need no prefix. All lab traffic stays inside the lab: the only routes
are to lab subnets. Deleting the namespaces removes everything.

Needs root, ``ip`` (iproute2), ``nft`` (nftables) and ``sysctl`` (procps);
:meth:`NatLab.flush_conntrack` also needs ``conntrack``. Use :func:`available` to check.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, Final, Protocol

__all__ = [
    "COORD_IP",
    "HOST_A_IP",
    "HOST_B_IP",
    "NAT_A_PUBLIC_IP",
    "NAT_B_PUBLIC_IP",
    "LabError",
    "LabFactory",
    "NatLab",
    "available",
    "remove_stale_labs",
]

COORD_IP: Final = "198.51.100.1"
NAT_A_PUBLIC_IP: Final = "198.51.100.2"
NAT_B_PUBLIC_IP: Final = "198.51.100.3"
HOST_A_IP: Final = "10.0.1.2"
HOST_B_IP: Final = "10.0.2.2"

SIDES: Final = ("a", "b")
NAMESPACES: Final = ("pub", "nat-a", "nat-b", "host-a", "host-b")

# Stored as the alias of "lo" in every lab namespace: tells our namespaces from others.
_MARK: Final = "conec-natlab"
_NETNS_DIR: Final = "/run/netns"
_PREFIX_RE: Final = re.compile(r"^ct(\d+)-(\d+)-(" + "|".join(NAMESPACES) + r")$")
_CMD_TIMEOUT: Final = 15.0
_instance_counter = itertools.count()


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def _install_hint(tool: str) -> str:
    package = {"ip": "iproute2", "nft": "nftables", "sysctl": "procps"}.get(tool, tool)
    return f"{tool} not found: apt-get install {package}"


def _run(
    argv: Sequence[str], *, input: str | None = None, timeout: float = _CMD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a lab administration command; raise LabError (with its stderr) on failure."""
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        stdin = f"\n--- input ---\n{input}" if input else ""
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {detail}{stdin}")
    return proc


def _netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(_NETNS_DIR, name))


def _netns_pids(name: str) -> list[int]:
    proc = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=_CMD_TIMEOUT
    )
    return [int(word) for word in proc.stdout.split()] if proc.returncode == 0 else []


def _kill_and_delete_netns(name: str, grace: float = 2.0) -> None:
    """Stop every process left in namespace ``name`` (by PID), then delete it.

    A process still running in a namespace would keep it, and its interfaces, alive after
    ``ip netns del``. SIGTERM first, SIGKILL after ``grace`` seconds; every wait is bounded.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        pids = _netns_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _netns_pids(name) and time.monotonic() < deadline:
            time.sleep(0.02)
    if _netns_exists(name):
        _run(["ip", "netns", "del", name])


def _has_mark(name: str) -> bool:
    proc = subprocess.run(
        ["ip", "-n", name, "link", "show", "lo"],
        capture_output=True,
        text=True,
        timeout=_CMD_TIMEOUT,
    )
    return proc.returncode == 0 and f"alias {_MARK}" in proc.stdout


@functools.cache
def available() -> tuple[bool, str]:
    """Can a lab be built here? Returns ``(True, "")`` or ``(False, reason)``.

    Checks for Linux, root, the tools, and that a throw-away namespace can be created
    and can load an nftables ruleset using the features the lab needs. Cached.
    """
    if not sys.platform.startswith("linux"):
        return False, "needs Linux network namespaces"
    if os.geteuid() != 0:
        return False, "needs root (network namespaces and nftables need CAP_NET_ADMIN)"
    for tool in ("ip", "nft", "sysctl"):
        if shutil.which(tool) is None:
            return False, _install_hint(tool)
    probe = f"ct{os.getpid()}-probe"
    ruleset = """
table ip probe {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "lo" ct state established,related masquerade fully-random
  }
}
table netdev probe {
  chain ingress {
    type filter hook ingress device "lo" priority 0; policy accept;
    meta protocol ip numgen random mod 10000 < 1 counter drop
  }
}
"""
    try:
        _run(["ip", "netns", "add", probe])
    except LabError as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "netns", "exec", probe, "nft", "-f", "-"], input=ruleset)
    except LabError as exc:
        return False, f"nftables NAT/netdev rules cannot be loaded: {exc}"
    finally:
        with contextlib.suppress(LabError):
            _run(["ip", "netns", "del", probe])
    return True, ""


def remove_stale_labs() -> list[str]:
    """Delete lab namespaces left behind by processes that no longer exist.

    Only namespaces named like ours (``ct<pid>-<n>-<name>``) that carry our marker and
    whose creating PID is gone are touched (a killed test run cannot clean up after
    itself). Returns the names removed.
    """
    try:
        names = sorted(os.listdir(_NETNS_DIR))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        match = _PREFIX_RE.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            continue  # the creator still runs: not stale
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if _has_mark(name):
            _kill_and_delete_netns(name)
            removed.append(name)
    return removed


class NatLab:
    """The lab: ``with NatLab(symmetric={"a"}, loss_percent=5) as lab: ...``.

    ``up()`` builds it (tearing down what it built if a step fails), ``down()`` removes it
    (idempotent; also run by ``__exit__``). Namespace names are ``<prefix><name>`` for
    ``name`` in :data:`NAMESPACES`; use :meth:`ns` to get them.
    """

    COORD_IP: Final = COORD_IP
    NAT_PUBLIC_IPS: Final[Mapping[str, str]] = MappingProxyType(
        {"a": NAT_A_PUBLIC_IP, "b": NAT_B_PUBLIC_IP}
    )
    NAT_LAN_IPS: Final[Mapping[str, str]] = MappingProxyType({"a": "10.0.1.1", "b": "10.0.2.1"})
    HOST_IPS: Final[Mapping[str, str]] = MappingProxyType({"a": HOST_A_IP, "b": HOST_B_IP})
    LAN_SUBNETS: Final[Mapping[str, str]] = MappingProxyType(
        {"a": "10.0.1.0/24", "b": "10.0.2.0/24"}
    )

    def __init__(self, *, symmetric: Iterable[str] = (), loss_percent: float = 0.0) -> None:
        sides = frozenset([symmetric] if isinstance(symmetric, str) else symmetric)
        if not sides <= set(SIDES):
            raise ValueError(f"symmetric must be a subset of {set(SIDES)}, got {set(sides)}")
        if not 0.0 <= loss_percent <= 100.0:
            raise ValueError(f"loss_percent must be within [0, 100], got {loss_percent}")
        self.symmetric: frozenset[str] = sides
        self.loss_percent: float = float(loss_percent)
        self.prefix: str = self._free_prefix()
        self._created: list[str] = []
        self._children: list[subprocess.Popen[Any]] = []
        self._ready = False

    @staticmethod
    def _free_prefix() -> str:
        # The PID makes labs of concurrent processes distinct, the counter labs of one
        # process; a stale namespace from a dead process with a reused PID is skipped.
        while True:
            prefix = f"ct{os.getpid()}-{next(_instance_counter)}-"
            if not any(_netns_exists(prefix + name) for name in NAMESPACES):
                return prefix

    def __repr__(self) -> str:
        state = "up" if self.is_up else "down"
        return (
            f"NatLab(prefix={self.prefix!r}, symmetric={set(self.symmetric) or '{}'}, "
            f"loss_percent={self.loss_percent}, {state})"
        )

    # ------------------------------------------------------------------ naming
    @property
    def is_up(self) -> bool:
        return self._ready

    def ns(self, name: str) -> str:
        """Full namespace name for ``pub``, ``nat-a``, ``nat-b``, ``host-a`` or ``host-b``."""
        if name.startswith(self.prefix) and name[len(self.prefix) :] in NAMESPACES:
            return name
        if name not in NAMESPACES:
            raise ValueError(f"unknown lab namespace {name!r}; expected one of {NAMESPACES}")
        return self.prefix + name

    def nat_type(self, side: str) -> str:
        """``"symmetric"`` or ``"cone"`` (port-restricted cone) for NAT ``side``."""
        return "symmetric" if side in self.symmetric else "cone"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> NatLab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> None:
        """Build the lab. On any failure, tear down what was built and raise LabError."""
        if self._created:
            raise LabError(f"{self!r} is already up")
        try:
            for name in NAMESPACES:
                self._add_namespace(name)
            self._build_topology()
            for side in SIDES:
                _run(
                    ["ip", "netns", "exec", self.ns(f"nat-{side}"), "nft", "-f", "-"],
                    input=self._nat_ruleset(side),
                )
            if self._loss_basis_points:
                _run(
                    ["ip", "netns", "exec", self.ns("pub"), "nft", "-f", "-"],
                    input=self._pub_loss_ruleset(),
                )
        except BaseException:
            with contextlib.suppress(LabError):  # the original error matters more
                self.down()
            raise
        self._ready = True

    def down(self) -> None:
        """Remove the lab: stop its processes (by PID), delete its namespaces. Idempotent."""
        errors: list[str] = []
        self._ready = False
        for child in self._children:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    child.kill()
                    try:
                        child.wait(timeout=2.0)
                    except subprocess.TimeoutExpired:
                        errors.append(f"process {child.pid} did not exit after SIGKILL")
        self._children.clear()
        for name in reversed(list(self._created)):
            try:
                _kill_and_delete_netns(name)
                self._created.remove(name)
            except (LabError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))

    def _add_namespace(self, name: str) -> None:
        full = self.ns(name)
        _run(["ip", "netns", "add", full])
        self._created.append(full)
        self._ip(name, f"link set lo alias {_MARK}", "link set lo up")
        # Deterministic sysctls: a new namespace normally gets kernel defaults, but
        # net.core.devconf_inherit_init_net=1 on the host would copy the host's values.
        forward = 1 if name.startswith("nat-") else 0
        settings = [
            f"net.ipv4.ip_forward={forward}",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]
        in_ns = ["ip", "netns", "exec", full]
        _run([*in_ns, "sysctl", "-q", "-w", *settings])
        if name == "pub":
            # Only present when br_netfilter is loaded; keep bridged frames out of pub's
            # IP hooks ("-e": ignore the key if it does not exist).
            _run([*in_ns, "sysctl", "-e", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0"])

    def _build_topology(self) -> None:
        self._ip(
            "pub", "link add br0 type bridge", f"addr add {COORD_IP}/24 dev br0", "link set br0 up"
        )
        for side in SIDES:
            nat_lan = self.NAT_LAN_IPS[side]
            self._ip(
                f"nat-{side}",
                # public link: nat-x:eth-pub <-> pub:port-x (a port of the bridge)
                f"link add eth-pub type veth peer name port-{side} netns {self.ns('pub')}",
                f"addr add {self.NAT_PUBLIC_IPS[side]}/24 dev eth-pub",
                # One datagram per frame on the public links, as on a real wire: a veth
                # passes a UDP GSO batch on as one packet, which the loss and size-limit
                # rules would drop as a whole. Segmenting costs little at these rates.
                "link set eth-pub gso_max_segs 1",
                "link set eth-pub up",
                f"route add default via {COORD_IP}",
                # private link: nat-x:eth-lan <-> host-x:eth0
                f"link add eth-lan type veth peer name eth0 netns {self.ns(f'host-{side}')}",
                f"addr add {nat_lan}/24 dev eth-lan",
                "link set eth-lan up",
            )
            self._ip(
                "pub",
                f"link set port-{side} master br0",
                f"link set port-{side} gso_max_segs 1",
                f"link set port-{side} up",
            )
            self._ip(
                f"host-{side}",
                f"addr add {self.HOST_IPS[side]}/24 dev eth0",
                "link set eth0 up",
                f"route add default via {nat_lan}",
            )

    @property
    def _loss_basis_points(self) -> int:
        return round(self.loss_percent * 100)

    def _loss_rule(self, comment: str) -> str:
        # "meta protocol ip": ARP is never dropped, so loss does not add ARP retry delays.
        return (
            f"meta protocol ip numgen random mod 10000 < {self._loss_basis_points} "
            f'counter drop comment "{comment}"'
        )

    def _nat_ruleset(self, side: str) -> str:
        masquerade = "masquerade fully-random" if side in self.symmetric else "masquerade"
        ruleset = f"""
flush ruleset
table ip natlab {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "eth-pub" ip saddr {self.LAN_SUBNETS[side]} counter {masquerade} comment "masquerade"
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related counter accept comment "established inbound/outbound"
    iifname "eth-lan" oifname "eth-pub" counter accept comment "new outbound"
    counter drop comment "unsolicited inbound dropped"
  }}
  # Unsolicited packets to the router itself are dropped before conntrack confirms
  # them, so they leave no conntrack entry behind (like a home router).
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "eth-pub" ct state established,related accept
    iifname "eth-pub" counter drop comment "unsolicited to router dropped"
  }}
}}
"""
        if self._loss_basis_points:
            # netdev ingress runs before conntrack: a lost inbound packet leaves no trace.
            ruleset += f"""
table netdev natlab_loss {{
  chain inbound {{
    type filter hook ingress device "eth-pub" priority 0; policy accept;
    {self._loss_rule("loss inbound")}
  }}
}}
"""
        return ruleset

    def _pub_loss_ruleset(self) -> str:
        # Outbound loss is applied where the NAT's frames enter the bridge, i.e. after the
        # NAT has created its mapping, as for a packet lost on the wire.
        chains = "".join(
            f"""
  chain outbound_{side} {{
    type filter hook ingress device "port-{side}" priority 0; policy accept;
    {self._loss_rule(f"loss outbound nat-{side}")}
  }}"""
            for side in SIDES
        )
        return f"flush ruleset\ntable netdev natlab_loss {{{chains}\n}}\n"

    # ------------------------------------------------------------------ changing the path
    def limit_udp_size(self, side: str, max_bytes: int) -> None:
        """Drop every UDP packet longer than ``max_bytes`` on NAT ``side``'s public link, both
        ways, silently (no ICMP), as a path whose MTU just fell does to QUIC's packets. The
        length counted is the IP packet's (nftables ``meta length``): UDP payloads of up to
        ``max_bytes - 28`` still pass. Replaces an earlier limit on that side; lifted by
        :meth:`lift_udp_limit` (and with the lab). The drops are counted as
        ``"oversize inbound"`` on ``nat-<side>`` and ``"oversize outbound nat-<side>"`` on
        ``pub`` (see :meth:`counters`).
        """
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if not 0 < max_bytes < 65536:
            raise ValueError(f"max_bytes must be within [1, 65535], got {max_bytes}")
        # netdev ingress, as for loss: before conntrack and the NAT, like a drop on the wire.
        # Both ends of the link: nat-x's eth-pub (inbound) and pub's port-x (outbound).
        rule = f"meta protocol ip ip protocol udp meta length > {max_bytes} counter drop"
        for ns, device, comment in (
            (f"nat-{side}", "eth-pub", "oversize inbound"),
            ("pub", f"port-{side}", f"oversize outbound nat-{side}"),
        ):
            table = self._limit_table(side)
            # "add table" then "delete table" makes the replacement work whether or not a
            # limit was set before; nft applies the file atomically.
            ruleset = f"""
add table netdev {table}
delete table netdev {table}
table netdev {table} {{
  chain size_limit {{
    type filter hook ingress device "{device}" priority 0; policy accept;
    {rule} comment "{comment}"
  }}
}}
"""
            _run(["ip", "netns", "exec", self.ns(ns), "nft", "-f", "-"], input=ruleset)

    def lift_udp_limit(self, side: str) -> None:
        """Remove the limit :meth:`limit_udp_size` set on NAT ``side``'s public link (none
        set: nothing to do)."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        table = self._limit_table(side)
        for ns in (f"nat-{side}", "pub"):
            _run(
                ["ip", "netns", "exec", self.ns(ns), "nft", "-f", "-"],
                input=f"add table netdev {table}\ndelete table netdev {table}\n",
            )

    @staticmethod
    def _limit_table(side: str) -> str:
        # A table of its own per side, so a limit comes and goes without touching the
        # NAT and loss rules (pub holds both sides' limits).
        return f"natlab_size_limit_{side}"

    def _ip(self, name: str, *commands: str) -> None:
        """Run ``ip`` commands (one per string) inside lab namespace ``name``."""
        _run(["ip", "-n", self.ns(name), "-batch", "-"], input="\n".join(commands) + "\n")

    # ------------------------------------------------------------------ running things
    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside namespace ``ns`` (``ip netns exec``); kwargs go to Popen.

        ``ip netns exec`` execs ``argv``, so the returned PID is the program itself. The
        process is stopped by :meth:`down` if it still runs then.
        """
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(ns), *argv], **kwargs)
        self._children.append(proc)
        return proc

    def run(
        self, ns: str, argv: Sequence[str], timeout: float = _CMD_TIMEOUT, *, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``ns`` to completion; capture text stdout/stderr.

        The program is killed if it runs longer than ``timeout`` seconds
        (``subprocess.TimeoutExpired`` is raised).
        """
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(ns), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    # ------------------------------------------------------------------ inspection
    def flush_conntrack(self) -> None:
        """Forget all NAT mappings and conntrack state of both NATs (between cases).

        Conntrack state outlives the programs that created it (UDP entries time out only
        after 30-120 s), so a second case in the same lab would otherwise reuse mappings.
        """
        if shutil.which("conntrack") is None:
            raise LabError(_install_hint("conntrack"))
        for side in SIDES:
            _run(["ip", "netns", "exec", self.ns(f"nat-{side}"), "conntrack", "-F"])

    def counters(self, ns: str) -> dict[str, int]:
        """Packet counts of the commented nftables rules of ``ns``, keyed by comment.

        NATs: ``"masquerade"``, ``"new outbound"``, ``"established inbound/outbound"``,
        ``"unsolicited inbound dropped"``, ``"unsolicited to router dropped"`` and, with
        loss, ``"loss inbound"``; ``pub`` with loss: ``"loss outbound nat-a"``/``-b``; with
        a size limit (:meth:`limit_udp_size`), ``"oversize inbound"`` and
        ``"oversize outbound nat-a"``/``-b``.
        """
        out = _run(["ip", "netns", "exec", self.ns(ns), "nft", "-j", "list", "ruleset"]).stdout
        result: dict[str, int] = {}
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule.get("expr", []):
                if isinstance(expr, dict) and "counter" in expr:
                    result[rule["comment"]] = int(expr["counter"]["packets"])
        return result


class LabFactory(Protocol):
    """The callable yielded by the ``nat_lab`` fixture: builds (and later removes) a lab."""

    def __call__(self, *, symmetric: Iterable[str] = ..., loss_percent: float = ...) -> NatLab: ...
