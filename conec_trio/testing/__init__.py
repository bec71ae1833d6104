"""Testing helpers: an in-memory UDP network with NATs and bad links, and a pytest plugin.

The pytest plugin (``conec_trio.testing.pytest_plugin``, loaded by pytest on its own once
conec-trio is installed) gives pytest-trio tests a running coordinator and connected
clients: see its docstring. Nothing here needs pytest.

The fake network
----------------

Datagrams never touch the operating system: each one is routed (through simulated NATs),
maybe lost, duplicated or held back, and delivered after a delay measured on trio's clock.
With ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``
fixture) seconds of network time pass in no wall time, and a seed makes every run the same::

    from conec_trio.testing import open_fake_network

    async with open_fake_network(seed=1, loss=0.1, delay=(0.005, 0.05), reorder=0.05) as net:
        nat = net.add_nat("203.0.113.1", kind="symmetric", filtering="port-restricted")
        net.add_host("10.0.1.2", behind=nat)  # a host behind that NAT
        net.add_host("192.0.2.1")  # a host on the public side
        # Every endpoint conec_trio opens in the block uses the fake network. A specific bind
        # address picks its host; "0.0.0.0" (a client's) the host chosen with on_host():
        async with conec_trio.open_coordinator(CoordConfig(..., host="192.0.2.1", port=1719)):
            with net.on_host("10.0.1.2"):
                async with conec_trio.open_client(config) as client:
                    ...

Routing: a host's IP is unique in the whole network. A datagram goes straight to a host in
the same realm (the public side, or behind the same NAT). Otherwise a host behind a NAT has
its source translated by that NAT and the datagram goes on in the public realm, where it can
reach a public host or a NAT's public address; anything else is dropped as "unrouted".
Arriving at a NAT's public address, a datagram needs a mapping for its port and must pass
the NAT's filtering, else it is dropped.

NATs (``Nat``): ``kind="cone"`` maps a private address to one public port for every
destination (endpoint-independent mapping); ``kind="symmetric"`` uses a fresh public port
per destination, so a peer cannot reach the port the coordinator saw. ``filtering`` lets in
datagrams from any (ip, port) the mapping has sent to ("port-restricted"), from any port of
such an ip ("address-restricted"), or from anyone ("open").

Impairments: ``loss``, ``duplicate`` and ``reorder`` are probabilities per datagram,
``delay`` is (min, max) seconds drawn per datagram, and datagrams over ``mtu`` bytes are
dropped; ``net.set_mtu(n)`` changes that limit mid-run (a path whose MTU drops, or comes
back). Randomness is drawn from one seeded generator per path (sender address,
destination), so what happens on one path does not depend on how trio interleaves tasks
sending on other paths.

What happened: ``net.stats`` counts "sent", "delivered" and "duplicated" datagrams;
``net.dropped`` counts drops by reason (``LOST``, ``UNROUTED``, ``TOO_BIG``, ``NO_MAPPING``,
``FILTERED``, ``BLOCKED``, ``NO_SOCKET``, ``QUEUE_FULL``, ``SOCKET_CLOSED``); each ``Host``
has ``stats``, ``dropped`` (of what it sent) and ``received_from`` (by source IP).
``net.sent_log`` holds every ``Datagram`` sent; ``net.sent(by=, to=, min_size=, where=)``
counts them and ``net.sent_bytes(...)`` adds up their sizes. ``net.block(a, b)`` and
``net.add_filter(fn)`` drop traffic on purpose.

Under the autojump clock a busy loop (a task that keeps passing checkpoints without ever
waiting) would freeze simulated time and hang the test; ``open_fake_network`` (and
``spin_guard``) turn that into a ``SpinError`` naming the busiest task.
"""

from ._hosts import FakeSocket, Host
from ._nat import (
    BLOCKED,
    FILTERED,
    LOST,
    NO_MAPPING,
    NO_SOCKET,
    QUEUE_FULL,
    SOCKET_CLOSED,
    TOO_BIG,
    UNROUTED,
    Address,
    Datagram,
    Filtering,
    Nat,
    NatKind,
    NatMapping,
)
from ._network import FakeNetwork, open_fake_network
from ._spin import SpinError, SpinGuard, spin_guard

__all__ = [
    "BLOCKED",
    "FILTERED",
    "LOST",
    "NO_MAPPING",
    "NO_SOCKET",
    "QUEUE_FULL",
    "SOCKET_CLOSED",
    "TOO_BIG",
    "UNROUTED",
    "Address",
    "Datagram",
    "FakeNetwork",
    "FakeSocket",
    "Filtering",
    "Host",
    "Nat",
    "NatKind",
    "NatMapping",
    "SpinError",
    "SpinGuard",
    "open_fake_network",
    "spin_guard",
]
