"""What users type: ``HOST:PORT`` targets, ``LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT``
mappings and client ids. Each parser raises ``ValueError`` saying what is wrong."""

from __future__ import annotations

from dataclasses import dataclass

from .. import CoordConfig, InvalidIdError
from .._config import check_client_id
from .console import format_address

__all__ = [
    "Mapping",
    "Target",
    "check_local_ports",
    "parse_client_id",
    "parse_coord",
    "parse_host_port",
    "parse_mapping",
]


@dataclass(frozen=True)
class Target:
    """A TCP address, ``host:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)

    @property
    def key(self) -> tuple[str, int]:
        """What ``--allow`` compares: the host name (any case) and the port, exactly."""
        return (self.host.lower(), self.port)


@dataclass(frozen=True)
class Mapping:
    """``LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT``: what one ``forward`` listener does."""

    local_port: int
    peer: str
    target: Target

    def __str__(self) -> str:
        return f"{self.local_port}:{self.peer}:{self.target}"


def _parse_port(text: str, whole: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not text.isdigit() or not low <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: the port must be a number from {low} to 65535")
    return int(text)


def parse_client_id(text: str) -> str:
    """``text`` if it is a valid client id (the library's rule: a certificate DNS name)."""
    try:
        return check_client_id(text)
    except InvalidIdError as exc:
        raise ValueError(str(exc)) from None


def parse_host_port(text: str) -> Target:
    """``HOST:PORT`` (an IPv6 address in brackets, ``[::1]:8080``) as a :class:`Target`."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [{host}]:{port_text}")
    if not host:
        raise ValueError(f"{text!r} has no host")
    return Target(host, _parse_port(port_text, text))


def parse_coord(text: str) -> Target:
    """``HOST[:PORT]`` of a coordinator: without a port, the coordinator's default (1719)."""
    if text.startswith("[") and text.endswith("]") and len(text) > 2:  # [::1]
        return Target(text[1:-1], CoordConfig.port)
    if text and ":" not in text:
        return Target(text, CoordConfig.port)
    return parse_host_port(text)


def check_local_ports(mappings: list[Mapping]) -> None:
    """``ValueError`` if two mappings listen on the same local port (0 excepted: each picks
    a free one)."""
    seen: dict[int, Mapping] = {}
    for mapping in mappings:
        if mapping.local_port == 0:
            continue
        if mapping.local_port in seen:
            raise ValueError(
                f"port {mapping.local_port} given twice ({seen[mapping.local_port]} and "
                f"{mapping}): each mapping needs its own local port"
            )
        seen[mapping.local_port] = mapping


def parse_mapping(text: str) -> Mapping:
    """``LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT`` as a :class:`Mapping` (LOCAL_PORT 0: any
    free port)."""
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not LOCAL_PORT:PEER:TARGET_HOST:TARGET_PORT")
    local_text, peer, rest = parts
    local_port = _parse_port(local_text, text, allow_zero=True)
    try:
        parse_client_id(peer)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    try:
        target = parse_host_port(rest)
    except ValueError as exc:
        raise ValueError(f"{text!r}: the target {exc}") from None
    return Mapping(local_port, peer, target)
