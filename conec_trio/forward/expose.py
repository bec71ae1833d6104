"""``conec-trio expose``: the server side of port forwarding (PTTH's server proxy).

Each stream another client opens carries one forwarding request; ``expose`` admits only its
listed peers and targets, connects to the target, answers, and splices the stream to it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Sequence
from typing import cast

import trio

from .. import (
    ClientConfig,
    IncomingStream,
    MessageReceiveChannel,
    MessageSendChannel,
    ProtocolError,
)
from .addresses import Target
from .link import CoordinatorLink, Session
from .protocol import (
    LOG_LIMIT,
    REQUEST_TIMEOUT,
    TARGET_CONNECT_TIMEOUT,
    clip,
    encode_answer,
    parse_request,
)
from .splice import close_all, close_quietly, splice, summary, why

__all__ = ["Exposer"]

log = logging.getLogger(__name__)


class Exposer:
    """``conec-trio expose``: connects streams from allowed peers to allowed TCP targets."""

    def __init__(
        self, config: ClientConfig, allow: Sequence[Target], peers: Sequence[str] = ()
    ) -> None:
        self.config = config
        self.allowed = {target.key for target in allow}
        self.peers = frozenset(peers)
        self.link = CoordinatorLink(config, self._incoming)
        self._ids = itertools.count(1)

    @property
    def trust_warning(self) -> str | None:
        """What ``--peer`` does not guarantee here, or None when it holds.

        A peer's id is whatever its certificate names, and by default certificates are
        self-signed: only a coordinator that demands CA-signed certificates makes ids mean
        something. This side cannot see whether the coordinator does, only whether it was
        given the client CA such a deployment needs for direct channels.
        """
        if not self.peers or self.config.client_ca is not None:
            return None
        names = ", ".join(repr(peer) for peer in sorted(self.peers))
        return (
            f"--peer {names} trusts client ids, and they are self-asserted unless the "
            "coordinator demands CA-signed certificates (coord --client-ca): without that, "
            "any client can connect under one of these ids. No --client-ca is set here (give "
            "expose the coordinator's)"
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (first saying :attr:`trust_warning`, if any)."""
        warning = self.trust_warning
        if warning is not None:
            log.warning("%s", warning)
        task_status.started()
        await self.link.run()

    def _incoming(self, session: Session, incoming: IncomingStream) -> None:
        how = "direct" if incoming.stream_id.is_direct else "through the coordinator"
        label = f"#{next(self._ids)} from {clip(str(incoming.peer))} ({how})"
        session.nursery.start_soon(self._serve, incoming, label)

    async def _serve(self, incoming: IncomingStream, label: str) -> None:
        # IncomingStream types its ends as trio's channel ABCs; a client's are always the
        # library's stream ends, whose abort() a broken connection needs.
        send = cast(MessageSendChannel, incoming.send)
        recv = cast(MessageReceiveChannel, incoming.recv)
        try:
            await self._serve_stream(incoming.peer, send, recv, label)
        except Exception:
            log.exception("%s: unexpected error", label)
            await send.abort()
            await close_quietly(send, recv)

    async def _serve_stream(
        self,
        peer: str | None,
        send: MessageSendChannel,
        recv: MessageReceiveChannel,
        label: str,
    ) -> None:
        started = trio.current_time()
        # Who asks comes before what they ask: the request of a peer that may not use this
        # exposer is never received, let alone decoded or logged.
        if self.peers and peer not in self.peers:
            await _refuse(send, recv, label, f"peer {clip(repr(peer))} may not use this exposer")
            return
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                data = await recv.receive()
            target = parse_request(data)
        except (trio.EndOfChannel, trio.BrokenResourceError):
            log.info("%s: the stream ended before its request", label)
            await close_quietly(send, recv)
            return
        except ProtocolError as exc:
            await _refuse(send, recv, label, f"bad request: {exc}")
            return
        except trio.TooSlowError:
            await _refuse(send, recv, label, f"no request within {REQUEST_TIMEOUT:g} s")
            return
        shown = clip(str(target))
        label = f"{label} -> {shown}"
        if target.key not in self.allowed:
            await _refuse(send, recv, label, f"target {shown} is not allowed")
            return
        try:
            with trio.fail_after(TARGET_CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(target.host, target.port)
        except OSError as exc:
            await _refuse(send, recv, label, f"cannot connect to {shown}: {_connect_error(exc)}")
            return
        except trio.TooSlowError:
            await _refuse(
                send,
                recv,
                label,
                f"cannot connect to {shown}: no answer within {TARGET_CONNECT_TIMEOUT:g} s",
            )
            return
        try:
            await send.send(encode_answer(None))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("%s: the stream broke before the answer: %s", label, why(exc))
            await close_all(tcp, send, recv, "stream broke")
            return
        log.info("%s: connected", label)
        result = await splice(tcp, send, recv)
        log.info("%s: %s", label, summary(result, trio.current_time() - started))


def _connect_error(exc: OSError) -> str:
    """Why ``trio.open_tcp_stream`` failed, in the OS's words ("Connection refused"): it
    raises one OSError for all its attempts, with each attempt's error in a group."""
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):
        reasons = [e.strerror for e in group.exceptions if isinstance(e, OSError) and e.strerror]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return exc.strerror or str(exc)


async def _refuse(
    send: MessageSendChannel, recv: MessageReceiveChannel, label: str, reason: str
) -> None:
    """Log why, answer with the reason, and close the stream. Every part of ``reason`` that
    came from the peer was clipped already; this bounds the whole as well."""
    reason = clip(reason, 4 * LOG_LIMIT)
    log.warning("%s: refused: %s", label, reason)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await send.send(encode_answer(reason))
    await close_quietly(send, recv)
