"""Which path a stream takes: Happy Eyeballs for ``new_stream``, failure memory, and ping.

``new_stream`` gives a direct channel ``ClientConfig.direct_head_start`` seconds; if it is not
up by then, it returns a movable proxied stream at once and the attempt goes on in the
background. When the channel comes up (whoever opened it), those streams move onto it
(``_migrate``). A failed attempt is remembered per peer with a growing back-off; while
proxied streams to that peer are in use, attempts are retried in the background as the
back-off allows, so a NAT that changes its behaviour, or a peer that moves to another
network, gets a direct path without anyone asking.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ._config import ClientConfig, canonical_id
from ._direct import DirectChannel, DirectManager
from ._exceptions import ChannelError, ConecError, DisconnectedError, PeerNotFoundError
from ._messages import MessageReceiveChannel, MessageSendChannel
from ._migrate import Migrations, MovableStream, new_token
from ._streams import StreamState, read_header, write_message
from ._types import Path, PingResult
from ._wire import control
from ._wire.codes import StreamCode

log = logging.getLogger("conec_trio.paths")

# After the first failed attempt to open a channel to a peer, new_stream goes straight to the
# proxied path for this long; each further failure doubles it, up to RETRY_MAX. A channel
# that opens forgets the failures.
RETRY_FIRST = 5.0
RETRY_MAX = 300.0
# Each wait is drawn from [1 - RETRY_JITTER, 1] of its length, so that peers that failed
# together do not retry in step.
RETRY_JITTER = 0.2


@dataclass
class _PeerPath:
    """What this client knows about reaching one peer directly."""

    failures: int = 0
    retry_at: float = -math.inf  # no attempt before this time (trio's clock)
    attempt: trio.Event | None = None  # set when the attempt under way ends
    retrying: bool = False  # a background task retries while proxied streams are in use
    last_error: str = field(default="")


@dataclass(frozen=True)
class PathsContext:
    """What the paths need of their client."""

    id: str
    config: ClientConfig
    nursery: trio.Nursery
    direct: DirectManager
    take_proxied_id: Callable[[], int]  # a free proxied stream id, now in use
    release_proxied_id: Callable[[int], None]
    # open_proxied(peer, n, kind, token) -> (send, recv)
    open_proxied: Callable[..., Awaitable[tuple[MessageSendChannel, MessageReceiveChannel]]]
    # open_with_header(header, expected reply type, what) -> (stream, reply)
    open_with_header: Callable[..., Awaitable[tuple[StreamState, Any]]]
    check_alive: Callable[[], object]  # raises DisconnectedError without the coordinator
    lost: Callable[[], bool]  # the client gave up on its coordinator for good


class Paths:
    """A client's choice of paths (see the module docstring)."""

    def __init__(self, ctx: PathsContext) -> None:
        self._client = client = ctx
        self._peers: dict[str, _PeerPath] = {}
        self.migrations = Migrations(client.nursery)
        direct = client.direct
        direct.on_channel_up = self._channel_up
        direct.header_handlers[control.MoveProxied] = self.migrations.move_arrived
        direct.header_handlers[control.Ping] = _answer_ping

    def _peer(self, peer: str) -> _PeerPath:
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _PeerPath()
        return state

    def _channel(self, peer: str) -> DirectChannel | None:
        channel = self._client.direct.channels.get(peer)
        return channel if channel is not None and channel.conn.is_open else None

    # -- new_stream ---------------------------------------------------------------------------

    async def new_stream(self, peer: str) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        """Direct if a channel is open or opens within the head start, else movable proxied."""
        client = self._client
        peer = canonical_id(peer)
        await client.direct.wait_accepting(peer)
        if self._channel(peer) is not None:
            await trio.lowlevel.checkpoint()
            return client.direct.new_stream(peer)
        if peer != client.id and trio.current_time() >= self._peer(peer).retry_at:
            done = self._attempt(peer)
            with trio.move_on_after(client.config.direct_head_start):
                await done.wait()
            if self._channel(peer) is not None:
                return client.direct.new_stream(peer)
        n = client.take_proxied_id()
        try:
            return await self.open_movable(peer, n)
        except BaseException:
            client.release_proxied_id(n)
            raise

    async def open_movable(
        self, peer: str, n: int
    ) -> tuple[MessageSendChannel, MessageReceiveChannel]:
        """A proxied stream with id ``n`` that moves onto a direct channel once one is up."""
        client = self._client
        peer = canonical_id(peer)
        if peer == client.id:  # no channel to oneself: it stays proxied
            return await client.open_proxied(peer, n)
        token = new_token()
        send, recv = await client.open_proxied(peer, n, control.PROXIED_MOVABLE, token)
        stream = MovableStream(self.migrations, peer, n, token, send._st, send, recv, opener=True)
        self.migrations.outgoing(stream, self._channel(peer))
        if self._channel(peer) is None:
            self._keep_trying(peer)
        log.debug("stream %d to %r goes through the coordinator for now", n, peer)
        return send, recv

    def incoming_movable(
        self,
        peer: str,
        n: int,
        token: int,
        st: StreamState,
        send: MessageSendChannel,
        recv: MessageReceiveChannel,
    ) -> None:
        """A movable stream ``peer`` opened to us: it moves when the peer's direct stream
        for it arrives."""
        stream = MovableStream(self.migrations, peer, n, token, st, send, recv, opener=False)
        self.migrations.incoming(stream)

    # -- attempts and failure memory ---------------------------------------------------------

    async def join_attempt(self, peer: str) -> bool:
        """Wait for a background attempt to ``peer`` under way, if any: True if it opened a
        channel (``new_channel`` has nothing left to do), ``ChannelError`` if it failed,
        False if there was none."""
        peer = canonical_id(peer)
        state = self._peers.get(peer)
        if state is None or state.attempt is None:
            return False
        failures = state.failures
        await state.attempt.wait()
        if self._channel(peer) is not None:
            return True
        if state.failures > failures:
            raise ChannelError(state.last_error)
        return False

    def _attempt(self, peer: str) -> trio.Event:
        """The end of the attempt to open a channel to ``peer`` under way, or of a new one."""
        opening = self._client.direct.opening(peer)
        if opening is not None:  # another task opens it (new_channel, or the peer's offer)
            return opening
        state = self._peer(peer)
        if state.attempt is None:
            state.attempt = trio.Event()
            self._client.nursery.start_soon(self._open_channel, peer, state, state.attempt)
        return state.attempt

    async def _open_channel(self, peer: str, state: _PeerPath, done: trio.Event) -> None:
        direct = self._client.direct
        try:
            opening = direct.opening(peer)
            if opening is not None:  # new_channel got there first since we were started
                await opening.wait()
                return
            if self._channel(peer) is not None:
                return
            await direct.open(peer)
        except (PeerNotFoundError, DisconnectedError) as exc:
            # Not the path's fault (the peer was not there yet, or the coordinator was
            # away): the next new_stream tries again, with no back-off.
            log.debug("no direct channel to %r now: %s", peer, exc)
        except ConecError as exc:
            if self._channel(peer) is None:  # else the peer's own opening won the race
                self._failed(peer, state, exc)
        finally:
            state.attempt = None
            done.set()

    def _failed(self, peer: str, state: _PeerPath, exc: ConecError) -> None:
        state.failures += 1
        wait = min(RETRY_FIRST * 2 ** (state.failures - 1), RETRY_MAX)
        wait *= 1 - RETRY_JITTER * random.random()
        state.retry_at = trio.current_time() + wait
        state.last_error = str(exc)
        level = logging.INFO if state.failures == 1 else logging.DEBUG
        log.log(
            level,
            "no direct channel to %r (attempt %d), streams go through the coordinator; "
            "next attempt in %.0f s: %s",
            peer,
            state.failures,
            wait,
            exc,
        )

    def failures(self) -> dict[str, str]:
        """Why the last attempt failed, for each peer with no channel open now."""
        return {
            peer: state.last_error
            for peer, state in self._peers.items()
            if state.failures and self._channel(peer) is None
        }

    def _keep_trying(self, peer: str) -> None:
        state = self._peer(peer)
        if not state.retrying:
            state.retrying = True
            self._client.nursery.start_soon(self._retry, peer, state)

    async def _retry(self, peer: str, state: _PeerPath) -> None:
        """Attempt a channel whenever the back-off allows, while proxied streams this client
        opened to ``peer`` are in use and no channel is open."""
        try:
            while self.migrations.has_outgoing(peer) and self._channel(peer) is None:
                wait = state.retry_at - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                    continue
                if self._client.lost():
                    return
                await self._attempt(peer).wait()
        finally:
            state.retrying = False

    def _channel_up(self, channel: DirectChannel) -> None:
        state = self._peers.get(channel.peer)
        if state is not None and state.failures:
            log.info(
                "direct channel to %r open after %d failed attempt(s)",
                channel.peer,
                state.failures,
            )
            state.failures = 0
            state.retry_at = -math.inf
        self.migrations.channel_up(channel)

    # -- ping ---------------------------------------------------------------------------------

    async def ping(self, peer: str) -> PingResult:
        """One round trip to ``peer``'s library, over the direct channel if one is open."""
        client = self._client
        peer = canonical_id(peer)
        await client.direct.wait_accepting(peer)
        start = trio.current_time()
        channel = self._channel(peer)
        if channel is not None:
            st = channel.table.open_stream()
            write_message(st, control.encode(control.Ping()))
            st.finish_send()
            path = Path.DIRECT
        else:
            client.check_alive()
            n = client.take_proxied_id()
            try:
                st, _ = await client.open_with_header(
                    control.OpenProxied(n, peer, control.PROXIED_PING),
                    control.StreamAccepted,
                    f"pinging {peer!r}",
                )
            except BaseException:
                client.release_proxied_id(n)
                raise
            st.on_done = lambda: client.release_proxied_id(n)
            st.finish_send()
            path = Path.PROXIED
        try:
            await read_header(st)
        except ConecError as exc:
            if path is Path.PROXIED:
                client.check_alive()
            raise ChannelError(f"ping to {peer!r} got no answer: {exc}") from exc
        finally:
            st.stop_receiving(StreamCode.STOPPED)
        return PingResult(trio.current_time() - start, path)


def answer_ping(st: StreamState) -> None:
    """The library's answer to a ping: one empty message, and the end."""
    write_message(st, b"")
    st.finish_send()
    st.stop_receiving(StreamCode.STOPPED)


def _answer_ping(peer: str, st: StreamState, msg: control.Ping) -> None:
    answer_ping(st)
