"""Every error the library raises on purpose is a :class:`ConecError`.

Each subclass names one thing a user can act on; messages say which peer, which name or
which certificate check was involved.
"""

from __future__ import annotations


class ConecError(Exception):
    """Base class of every error conec_trio raises on purpose."""


class ConfigError(ConecError):
    """A setting of a :class:`~conec_trio.ClientConfig` or :class:`~conec_trio.CoordConfig` is
    wrong: a file that cannot be read, a certificate or key that does not parse, or a private
    key that does not match its certificate. Raised when the config is built.

    ``setting`` is the field's name (``"ca"``, ``"private_key"``, ...) and ``problem`` what is
    wrong with it; the message is both.
    """

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class ConnectError(ConecError):
    """The coordinator (or a peer) could not be reached or the handshake did not finish."""


class CertificateError(ConecError):
    """A certificate check failed: wrong CA, name mismatch, expired, or not the pinned cert."""


class InvalidIdError(ConecError):
    """A client id that a certificate DNS name cannot carry (letters, digits, '-' and '.')."""


class IdInUseError(ConecError):
    """Another client with this id is already connected to the coordinator."""


class VersionMismatchError(ConecError):
    """Client and coordinator speak different protocol versions."""


class RefusedError(ConecError):
    """The other side refused a request (a limit was reached, or policy said no)."""


class PeerNotFoundError(ConecError):
    """The named peer is not connected to the coordinator."""


class StreamIdInUseError(ConecError):
    """``new_stream_with_id`` was given an id this client already uses."""


class MessageTooLargeError(ConecError):
    """A message is larger than the configured maximum; none of it was sent."""


class ProtocolError(ConecError):
    """The other side sent something that breaks the conec protocol (bad frame, bad CBOR)."""


class BadCborError(ProtocolError):
    """A peer sent CBOR that is malformed or breaks a decoding limit (size, nesting, length,
    a tag that is not allowed, a map key that is not a number or string)."""


class DisconnectedError(ConecError):
    """The connection to the coordinator is gone; this client can no longer do anything."""


class ChannelError(ConecError):
    """A direct channel could not be opened, found or used."""


class BroadcastNotFoundError(ConecError):
    """No broadcast channel of that name exists right now."""


class Lagged(ConecError):
    """A non-blocking receiver dropped ``count`` messages since its last report."""

    def __init__(self, count: int) -> None:
        super().__init__(f"receiver lagged behind: {count} message(s) dropped")
        self.count = count
