"""The restart notes a coordinator keeps of its clients are read back as untrusted input."""

from __future__ import annotations

from pathlib import Path

from conec_trio._restart_notes import (
    MAX_NOTES,
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
