"""conec_trio subjects: the same measurements as ``baseline_aioquic``, through the library.

Each function is called in the harness process, like its baseline, and must start its own
peers as separate processes (``benchmarks._procs.Processes``: ``spawn`` start method, a pipe
per child, timeouts on every wait, children always stopped) so that no two peers share an
interpreter lock. A trio child can wait for the parent's "stop" with
``await trio.lowlevel.wait_readable(link.fileno())``; ``benchmarks._certs.self_signed_cert()``
gives a throwaway ECDSA P-256 certificate for ``localhost``/127.0.0.1. Use 127.0.0.1, port 0
(the server/coordinator sends its bound port to the parent), and start the clock only once
everything is connected, exactly where the baseline starts it.

Each returns one float in the unit of its case (see ``cases.py``). Raising
``NotImplementedError`` or ``ImportError`` makes the harness print "subject not available".
"""

from __future__ import annotations

_MISSING = "conec_trio subject not written yet"


def trio_endpoint_bulk(nbytes: int) -> float:
    """MB/s (10**6 bytes/s), like ``baseline_aioquic.bulk``: one QUIC stream point to point
    through conec_trio's own Trio endpoint (``_quic``), server and client in two processes.
    The client sends ``nbytes`` in 64 KiB writes and ends the stream; the server replies with
    one byte on the end; time from the first write until the reply arrives."""
    raise NotImplementedError(_MISSING)


def proxied_bulk(nbytes: int) -> float:
    """MB/s: client A sends ``nbytes`` as 64 KiB messages on a proxied stream to client B
    (coordinator, A and B in three processes), then closes its send side; B answers with one
    message on ``EndOfChannel``; time from A's first send until A receives that answer."""
    raise NotImplementedError(_MISSING)


def direct_bulk(nbytes: int) -> float:
    """MB/s: as ``proxied_bulk`` but on a direct stream over a direct channel between A and B
    (the coordinator process only brokers; the channel is open before the clock starts)."""
    raise NotImplementedError(_MISSING)


def pingpong_proxied(duration: float) -> float:
    """Round trips/s: A sends a 64-byte message on a proxied stream to B, B echoes it, A waits
    for the echo; repeated for ``duration`` seconds (coordinator, A, B in three processes)."""
    raise NotImplementedError(_MISSING)


def oneway_small_proxied(count: int) -> float:
    """Messages/s: A sends ``count`` 64-byte messages (one ``await send.send(msg)`` each) on a
    proxied stream to B, then closes; B answers with one message on ``EndOfChannel``; time from
    A's first send until A receives that answer."""
    raise NotImplementedError(_MISSING)


def open_client(connections: int = 20) -> float:
    """Milliseconds (median over ``connections``): time from ``open_client(cfg)`` entry until
    its body runs, against a coordinator in another process; one client process opens them one
    after another (distinct ids), holding each open until the last is up, as the baseline does
    (e.g. an ``AsyncExitStack``); closing them afterwards is not timed."""
    raise NotImplementedError(_MISSING)


def broadcast_fanout(nbytes: int, receivers: int) -> float:
    """MB/s: one sender sends ``nbytes`` in 64 KiB messages on broadcast channel, joined by
    ``receivers`` receiving members (besides the sender), then closes; throughput is ``nbytes``
    over the time from the first send until the LAST receiver has seen ``EndOfChannel`` (each
    receiver gets all ``nbytes``). Coordinator, sender and receivers in separate processes
    (receivers may share processes, several clients per process, to fit 2 cores)."""
    raise NotImplementedError(_MISSING)


def connect_many(count: int, batch: int = 100) -> float:
    """Seconds: one process opens ``count`` clients (distinct ids) to a coordinator in another
    process, ``batch`` concurrently at a time, all held open until the last one is up."""
    raise NotImplementedError(_MISSING)
