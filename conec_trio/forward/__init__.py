"""TCP port forwarding over conec channels: ``conec-trio forward`` and ``conec-trio expose``.

The port forwarding of the PTTH QUIC relay, built on conec::

    TCP client -> forward (client proxy) -> coordinator (relay)
               -> expose (server proxy) -> TCP server

``forward`` listens on ``127.0.0.1:LOCAL_PORT``; each TCP connection it accepts becomes one conec
stream to the ``expose`` peer, opened with ``client.new_stream`` (direct when a channel can be
made, otherwise relayed by the coordinator). On that stream:

1. forward -> expose: one CBOR message ``{"host": str, "port": int}``, the target;
2. expose -> forward: one CBOR message, ``{"ok": True}``, or ``{"ok": False, "reason": str}``
   followed by the end of the stream. ``expose`` admits only its listed peers (checked on
   the stream's peer id before the request is read) and targets;
3. then the TCP bytes both ways (:mod:`.splice`).

Both programs keep a client connected to the coordinator and reconnect with backoff whenever it
is lost (:mod:`.link`). The modules:

- :mod:`.addresses`: what users type (targets, mappings, client ids);
- :mod:`.protocol`: the request and the answer, decoded strictly and bounded, and
  :func:`~.protocol.clip` for whatever a peer sent that reaches a log;
- :mod:`.link`: the coordinator connection, its sessions and the reconnection backoff;
- :mod:`.splice`: TCP <-> stream copying, ends and resets;
- :mod:`.expose` and :mod:`.forward`: the two programs' logic (:class:`Exposer`,
  :class:`Forwarder`); their command lines are in :mod:`conec_trio.cli`;
- :mod:`.console`: the programs' console output.
"""

from .addresses import Mapping, Target, parse_client_id, parse_host_port, parse_mapping
from .expose import Exposer
from .forward import Forwarder
from .link import Backoff, CoordinatorLink, Session
from .splice import SpliceResult, splice

__all__ = [
    "Backoff",
    "CoordinatorLink",
    "Exposer",
    "Forwarder",
    "Mapping",
    "Session",
    "SpliceResult",
    "Target",
    "parse_client_id",
    "parse_host_port",
    "parse_mapping",
    "splice",
]
