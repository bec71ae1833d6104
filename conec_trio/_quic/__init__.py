"""QUIC over Trio UDP sockets: the only package that touches aioquic and sockets.

Roles describe connections with ``ConnectionSettings`` and talk to them through ``QuicConn``
and ``ConnectionListener``; nothing outside this package sees an aioquic object.
"""

from ._aioquic import FlowControlledConnection
from ._conn import ConnectionListener, ConnState, QuicConn
from ._endpoint import Admission, PreparedDial, QuicEndpoint
from ._pmtu import PMTU_LADDER
from ._reset import stateless_reset_key
from ._udp import (
    DatagramSocket,
    SocketFactory,
    make_udp_socket,
    real_udp_socket,
    set_socket_factory,
)
from .settings import ConnectionSettings, Identity, TrustStore

__all__ = [
    "PMTU_LADDER",
    "Admission",
    "ConnState",
    "ConnectionListener",
    "ConnectionSettings",
    "DatagramSocket",
    "FlowControlledConnection",
    "Identity",
    "PreparedDial",
    "QuicConn",
    "QuicEndpoint",
    "SocketFactory",
    "TrustStore",
    "make_udp_socket",
    "real_udp_socket",
    "set_socket_factory",
    "stateless_reset_key",
]
