"""Where the clients are: a coordinator writes down each client's address and the connection
id it last used, so that after a crash its successor (with the same private key, hence the
same stateless reset tokens) tells every one of them at once that its session is gone,
instead of each finding out at its next keepalive, up to half an idle timeout later.

The file is the coordinator's own (``CoordConfig.restart_notes``); still, what it reads back
is checked and bounded like anything else: a line that does not parse is skipped, and at
most ``MAX_NOTES`` resets go out. A reset is 43 bytes to an address that talked to this
coordinator's key: it makes nobody else send anything.

The resets go out in a window, not all at once: every client told reconnects within moments,
and a thousand handshakes at once would only queue up (and, from one address, hit the
per-address cap on pending connections). At most ``ANNOUNCE_WINDOW`` told clients are on
their way back at a time; one counts as back when its id is connected again, or after
``ANNOUNCE_EXPIRY`` (a client that is gone for good never comes back).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from ._config import check_client_id
from ._exceptions import InvalidIdError
from ._quic import QuicEndpoint

log = logging.getLogger("conec_trio.coordinator")

# How often the notes are brought up to date (only written when they changed): a client
# that connected less than this before a crash is not in them, and learns at its keepalive.
NOTE_INTERVAL = 2.0
MAX_NOTES = 100_000
MAX_FILE_SIZE = 8 * 1024 * 1024
ANNOUNCE_WINDOW = 128
ANNOUNCE_EXPIRY = 1.0
ANNOUNCE_PAUSE = 0.02

Note = tuple[str, int, bytes, str]  # host, port, connection id, client id


def format_notes(notes: Iterable[Note]) -> str:
    return "".join(f"{host} {port} {cid.hex()} {id_}\n" for host, port, cid, id_ in notes)


def parse_notes(text: str) -> list[Note]:
    """The well-formed lines of a notes file (at most ``MAX_NOTES``)."""
    notes: list[Note] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        host, port_text, cid_text, id_text = parts
        try:
            ipaddress.ip_address(host)
            port = int(port_text)
            cid = bytes.fromhex(cid_text)
            client_id = check_client_id(id_text)
        except (ValueError, InvalidIdError):
            continue
        if not 0 < port < 65536 or not 4 <= len(cid) <= 20:
            continue
        notes.append((host, port, cid, client_id))
        if len(notes) >= MAX_NOTES:
            break
    return notes


def read_notes(path: Path) -> list[Note]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(MAX_FILE_SIZE)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read the restart notes %s: %s", path, exc)
        return []
    return parse_notes(text)


def write_notes(path: Path, text: str) -> None:
    """Replace the file in one step (a crash mid-write leaves the previous notes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, path)


async def keep_notes(
    path: Path,
    endpoint: QuicEndpoint,
    snapshot: Callable[[], list[Note]],
    is_connected: Callable[[str], bool],
) -> None:
    """Tell the clients a predecessor noted that their sessions are gone, then keep the
    notes up to date every ``NOTE_INTERVAL`` while the coordinator runs."""
    notes = await trio.to_thread.run_sync(read_notes, path)
    async with trio.open_nursery() as nursery:
        if notes:
            nursery.start_soon(_announce_restart, notes, endpoint, is_connected)
        written: str | None = None
        while True:
            text = format_notes(snapshot())
            if text != written:
                try:
                    await trio.to_thread.run_sync(write_notes, path, text)
                    written = text
                except OSError as exc:
                    log.warning("cannot write the restart notes %s: %s", path, exc)
            await trio.sleep(NOTE_INTERVAL)


async def _announce_restart(
    notes: list[Note], endpoint: QuicEndpoint, is_connected: Callable[[str], bool]
) -> None:
    log.info("telling %d client(s) of the previous run that their sessions ended", len(notes))
    waiting = deque(notes)
    on_their_way: dict[str, float] = {}  # client id -> when it was told
    while waiting:
        now = trio.current_time()
        for client_id, told in list(on_their_way.items()):
            if is_connected(client_id) or now - told > ANNOUNCE_EXPIRY:
                del on_their_way[client_id]
        while waiting and len(on_their_way) < ANNOUNCE_WINDOW:
            host, port, cid, client_id = waiting.popleft()
            endpoint.announce_reset(cid, (host, port))
            on_their_way[client_id] = now
        await trio.sleep(ANNOUNCE_PAUSE)
