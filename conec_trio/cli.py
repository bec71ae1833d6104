"""The ``conec-trio`` command line (also ``python -m conec_trio``).

Subcommands:

- ``demo``: a coordinator and three clients on loopback, showing every kind of stream and how
  fast it goes, in a few seconds;
- ``coord``: run a coordinator until Ctrl-C (SIGINT) or SIGTERM;
- ``certs ca`` / ``certs issue``: make a CA, and certificates it signs;
- ``expose`` / ``forward``: TCP port forwarding over conec (in :mod:`conec_trio.forward`).

Each subcommand is one ``_add_<name>_command(subparsers)`` function that builds its parser and
sets ``run`` to a function taking the parsed arguments and returning the exit status; a new
subcommand is one more such function and one more line in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import ipaddress
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from . import __version__, _tls, certs, forward
from ._client import Client, open_client
from ._config import DEFAULT_PORT, ClientConfig, CoordConfig, read_pem_option
from ._console import error as _error
from ._console import format_address as _format_address
from ._console import say as _say
from ._console import setup_logging as _setup_logging
from ._coordinator import Coordinator, open_coordinator
from ._exceptions import ConecError, Lagged
from .adapters import CborReceiveChannel, CborSendChannel, open_nonblocking

__all__ = ["build_parser", "main"]

log = logging.getLogger("conec_trio.cli")

# The names a coordinator's self-signed certificate is always valid for.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Files of the coordinator's self-signed certificate inside ``coord --state-dir``.
COORD_CERT_FILE = "coord.pem"
COORD_KEY_FILE = "coord.key"
DEFAULT_STATE_DIR = "conec-coord"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``conec-trio`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 1 when the command failed (the reason is printed on
    stderr), 2 for a usage error, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("conec-trio: interrupted", file=sys.stderr, flush=True)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``conec-trio``, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="conec-trio",
        description="COordinated NEtwork Channels for Trio, over QUIC: one coordinator, many "
        "clients, proxied, direct and broadcast message streams.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # One line per command; each _add_*_command builds its subparser and sets ``run``.
    _add_demo_command(subparsers)
    _add_coord_command(subparsers)
    _add_certs_command(subparsers)
    forward.add_expose_command(subparsers)
    forward.add_forward_command(subparsers)
    return parser


# --- coord -----------------------------------------------------------------------------------


def _add_coord_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "coord",
        help="run a coordinator until Ctrl-C",
        description="Run a coordinator until Ctrl-C (SIGINT) or SIGTERM; both exit with status "
        "0. Without --cert it uses a self-signed certificate for localhost, 127.0.0.1 and ::1 "
        "(and --host, if that is a specific name or address), made on first use and kept in "
        "--state-dir, and prints the file clients pass as --ca. When it is bound, it prints "
        "the line 'ready on HOST:PORT' (scripts can wait for it).",
    )
    parser.add_argument(
        "--host",
        help="address to bind (default: '::', every IPv6 and IPv4 address where the OS "
        "allows, else 0.0.0.0)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"UDP port (default: {DEFAULT_PORT}; 0 picks a free port)",
    )
    parser.add_argument("--cert", metavar="PEM", type=Path, help="certificate chain, PEM")
    parser.add_argument("--key", metavar="PEM", type=Path, help="private key of --cert, PEM")
    parser.add_argument(
        "--client-ca",
        metavar="PEM",
        type=Path,
        help="admit only clients whose certificate this CA signed (for their id)",
    )
    parser.add_argument(
        "--stateless-retry",
        action="store_true",
        help="validate client addresses with a QUIC Retry before a connection costs state",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(DEFAULT_STATE_DIR),
        help=f"where the self-signed certificate is kept when --cert is not given (default: "
        f"./{DEFAULT_STATE_DIR}/; files {COORD_CERT_FILE} and {COORD_KEY_FILE})",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log clients coming and going (-vv: debug)",
    )
    parser.set_defaults(run=_run_coord)


def _run_coord(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    if (args.cert is None) != (args.key is None):
        return _error("--cert and --key go together: give both, or neither")
    if not 0 <= args.port <= 65535:
        return _error(f"--port must be 0 to 65535, not {args.port}")
    try:
        client_ca = read_pem_option(args.client_ca, "--client-ca")
        if args.cert is not None:
            cert_pem = read_pem_option(args.cert, "--cert")
            key_pem = read_pem_option(args.key, "--key")
            assert cert_pem is not None
            assert key_pem is not None
            _say(f"certificate: {args.cert.resolve()} (clients pass its CA as --ca)")
        else:
            cert_pem, key_pem = _coord_identity(args.state_dir, args.host)
    except (OSError, ValueError, ConecError) as exc:
        return _error(str(exc))
    if client_ca is None:
        _say("clients: any client whose certificate is valid for its id (no --client-ca)")
    else:
        _say(f"clients: only those with a certificate signed by {args.client_ca.resolve()}")
    hosts = [args.host] if args.host is not None else ["::", "0.0.0.0"]
    try:
        return trio.run(_serve_coordinator, hosts, args, cert_pem, key_pem, client_ca)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was in place
        _say("coordinator stopped")
        return 0
    except ConecError as exc:  # say, a key that does not parse
        return _error(str(exc))


def _coord_identity(state_dir: Path, host: str | None) -> tuple[bytes, bytes]:
    """The coordinator's self-signed certificate: the one in ``state_dir`` when it still fits.

    Keeping it across restarts lets clients that already trust it reconnect.
    """
    names = list(LOOPBACK_NAMES)
    if host is not None and host not in names and not _is_unspecified(host):
        names.append(host)
    cert_path = state_dir / COORD_CERT_FILE
    key_path = state_dir / COORD_KEY_FILE
    reused = _load_fitting_identity(cert_path, key_path, names)
    if reused is not None:
        made = "kept from an earlier run"
        cert_pem, key_pem = reused
    else:
        made = "made now"
        cert_pem, key_pem = certs.self_signed_cert(names)
        state_dir.mkdir(parents=True, exist_ok=True)
        certs.save_pair(cert_pem, key_pem, cert_path, key_path)
    _say(f"certificate: self-signed for {', '.join(names)} ({made})")
    _say(f"clients pass --ca {cert_path.resolve()}")
    return cert_pem, key_pem


def _is_unspecified(host: str) -> bool:
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _load_fitting_identity(
    cert_path: Path, key_path: Path, names: list[str]
) -> tuple[bytes, bytes] | None:
    """The saved certificate and key if they exist, match, are valid for a day more and
    cover ``names``; else None."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        cert = _tls.load_cert(cert_pem)
        key = _tls.load_private_key(key_pem)
    except (OSError, ConecError):
        return None
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    if cert.not_valid_after_utc < soon or key.public_key() != cert.public_key():
        return None
    if not set(names) <= _tls.cert_names(cert):
        return None
    return cert_pem, key_pem


async def _serve_coordinator(
    hosts: list[str],
    args: argparse.Namespace,
    cert_pem: bytes,
    key_pem: bytes,
    client_ca: bytes | None,
) -> int:
    # Signals are caught from here on: a Ctrl-C right after "ready" still shuts down cleanly.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        for i, host in enumerate(hosts):
            config = CoordConfig(
                cert_chain=cert_pem,
                private_key=key_pem,
                host=host,
                port=args.port,
                client_ca=client_ca,
                stateless_retry=args.stateless_retry,
            )
            bound = False
            try:
                async with open_coordinator(config) as coord:
                    bound = True
                    _say(f"ready on {_format_address(*coord.address)}")
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        clients = coord.num_clients
                        _say(f"coordinator stopped ({name}; {clients} client(s) disconnected)")
                        return 0
            except OSError as exc:
                if bound:
                    raise
                fallback = i + 1 < len(hosts) and exc.errno in (
                    errno.EAFNOSUPPORT,
                    errno.EADDRNOTAVAIL,
                )
                if not fallback:
                    return _error(f"cannot bind {_format_address(host, args.port)}: {exc}")
                log.info("cannot bind %s (%s); trying %s", host, exc, hosts[i + 1])
    return 1  # unreachable: the signal loop only ends by returning


# --- certs -----------------------------------------------------------------------------------


def _add_certs_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="make a CA, and certificates signed by it",
        description="Make the certificates a deployment needs: a CA (certs ca), and "
        "certificates it signs for a coordinator or for clients (certs issue).",
    )
    certs_sub = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    ca = certs_sub.add_parser(
        "ca",
        help="make a CA in DIR",
        description=f"Make a certificate authority in DIR (created if needed): "
        f"{certs.CA_CERT_FILE} is what clients pass as --ca and a coordinator as --client-ca; "
        f"{certs.CA_KEY_FILE} signs certificates and must stay secret. An existing CA is never "
        "replaced.",
    )
    ca.add_argument("dir", metavar="DIR", type=Path)
    ca.add_argument("--common-name", default="conec-trio CA", help="the CA's name")
    ca.add_argument("--days", type=int, default=3650, help="validity (default: 3650)")
    ca.set_defaults(run=_run_certs_ca)

    issue = certs_sub.add_parser(
        "issue",
        help="issue a certificate for NAME, signed by the CA in DIR",
        description="Issue a certificate for NAME signed by the CA in --ca DIR, good for a "
        "coordinator (NAME: its host name or IP address) or a client (NAME: its client id). "
        "OUT is a path prefix: the certificate goes to OUT.pem and its private key to OUT.key "
        "(an OUT ending in .pem is taken as the certificate file itself). Existing files are "
        "not overwritten without --force.",
    )
    issue.add_argument("--ca", metavar="DIR", type=Path, required=True, help="the CA directory")
    issue.add_argument("name", metavar="NAME", help="client id, host name or IP address")
    issue.add_argument("out", metavar="OUT", help="path prefix of the files written")
    issue.add_argument(
        "--alt-name",
        metavar="NAME",
        action="append",
        default=[],
        help="one more name the certificate is valid for (repeatable), e.g. a coordinator's "
        "IP address next to its host name",
    )
    issue.add_argument("--days", type=int, default=825, help="validity (default: 825)")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")
    issue.set_defaults(run=_run_certs_issue)


def _run_certs_ca(args: argparse.Namespace) -> int:
    try:
        cert_path, key_path = certs.write_ca(args.dir, args.common_name, days=args.days)
    except (OSError, ValueError) as exc:
        return _error(str(exc))
    _say(f"CA certificate: {cert_path} (clients: --ca; coordinator: --client-ca)")
    _say(f"CA key:         {key_path} (keep it secret: it signs certificates for any name)")
    return 0


def issue_paths(out: str) -> tuple[Path, Path]:
    """``(cert_path, key_path)`` that ``certs issue`` writes for the prefix ``out``."""
    base = out[: -len(".pem")] if out.endswith(".pem") else out
    return Path(base + ".pem"), Path(base + ".key")


def _run_certs_issue(args: argparse.Namespace) -> int:
    cert_path, key_path = issue_paths(args.out)
    if not args.force:
        for path in (cert_path, key_path):
            if path.exists():
                return _error(f"{path} already exists (use --force to overwrite it)")
    try:
        ca_cert, ca_key = certs.load_ca(args.ca)
        cert_pem, key_pem = certs.issue_cert(
            ca_cert, ca_key, [args.name, *args.alt_name], days=args.days
        )
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        certs.save_pair(cert_pem, key_pem, cert_path, key_path)
    except (OSError, ValueError) as exc:
        return _error(str(exc))
    names = ", ".join([args.name, *args.alt_name])
    _say(f"certificate: {cert_path} (for {names}, signed by {args.ca / certs.CA_CERT_FILE})")
    _say(f"key:         {key_path}")
    return 0


# --- demo ------------------------------------------------------------------------------------


def _add_demo_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="show conec at work on loopback, in a few seconds",
        description="Start a coordinator with a throwaway certificate and three clients "
        "(alice, bob, carol) on 127.0.0.1, exchange messages over every kind of stream, and "
        "print what happened and how fast. Exits with status 0 when every step worked, 1 "
        "otherwise.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller transfers (about a second)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser.set_defaults(run=_run_demo)


class DemoError(Exception):
    """A demo step failed; the message says which and why."""


def _run_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    try:
        trio.run(_demo, args.quick)
    except DemoError as exc:
        return _error(f"demo failed: {exc}")
    return 0


def _describe(exc: BaseException) -> str:
    """One line about ``exc``; for an exception group, about its first real leaf."""
    while isinstance(getattr(exc, "exceptions", None), tuple):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]  # type: ignore[attr-defined]
        if not leaves:
            break
        exc = leaves[0]
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Progress:
    """The step the demo is at, for the message when something fails outside a step."""

    def __init__(self) -> None:
        self.step = "starting"


@contextmanager
def _step(progress: _Progress, name: str, seconds: float) -> Iterator[None]:
    """Run one demo step with a deadline; any failure becomes a DemoError naming the step."""
    progress.step = name
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise DemoError(f"{name}: no result within {seconds:g} s") from None
    except DemoError as exc:
        raise DemoError(f"{name}: {exc}") from None
    except Exception as exc:
        raise DemoError(f"{name}: {_describe(exc)}") from exc


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoError(message)


def _line(label: str, text: str) -> None:
    _say(f"  {label:<15} {text}")


class _Tap(trio.abc.ReceiveChannel[bytes]):
    """Passes a stream's messages through and says when the stream has ended.

    The demo's slow reader starts reading only once every message has arrived, so exactly
    how many the non-blocking buffer dropped is known in advance.
    """

    def __init__(self, inner: trio.abc.ReceiveChannel[bytes]) -> None:
        self._inner = inner
        self.ended = trio.Event()

    async def receive(self) -> bytes:
        try:
            return await self._inner.receive()
        except trio.EndOfChannel:
            self.ended.set()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _demo(quick: bool) -> None:
    progress = _Progress()
    total = 30.0 if quick else 60.0
    try:
        with trio.fail_after(total):
            await _demo_steps(quick, progress)
    except DemoError:
        raise
    except trio.TooSlowError:
        raise DemoError(f"{progress.step}: the demo did not finish within {total:g} s") from None
    except Exception as exc:
        raise DemoError(f"{progress.step}: {_describe(exc)}") from exc


async def _demo_steps(quick: bool, progress: _Progress) -> None:
    # Transfers stop at a size or after a time budget, whichever comes first, so that the
    # demo takes a few seconds on slow machines too.
    bulk_bytes = (4 if quick else 20) * 1_000_000
    small_count = 2_000 if quick else 20_000
    budget = 0.5 if quick else 2.0
    started = trio.current_time()

    _say("conec-trio demo: a coordinator and three clients on 127.0.0.1 (throwaway certificate)")
    cert, key = certs.self_signed_cert(list(LOOPBACK_NAMES))
    progress.step = "starting the coordinator"
    coord_config = CoordConfig(cert_chain=cert, private_key=key, host="127.0.0.1", port=0)
    async with open_coordinator(coord_config) as coord:
        _line("coordinator", f"listening on {_format_address(*coord.address)}")

        def config(client_id: str) -> ClientConfig:
            return ClientConfig(
                id=client_id, coord_host="127.0.0.1", coord_port=coord.address[1], ca=cert
            )

        # open_client gives up after its connect_timeout (10 s) if the coordinator is silent.
        progress.step = "connecting clients"
        async with (
            open_client(config("alice")) as alice,
            open_client(config("bob")) as bob,
            open_client(config("carol")) as carol,
        ):
            _check(coord.num_clients == 3, f"coord.num_clients is {coord.num_clients}, not 3")
            _line(
                "clients",
                f"alice, bob, carol connected (coord.num_clients = {coord.num_clients})",
            )
            with _step(progress, "proxied stream", 5):
                await _proxied_exchange(alice, bob)
            with _step(progress, "stream to the coordinator", 5):
                await _coordinator_exchange(alice, coord)
            with _step(progress, "loopback stream", 5):
                await _loopback_exchange(alice)
            with _step(progress, "bulk transfer", budget + 10):
                await _bulk(alice, bob, bulk_bytes, budget)
            with _step(progress, "direct channel", budget + 15):
                await _direct(alice, carol, bulk_bytes, budget)
            with _step(progress, "small messages", budget + 10):
                await _small_messages(alice, bob, small_count, budget)
            with _step(progress, "non-blocking reader", 5):
                await _nonblocking(alice, bob)
            with _step(progress, "CBOR", 5):
                await _cbor(alice, bob)
            with _step(progress, "broadcast", 5):
                await _broadcast({"alice": alice, "bob": bob, "carol": carol}, coord)
            progress.step = "shutting down"
    _say(f"demo finished in {trio.current_time() - started:.1f} s")


async def _accept(client: Client, expected_peer: str) -> tuple[Any, Any]:
    incoming = await client.incoming_streams.receive()
    _check(
        incoming.peer == expected_peer,
        f"{client.id} got a stream from {incoming.peer!r}, expected {expected_peer!r}",
    )
    return incoming.send, incoming.recv


async def _proxied_exchange(alice: Client, bob: Client) -> None:
    t0 = trio.current_time()
    send, recv = await alice.new_proxied_stream("bob")
    await send.send(b"hello bob")
    bob_send, bob_recv = await _accept(bob, "alice")
    got = await bob_recv.receive()
    await bob_send.send(b"hi alice")
    reply = await recv.receive()
    elapsed = trio.current_time() - t0
    _check(got == b"hello bob" and reply == b"hi alice", f"got {got!r} and {reply!r}")
    for channel in (send, recv, bob_send, bob_recv):
        await channel.aclose()
    _line(
        "proxied",
        f"alice -> bob {got!r}, reply {reply!r} ({send.stream_id!r}, "
        f"open + round trip {elapsed * 1000:.1f} ms)",
    )


async def _coordinator_exchange(alice: Client, coord: Coordinator) -> None:
    send, recv = await alice.new_proxied_stream(None)
    await send.send(b"ping")
    incoming = await coord.incoming_streams.receive()
    _check(incoming.peer == "alice", f"the coordinator saw peer {incoming.peer!r}")
    got = await incoming.recv.receive()
    await incoming.send.send(b"pong")
    reply = await recv.receive()
    _check(got == b"ping" and reply == b"pong", f"got {got!r} and {reply!r}")
    for channel in (send, recv, incoming.send, incoming.recv):
        await channel.aclose()
    _line(
        "to coordinator",
        f"alice -> coordinator {got!r}, reply {reply!r} (alice's end has peer None)",
    )


async def _loopback_exchange(alice: Client) -> None:
    send, recv = await alice.new_proxied_stream("alice")
    await send.send(b"note to self")
    in_send, in_recv = await _accept(alice, "alice")
    got = await in_recv.receive()
    await in_send.send(b"noted")
    reply = await recv.receive()
    _check(got == b"note to self" and reply == b"noted", f"got {got!r} and {reply!r}")
    for channel in (send, recv, in_send, in_recv):
        await channel.aclose()
    _line("loopback", f"alice -> alice {got!r}, reply {reply!r}")


async def _transfer(
    alice: Client, bob: Client, size: int, max_count: int, budget: float, direct: bool = False
) -> tuple[int, float]:
    """alice sends ``size``-byte messages to bob through the coordinator, ``max_count`` of
    them or as many as fit in ``budget`` seconds, then ends the stream; bob counts them and
    answers with the count once the stream ended.

    Returns ``(messages, seconds)``: from alice's first send to her receipt of bob's answer.
    """
    payload = bytes(size)
    if direct:
        send, recv = await alice.new_direct_stream(bob.id)
    else:
        send, recv = await alice.new_proxied_stream(bob.id)
    bob_channels: list[Any] = []
    received = 0

    async def receiver() -> None:
        nonlocal received
        bob_send, bob_recv = await _accept(bob, alice.id)
        bob_channels.extend((bob_send, bob_recv))
        async for message in bob_recv:
            if len(message) == size:
                received += 1
        await bob_send.send(received.to_bytes(8, "big"))

    sent = 0
    t0 = trio.current_time()
    deadline = t0 + budget
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        while sent < max_count and (sent == 0 or trio.current_time() < deadline):
            await send.send(payload)
            sent += 1
        await send.aclose()
        ack = await recv.receive()
    elapsed = trio.current_time() - t0
    _check(int.from_bytes(ack, "big") == sent, f"alice sent {sent} messages, bob got {received}")
    for channel in (recv, *bob_channels):
        await channel.aclose()
    return sent, elapsed


async def _bulk(alice: Client, bob: Client, max_bytes: int, budget: float) -> None:
    chunk = 64 * 1024
    count, elapsed = await _transfer(alice, bob, chunk, math.ceil(max_bytes / chunk), budget)
    total = count * chunk
    _line(
        "bulk",
        f"{total / 1e6:.1f} MB alice -> bob in {chunk // 1024} KiB messages: "
        f"{elapsed:.2f} s, {total / 1e6 / elapsed:.1f} MB/s",
    )


async def _direct(alice: Client, carol: Client, max_bytes: int, budget: float) -> None:
    t0 = trio.current_time()
    await alice.new_channel(carol.id)
    opened = trio.current_time() - t0
    chunk = 64 * 1024
    count, elapsed = await _transfer(
        alice, carol, chunk, math.ceil(max_bytes / chunk), budget, direct=True
    )
    await alice.close_channel(carol.id)
    total = count * chunk
    _line(
        "direct",
        f"channel alice <-> carol opened in {opened * 1000:.1f} ms (pinned certificates); "
        f"{total / 1e6:.1f} MB over a direct stream: {elapsed:.2f} s, "
        f"{total / 1e6 / elapsed:.1f} MB/s",
    )


async def _small_messages(alice: Client, bob: Client, max_count: int, budget: float) -> None:
    count, elapsed = await _transfer(alice, bob, 64, max_count, budget)
    _line(
        "small messages",
        f"{count:,} x 64 B alice -> bob: {elapsed:.2f} s, {count / elapsed:,.0f} msgs/s",
    )


async def _nonblocking(alice: Client, bob: Client) -> None:
    sent, capacity = 1_000, 10
    send, recv = await alice.new_proxied_stream("bob")
    bob_send, bob_recv = await _accept(bob, "alice")
    tap = _Tap(bob_recv)
    async with open_nonblocking(tap, capacity) as nb:
        # Nothing holds alice back: bob's buffer drops the oldest messages instead.
        for i in range(sent):
            await send.send(i.to_bytes(4, "big"))
        await send.aclose()
        await tap.ended.wait()  # bob is a slow reader: he starts after everything arrived
        lagged = 0
        try:
            await nb.receive()
        except Lagged as exc:
            lagged = exc.count
        kept = [int.from_bytes(message, "big") async for message in nb]
    expected = list(range(sent - capacity, sent))
    _check(lagged == sent - capacity, f"Lagged.count was {lagged}, expected {sent - capacity}")
    _check(kept == expected, f"bob kept messages {kept}, expected {expected}")
    await recv.aclose()
    await bob_send.aclose()
    _line(
        "non-blocking",
        f"alice sent {sent:,}; bob's reader (capacity {capacity}) got "
        f"Lagged(count={lagged}), then #{kept[0]}..#{kept[-1]}",
    )


async def _cbor(alice: Client, bob: Client) -> None:
    value = {"n": 42, "tags": ["quic", "trio"], "raw": b"\x00\xff"}
    send, recv = await alice.new_proxied_stream("bob")
    bob_send, bob_recv = await _accept(bob, "alice")
    await CborSendChannel(send).send(value)
    got = await CborReceiveChannel(bob_recv).receive()
    await CborSendChannel(bob_send).send(got)
    back = await CborReceiveChannel(recv).receive()
    _check(got == value and back == value, f"sent {value!r}, bob got {got!r}, back {back!r}")
    for channel in (send, recv, bob_send, bob_recv):
        await channel.aclose()
    _line("CBOR", f"{value!r} alice -> bob -> alice, unchanged")


async def _broadcast(clients: dict[str, Client], coord: Coordinator) -> None:
    name = "demo-room"
    members = {}
    for client_id, client in clients.items():
        members[client_id] = await client.new_broadcast(name)
    counts = await clients["alice"].broadcast_count(name)
    _check(counts == (3, 3), f"broadcast_count({name!r}) is {counts}, not (3, 3)")
    received: dict[str, list[tuple[str, bytes]]] = {client_id: [] for client_id in clients}

    async def member(client_id: str) -> None:
        send, recv = members[client_id]
        await send.send(f"hello from {client_id}".encode())
        for _ in range(len(clients)):
            message = await recv.receive()
            received[client_id].append((message.sender, message.data))

    async with trio.open_nursery() as nursery:
        for client_id in clients:
            nursery.start_soon(member, client_id)
    senders = sorted(clients)
    for client_id, messages in received.items():
        got = sorted(sender for sender, _ in messages)
        _check(got == senders, f"{client_id} got broadcasts from {got}, expected {senders}")
        for sender, data in messages:
            _check(data == f"hello from {sender}".encode(), f"{client_id} got {data!r}")
    num_broadcasts = coord.num_broadcasts
    for send, recv in members.values():
        await send.aclose()
        await recv.aclose()
    _line(
        "broadcast",
        f"{name!r}: each client sent 1, received 3; broadcast_count = {counts}, "
        f"coord.num_broadcasts = {num_broadcasts}",
    )
