"""The UDP socket under every endpoint: batched non-blocking reads, GSO sends, and the
factory that makes sockets (a fake network replaces it in tests).

The factory lives in a Trio ``RunVar``: a test that swaps it affects only its own
``trio.run``, never another run in the same process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, Protocol

import trio

# UDP generic segmentation offload (Linux >= 4.18): constants are not in the socket module.
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64  # the kernel's limit per send
GSO_MAX_BYTES = 65_000  # one send carries at most a 64 KiB datagram's worth
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_PROBE = getattr(socket, "IP_PMTUDISC_PROBE", 3)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_PROBE = getattr(socket, "IPV6_PMTUDISC_PROBE", 3)
GSO_SUPPORTED = sys.platform == "linux" and os.environ.get("CONEC_TRIO_NO_GSO", "") == ""
MAX_UDP_PAYLOAD = 65_535

Address = tuple[Any, ...]


class DatagramSocket(Protocol):
    """What an endpoint needs of a UDP socket. Tests plug in a fake network here."""

    family: int

    def getsockname(self) -> tuple[Any, ...]: ...

    async def wait_readable(self) -> None: ...

    def recvfrom_nowait(self) -> tuple[bytes, tuple[Any, ...]] | None:
        """One datagram, or None when none is waiting."""

    def sendto_nowait(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """Send one datagram; False if the socket buffer is full (wait_writable, retry)."""

    def send_batch_nowait(self, datagrams: list[tuple[bytes, tuple[Any, ...]]], start: int) -> int:
        """Send datagrams from ``start`` on, as many as fit now; how many were sent."""

    async def wait_writable(self) -> None: ...

    def close(self) -> None: ...


class UdpSocket:
    """A real, non-blocking UDP socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.family: int = sock.family
        self._gso = GSO_SUPPORTED

    def getsockname(self) -> tuple[Any, ...]:
        return tuple(self._sock.getsockname())

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._sock)

    def recvfrom_nowait(self) -> tuple[bytes, tuple[Any, ...]] | None:
        while True:
            try:
                return self._sock.recvfrom(MAX_UDP_PAYLOAD)
            except BlockingIOError:
                return None
            except OSError:
                # ICMP errors from earlier sends can surface here; they concern one
                # destination, not this socket.
                continue

    def sendto_nowait(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return self.sendto_nowait(data, addr)
            # Unreachable destination, or an address of the other family: the datagram is
            # lost, as on the wire; QUIC's recovery deals with it.
        return True

    def send_batch_nowait(self, datagrams: list[tuple[bytes, tuple[Any, ...]]], start: int) -> int:
        """Consecutive datagrams of one size to one address leave in one system call (UDP
        GSO, Linux), which saves most of the per-packet cost; elsewhere one call each."""
        n = len(datagrams)
        i = start
        while i < n:
            data, addr = datagrams[i]
            j = i + 1
            if self._gso:
                size = len(data)
                limit = min(n, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // max(size, 1))
                while j < limit and datagrams[j][1] == addr and len(datagrams[j][0]) == size:
                    j += 1
                # the last segment may be shorter
                if j < limit and datagrams[j][1] == addr and len(datagrams[j][0]) < size:
                    j += 1
            if j - i > 1:
                ok = self._send_gso(datagrams, i, j, addr)
                if ok is None:
                    continue  # GSO refused: retry the same run one by one
                if not ok:
                    return i - start
            elif not self.sendto_nowait(data, addr):
                return i - start
            i = j
        return i - start

    def _send_gso(
        self, datagrams: list[tuple[bytes, tuple[Any, ...]]], i: int, j: int, addr: tuple[Any, ...]
    ) -> bool | None:
        payload = b"".join(d for d, _ in datagrams[i:j])
        segment = struct.pack("=H", len(datagrams[i][0]))
        try:
            self._sock.sendmsg([payload], [(SOL_UDP, UDP_SEGMENT, segment)], 0, addr)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                self._gso = False  # the device or kernel cannot segment: stop trying
                return None
            # Unreachable destination: the datagrams are lost, as on the wire.
        return True

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    def close(self) -> None:
        self._sock.close()


SocketFactory = Callable[[int, str, int], DatagramSocket]


def real_udp_socket(family: int, host: str, port: int) -> DatagramSocket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            # Dual stack where the OS allows, so "::" serves IPv4 clients too.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        # Don't fragment: a datagram too large for the path must get lost (and so fail its
        # path MTU probe), not be split into IP fragments.
        with contextlib.suppress(OSError, AttributeError):
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return UdpSocket(sock)


_socket_factory: trio.lowlevel.RunVar[SocketFactory] = trio.lowlevel.RunVar(
    "conec_trio_socket_factory", default=real_udp_socket
)


def set_socket_factory(factory: SocketFactory | None) -> SocketFactory:
    """Make every endpoint opened later in this ``trio.run`` use ``factory`` (None: real
    sockets). Returns the factory it replaces.

    For tests on a simulated network; not for production use.
    """
    old = _socket_factory.get()
    _socket_factory.set(factory or real_udp_socket)
    return old


def make_udp_socket(family: int, host: str, port: int) -> DatagramSocket:
    """A bound, non-blocking UDP socket (or the test network's stand-in)."""
    return _socket_factory.get()(family, host, port)
