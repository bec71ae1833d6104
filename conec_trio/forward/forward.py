"""``conec-trio forward``: the client side of port forwarding (PTTH's client proxy).

Listens on ``127.0.0.1:LOCAL_PORT`` for each mapping; each TCP connection it accepts becomes
one stream to the mapping's ``expose`` peer, opened with ``client.new_stream`` (direct when a
channel can be made, otherwise relayed by the coordinator). While there is no coordinator,
new TCP connections are closed at once, and the log says why.

At default verbosity it says, once per peer, which path the connections take and why (direct
via the peer's address, or relayed through the coordinator with the reason the direct channel
failed), and once more only when that changes: when relayed connections move onto a direct
channel that opened later, for example.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
from collections.abc import Sequence

import trio

from .. import (
    Client,
    ClientConfig,
    ConecError,
    DisconnectedError,
    IncomingStream,
    MessageReceiveChannel,
    MessageSendChannel,
    PeerNotFoundError,
    ProtocolError,
)
from .. import Path as StreamPath
from .addresses import Mapping
from .console import format_address, say
from .link import WATCH_INTERVAL, CoordinatorLink, Session
from .protocol import (
    OPEN_TIMEOUT,
    REPLY_TIMEOUT,
    clip,
    encode_answer,
    encode_request,
    parse_reply,
)
from .splice import close_quietly, splice, summary, tcp_peer, why

__all__ = ["Forwarder", "PathNotes"]

log = logging.getLogger(__name__)

# How long PathNotes waits for the outcome of a direct-channel attempt after the connections
# that started relayed ended: beyond the library's 10 s channel timeout.
OUTCOME_PATIENCE = 15.0

# accept() errors that mean "out of resources for now": wait a moment and go on accepting.
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Forwarder:
    """``conec-trio forward``: local TCP listeners whose connections go to peers' targets."""

    def __init__(self, config: ClientConfig, mappings: Sequence[Mapping]) -> None:
        self.config = config
        self.mappings = list(mappings)
        self.link = CoordinatorLink(config, self._refuse_incoming)
        self._ids = itertools.count(1)
        self.paths = PathNotes()

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[list[tuple[Mapping, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen (raising ``OSError`` if a port cannot be bound), report ``(mapping,
        bound port)`` pairs to ``task_status``, then serve until cancelled."""
        bound: list[tuple[Mapping, trio.SocketListener]] = []
        try:
            for mapping in self.mappings:
                try:
                    listeners = await trio.open_tcp_listeners(mapping.local_port, host="127.0.0.1")
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"cannot listen on 127.0.0.1:{mapping.local_port}: {exc.strerror or exc}",
                    ) from exc
                for listener in listeners:
                    assert isinstance(listener, trio.SocketListener)
                    bound.append((mapping, listener))
            async with trio.open_nursery() as nursery:
                for mapping, listener in bound:
                    nursery.start_soon(self._accept_loop, listener, mapping, nursery)
                ports = [int(listener.socket.getsockname()[1]) for _, listener in bound]
                task_status.started([(m, p) for (m, _), p in zip(bound, ports, strict=True)])
                await self.link.run()
        finally:
            for _, listener in bound:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    def _refuse_incoming(self, session: Session, incoming: IncomingStream) -> None:
        peer = clip(repr(incoming.peer))
        log.warning("refusing a stream from %s: this program only forwards", peer)
        answer = encode_answer(f"{self.config.id!r} is not running expose (it runs forward)")
        session.nursery.start_soon(_answer_and_close, incoming, answer)

    async def _accept_loop(
        self, listener: trio.SocketListener, mapping: Mapping, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                tcp = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.error("cannot accept on port %d: %s; retrying", mapping.local_port, exc)
                await trio.sleep(0.1)
                continue
            cid = next(self._ids)
            label = f"#{cid} {tcp_peer(tcp)} -> {mapping.peer} -> {mapping.target}"
            session = self.link.current
            if session is None:
                log.warning(
                    "%s: refused: not connected to the coordinator at %s (reconnecting)",
                    label,
                    self.link.where,
                )
                nursery.start_soon(close_quietly, tcp)
                continue
            session.nursery.start_soon(self._connection, session, tcp, mapping, label)

    async def _connection(
        self, session: Session, tcp: trio.SocketStream, mapping: Mapping, label: str
    ) -> None:
        started = trio.current_time()
        log.info("%s: new connection", label)
        try:
            opened = await self._open(session, mapping, label)
            if opened is None:
                return
            send, recv = opened
            how = "direct" if send.path is StreamPath.DIRECT else "through the coordinator"
            log.info("%s: connected (%s)", label, how)
            self.paths.opened(session, mapping.peer, send)
            try:
                result = await splice(tcp, send, recv)
            finally:
                self.paths.closed(mapping.peer, send)
            log.info("%s: %s", label, summary(result, trio.current_time() - started))
        except Exception:
            log.exception("%s: unexpected error", label)
        finally:
            with trio.CancelScope(shield=True):
                await tcp.aclose()

    async def _open(
        self, session: Session, mapping: Mapping, label: str
    ) -> tuple[MessageSendChannel, MessageReceiveChannel] | None:
        """A stream to ``mapping.peer`` that accepted our request, or None (said why)."""
        peer = mapping.peer
        request = encode_request(mapping.target)
        proxied = False
        for attempt in (1, 2):
            try:
                with trio.fail_after(OPEN_TIMEOUT):
                    async with session.lock(peer):
                        if proxied:
                            send, recv = await session.client.new_proxied_stream(peer)
                        else:
                            send, recv = await session.client.new_stream(peer)
            except PeerNotFoundError:
                log.warning("%s: refused: peer %r is not connected to the coordinator", label, peer)
                return None
            except DisconnectedError:
                log.warning("%s: refused: lost the coordinator", label)
                return None
            except ConecError as exc:
                log.warning("%s: refused: cannot open a stream to %r: %s", label, peer, exc)
                return None
            except trio.TooSlowError:
                log.warning("%s: refused: no stream to %r within %g s", label, peer, OPEN_TIMEOUT)
                return None
            with contextlib.suppress(trio.BrokenResourceError):
                # expose may refuse a peer (and stop reading) before the request arrives: its
                # answer says why. A broken stream breaks the receive below as well.
                await send.send(request)
            try:
                with trio.fail_after(REPLY_TIMEOUT):
                    refusal = parse_reply(await recv.receive())
            except trio.BrokenResourceError as exc:
                await send.abort()
                await close_quietly(send, recv)
                if attempt == 1 and send.stream_id.is_direct:
                    # A direct channel to a peer that restarted breaks only now: try again
                    # through the coordinator, which knows the peer's current connection.
                    log.info(
                        "%s: the direct channel broke before the answer (%s); "
                        "retrying through the coordinator",
                        label,
                        why(exc),
                    )
                    proxied = True
                    continue
                log.warning("%s: refused: the stream broke before the answer: %s", label, why(exc))
                return None
            except (trio.EndOfChannel, trio.TooSlowError, ProtocolError) as exc:
                await send.abort()
                await close_quietly(send, recv)
                problem = {
                    trio.EndOfChannel: f"{peer!r} ended the stream without an answer "
                    "(is it running expose?)",
                    trio.TooSlowError: f"no answer from {peer!r} within {REPLY_TIMEOUT:g} s",
                }.get(type(exc), f"bad answer from {peer!r}: {exc}")
                log.warning("%s: refused: %s", label, problem)
                return None
            if refusal is None:
                return send, recv
            log.warning("%s: refused by %r: %s", label, peer, refusal)
            await close_quietly(send, recv)
            return None
        return None  # pragma: no cover (the second attempt always returns)


class PathNotes:
    """Says once per peer which path forward's connections to it take and why, and again
    only when that changes: relayed connections that move onto a direct channel opened
    later, a direct attempt that turned out to fail, a channel gone since."""

    def __init__(self) -> None:
        self._said: dict[str, str] = {}  # peer -> what was said last: the path and why
        self._relayed: dict[str, set[MessageSendChannel]] = {}  # watched, by peer

    def opened(self, session: Session, peer: str, send: MessageSendChannel) -> None:
        """A connection to ``peer`` got its stream ``send``: say its path if it is news."""
        client = session.client
        if send.path is StreamPath.DIRECT:
            self._say_direct(client, peer, moved=False)
            return
        why = client.statistics().direct_failures.get(peer)
        if why is not None:
            self._say_relayed(peer, why)
        else:  # new_stream's head start ran out: the attempt goes on in the background
            self._say(
                peer,
                "trying",
                f"{peer}: relayed through the coordinator while a direct path is tried",
            )
        relayed = self._relayed.get(peer)
        if relayed is None:
            relayed = self._relayed[peer] = set()
            session.nursery.start_soon(self._watch, client, peer, relayed)
        relayed.add(send)

    def closed(self, peer: str, send: MessageSendChannel) -> None:
        """The connection over ``send`` ended."""
        relayed = self._relayed.get(peer)
        if relayed is not None:
            relayed.discard(send)

    async def _watch(self, client: Client, peer: str, relayed: set[MessageSendChannel]) -> None:
        """While relayed connections to ``peer`` go on (and a while after, for the outcome of
        the attempt under way), say when they move onto a direct channel or why they cannot."""
        patience = trio.current_time() + OUTCOME_PATIENCE
        try:
            while relayed or (self._said.get(peer) == "trying" and trio.current_time() < patience):
                await trio.sleep(WATCH_INTERVAL)
                moved = {send for send in relayed if send.path is StreamPath.DIRECT}
                if moved:
                    relayed -= moved
                    self._say_direct(client, peer, moved=True)
                elif not relayed and peer in client.statistics().channels:
                    self._say_direct(client, peer, moved=False)
                why = client.statistics().direct_failures.get(peer)
                if why is not None:
                    self._say_relayed(peer, why)
        finally:
            if self._relayed.get(peer) is relayed:
                del self._relayed[peer]

    def _say_direct(self, client: Client, peer: str, *, moved: bool) -> None:
        channel = client.statistics().channels.get(peer)
        where = f" via {format_address(*channel.address)}" if channel is not None else ""
        also = ": relayed connections moved onto it" if moved else ""
        self._say(peer, f"direct{where}", f"{peer}: direct{where}{also}")

    def _say_relayed(self, peer: str, why: str) -> None:
        self._say(peer, "failed", f"{peer}: relayed through the coordinator: no direct path: {why}")

    def _say(self, peer: str, what: str, line: str) -> None:
        if self._said.get(peer) != what:
            self._said[peer] = what
            say(line)


async def _answer_and_close(incoming: IncomingStream, answer: bytes) -> None:
    """Tell a peer that mistook this program for ``expose`` why its stream ends."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await incoming.send.send(answer)
    await close_quietly(incoming.send, incoming.recv)
