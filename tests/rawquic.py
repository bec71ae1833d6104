"""A raw QUIC client for hostile-input tests.

It completes a real handshake with the coordinator (ALPN, a valid self-signed client cert for
its id) and then writes whatever bytes a test asks for, on whatever stream, bypassing the
library's framing and CBOR. It reads what comes back (framed or not), and records how each
stream and the connection ended: RESET_STREAM / STOP_SENDING codes, the CONNECTION_CLOSE code
and reason.

It reuses the library's QUIC endpoint (one trio UDP socket driving aioquic) but not its stream
layer: nothing here parses or checks what the test sends.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from conec_trio import _tls
from conec_trio._quic import (
    ConnectionListener,
    ConnectionSettings,
    Identity,
    QuicConn,
    QuicEndpoint,
    TrustStore,
    make_udp_socket,
)
from conec_trio._wire import control
from conec_trio._wire.framing import FrameDecoder, encode_frame

DEADLINE = 10.0  # every wait here is bounded by it


@dataclass
class RawStream:
    """What arrived on one stream, and how it ended."""

    data: bytearray = field(default_factory=bytearray)
    fin: bool = False
    reset_code: int | None = None  # the peer reset its sending side (RESET_STREAM)
    stop_code: int | None = None  # the peer stopped reading ours (STOP_SENDING)
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(2**62))
    messages: list[bytes] = field(default_factory=list)
    read: int = 0  # messages already returned by read_message

    @property
    def ended(self) -> bool:
        return self.fin or self.reset_code is not None


class RawClient(ConnectionListener):
    """One raw connection to a coordinator (see :func:`open_raw_client`)."""

    def __init__(self, conn: QuicConn, client_id: str) -> None:
        self.conn = conn
        self.id = client_id
        self.streams: dict[int, RawStream] = {}
        self.control_sid: int | None = None
        self._changed = trio.lowlevel.ParkingLot()
        self._rid = 1000
        # Streams whose data is recorded but not consumed: no credit goes back until release.
        self.withheld: dict[int, int] = {}
        conn.listener = self

    # -- ConnectionListener: record everything, consume at once (never hold a sender back) ----

    def _stream(self, sid: int) -> RawStream:
        return self.streams.setdefault(sid, RawStream())

    def stream_data(self, conn: QuicConn, stream_id: int, data: bytes, fin: bool) -> None:
        st = self._stream(stream_id)
        st.data += data
        st.decoder.feed(data)
        st.messages.extend(st.decoder)
        st.fin = st.fin or fin
        if stream_id in self.withheld:
            self.withheld[stream_id] += len(data)
        else:
            conn.add_consumed(stream_id, len(data))
        self._changed.unpark_all()

    def stream_reset(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        self._stream(stream_id).reset_code = error_code
        self._changed.unpark_all()

    def stop_sending(self, conn: QuicConn, stream_id: int, error_code: int) -> None:
        self._stream(stream_id).stop_code = error_code
        self._changed.unpark_all()

    def send_progress(self, conn: QuicConn) -> None:
        self._changed.unpark_all()

    def terminated(self, conn: QuicConn, error_code: int, reason: str) -> None:
        self._changed.unpark_all()

    def withhold_credit(self, sid: int) -> None:
        """From now on, grant the peer no more credit on stream ``sid``."""
        self.withheld.setdefault(sid, 0)

    def release_credit(self, sid: int) -> None:
        """Consume what arrived on ``sid`` meanwhile, and from now on as it comes."""
        self.conn.add_consumed(sid, self.withheld.pop(sid, 0))

    # -- writing ----------------------------------------------------------------------------

    def open_stream(self, data: bytes = b"", *, fin: bool = False) -> int:
        """Open a new bidirectional stream, write ``data`` on it as is; its id."""
        sid = self.conn.next_stream_id()
        self._stream(sid)
        self.conn.send_stream_data(sid, data, fin)
        return sid

    def write(self, sid: int, data: bytes, *, fin: bool = False) -> None:
        """Write raw bytes (no framing added) on stream ``sid``."""
        self.conn.send_stream_data(sid, data, fin)

    def send_frame(self, sid: int, payload: bytes, *, fin: bool = False) -> None:
        """Write one length-prefixed frame carrying ``payload`` (any bytes)."""
        self.write(sid, encode_frame(payload), fin=fin)

    def send_control(self, msg: control.Message) -> None:
        """A well-formed control message on the control stream (after :meth:`hello`)."""
        assert self.control_sid is not None
        self.send_frame(self.control_sid, control.encode(msg))

    def open_frame_stream(self, payload: bytes, *, fin: bool = False) -> int:
        """Open a stream whose first frame carries ``payload``."""
        return self.open_stream(encode_frame(payload), fin=fin)

    # -- waiting ----------------------------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.park()

    async def read_message(self, sid: int, timeout: float = DEADLINE) -> bytes:
        """The next whole frame the peer sent on ``sid``."""
        st = self._stream(sid)
        await self.wait_until(lambda: len(st.messages) > st.read or st.ended, timeout)
        if len(st.messages) <= st.read:
            raise EOFError(f"stream {sid} ended (reset code {st.reset_code}) without a message")
        st.read += 1
        return st.messages[st.read - 1]

    async def read_control(self, sid: int, timeout: float = DEADLINE) -> control.Message:
        return control.decode(await self.read_message(sid, timeout))

    async def wait_closed(self, timeout: float = DEADLINE) -> tuple[int, str]:
        """Wait for the connection to close; ``(error_code, reason)`` as the peer sent them."""
        await self.wait_until(lambda: not self.conn.is_open, timeout)
        return self.conn.close_error_code or 0, self.conn.close_reason

    async def wait_reset(self, sid: int, timeout: float = DEADLINE) -> int:
        """Wait until the peer reset stream ``sid``; the RESET_STREAM error code."""
        st = self._stream(sid)
        await self.wait_until(lambda: st.reset_code is not None or not self.conn.is_open, timeout)
        if st.reset_code is None:
            raise AssertionError(
                f"connection closed ({self.conn.close_error_code:#x}: {self.conn.close_reason}) "
                f"instead of a reset of stream {sid}"
            )
        return st.reset_code

    # -- conversations a well-behaved client would have ---------------------------------------

    async def hello(self, client_id: str | None = None) -> control.Welcome:
        """Say a valid hello on a new stream (the control stream); the coordinator's Welcome."""
        hello = control.Hello(control.PROTOCOL_VERSION, client_id or self.id, True, [])
        self.control_sid = self.open_frame_stream(control.encode(hello))
        reply = await self.read_control(self.control_sid)
        assert isinstance(reply, control.Welcome), reply
        return reply

    async def still_served(self, timeout: float = DEADLINE) -> Any:
        """Ask the coordinator a question on the control stream; its answer (any reply)."""
        self._rid += 1
        self.send_control(control.BroadcastCountRequest(self._rid, "nonexistent"))
        assert self.control_sid is not None
        return await self.read_control(self.control_sid, timeout)


@asynccontextmanager
async def open_raw_client(
    address: tuple[str, int],
    ca: bytes,
    client_id: str = "mallory",
    *,
    identity: tuple[bytes, bytes] | None = None,
    max_streams: int = 1000,
    stream_window: int = 1 << 20,
) -> AsyncIterator[RawClient]:
    """Connect to the coordinator at ``address`` (IPv4) trusting ``ca``; handshake done, no
    hello said yet. ``identity`` is ``(cert_pem, key_pem)``; default: self-signed for the id."""
    cert_pem, key_pem = identity or _tls.ephemeral_identity(client_id)
    sock = make_udp_socket(socket.AF_INET, "127.0.0.1", 0)
    try:
        async with trio.open_nursery() as nursery:
            endpoint = QuicEndpoint(sock, nursery)
            await nursery.start(endpoint.run)
            chain = _tls.load_cert_chain_pem(cert_pem)
            settings = ConnectionSettings(
                alpn=control.ALPN,
                idle_timeout=DEADLINE,
                stream_window=stream_window,
                connection_window=16 << 20,
                max_streams=max_streams,
                identity=Identity(chain[0], tuple(chain[1:]), _tls.load_private_key(key_pem)),
                server_name=address[0],
                trust=TrustStore(cadata=ca),
            )
            conn = endpoint.connect(address, settings)
            raw = RawClient(conn, client_id)
            await raw.wait_until(lambda: conn.handshake_complete.is_set() or not conn.is_open)
            if not conn.is_open:
                raise ConnectionError(f"raw handshake failed: {conn.close_reason}")
            try:
                yield raw
            finally:
                with trio.CancelScope(shield=True):
                    await conn.aclose(0, "raw client leaving")
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
