"""conec_trio: COordinated NEtwork Channels for Trio, over QUIC.

One coordinator, many clients: message streams relayed by the coordinator or direct between
clients, broadcast channels, and adapters for non-blocking and CBOR-typed receivers.
"""

from . import certs
from ._client import Client, open_client
from ._config import ClientConfig, CoordConfig
from ._coordinator import Coordinator, open_coordinator
from ._exceptions import (
    BadCborError,
    BroadcastNotFoundError,
    CertificateError,
    ChannelError,
    ConecError,
    ConfigError,
    ConnectError,
    DisconnectedError,
    IdInUseError,
    InvalidIdError,
    Lagged,
    MessageTooLargeError,
    PeerNotFoundError,
    ProtocolError,
    RefusedError,
    StreamIdInUseError,
    VersionMismatchError,
)
from ._messages import MessageReceiveChannel, MessageSendChannel
from ._presence import PeerEvent
from ._stats import ChannelStatistics, ClientStatistics, CoordinatorStatistics
from ._types import BroadcastMessage, IncomingStream, Path, PingResult, StreamId
from .adapters import CborReceiveChannel, CborSendChannel, open_nonblocking, untagged

__version__ = "0.1.0"

__all__ = [
    "BadCborError",
    "BroadcastMessage",
    "BroadcastNotFoundError",
    "CborReceiveChannel",
    "CborSendChannel",
    "CertificateError",
    "ChannelError",
    "ChannelStatistics",
    "Client",
    "ClientConfig",
    "ClientStatistics",
    "ConecError",
    "ConfigError",
    "ConnectError",
    "CoordConfig",
    "Coordinator",
    "CoordinatorStatistics",
    "DisconnectedError",
    "IdInUseError",
    "IncomingStream",
    "InvalidIdError",
    "Lagged",
    "MessageReceiveChannel",
    "MessageSendChannel",
    "MessageTooLargeError",
    "Path",
    "PeerEvent",
    "PeerNotFoundError",
    "PingResult",
    "ProtocolError",
    "RefusedError",
    "StreamId",
    "StreamIdInUseError",
    "VersionMismatchError",
    "certs",
    "open_client",
    "open_coordinator",
    "open_nonblocking",
    "untagged",
]
