"""The restart notes a coordinator keeps of its clients are read back as untrusted input."""

from __future__ import annotations

from pathlib import Path

import trio

from conec_trio._restart_notes import (
    ANNOUNCE_EXPIRY,
    ANNOUNCE_PAUSE,
    ANNOUNCE_WINDOW,
    MAX_NOTES,
    _announce_restart,
    format_notes,
    parse_notes,
    read_notes,
    write_notes,
)


def test_notes_round_trip_through_the_file(tmp_path: Path) -> None:
    notes = [
        ("127.0.0.1", 4433, bytes(range(8)), "alice"),
        ("::1", 65535, b"\xff" * 8, "bob.example"),
    ]
    path = tmp_path / "state" / "clients"
    write_notes(path, format_notes(notes))
    assert read_notes(path) == notes
    assert read_notes(tmp_path / "missing") == []


def test_malformed_lines_are_skipped() -> None:
    text = "\n".join(
        [
            "127.0.0.1 4433 0001020304050607 Alice",  # good
            "example.com 4433 0001020304050607 a",  # not an address: never resolved
            "127.0.0.1 0 0001020304050607 a",  # no such port
            "127.0.0.1 70000 0001020304050607 a",
            "127.0.0.1 4433 00 a",  # connection id too short
            "127.0.0.1 4433 " + "00" * 21 + " a",  # too long
            "127.0.0.1 4433 zz a",
            "127.0.0.1 4433 0001020304050607 -bad-",  # not a client id
            "127.0.0.1 4433 0001020304050607",
            "\x00\xff garbage",
            "",
        ]
    )
    assert parse_notes(text) == [("127.0.0.1", 4433, bytes(range(8)), "alice")]


def test_at_most_max_notes_are_read() -> None:
    text = "10.0.0.1 1000 0001020304050607 a\n" * (MAX_NOTES + 10)
    assert len(parse_notes(text)) == MAX_NOTES


async def test_a_restart_tells_a_window_of_clients_at_a_time(autojump_clock: object) -> None:
    """The successor tells at most ANNOUNCE_WINDOW clients at once; the next ones as those
    come back, or once they are overdue (a client gone for good never comes back)."""
    count = 2 * ANNOUNCE_WINDOW + 30
    notes = [("10.0.0.1", 1000 + i, bytes([i % 256]) * 8, f"c{i}") for i in range(count)]
    told: list[tuple[bytes, tuple[str, int]]] = []
    back: set[str] = set()

    class Endpoint:
        def announce_reset(self, cid: bytes, addr: tuple[str, int]) -> None:
            told.append((cid, addr))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_announce_restart, notes, Endpoint(), back.__contains__)
        await trio.sleep(ANNOUNCE_PAUSE / 2)
        assert len(told) == ANNOUNCE_WINDOW
        # Ten of them come back: ten more are told, no more.
        back.update(f"c{i}" for i in range(10))
        await trio.sleep(ANNOUNCE_PAUSE)
        assert len(told) == ANNOUNCE_WINDOW + 10
        # Nobody else comes back: the rest follow as the others are overdue.
        await trio.sleep(ANNOUNCE_EXPIRY + ANNOUNCE_PAUSE)
        assert len(told) == 2 * ANNOUNCE_WINDOW + 10
    assert len(told) == len(notes)
    assert told[0] == (b"\x00" * 8, ("10.0.0.1", 1000))
