"""What ``forward`` says about the paths of its connections, at default verbosity: once per
peer which path and why, and once more only when that changes.

``PathNotes`` reads only public things: each stream's ``.path`` and ``client.statistics()``;
here a stand-in client and stand-in streams play them, under ``MockClock``, so each change
happens exactly when the test makes it. ``test_forward`` and the NAT lab check the lines
with the real programs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from helpers import wait_for

from conec_trio import ChannelStatistics, ClientStatistics, Path
from conec_trio.forward.forward import OUTCOME_PATIENCE, PathNotes
from conec_trio.forward.link import Session

ADDRESS = ("198.51.100.3", 4433)
NO_PATH = "could not reach peer 'exp' directly within 10 s (a symmetric NAT or a firewall ...)"


@dataclass
class FakeClient:
    """What ``PathNotes`` uses of a client: ``statistics()``."""

    channels: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            id="fwd",
            observed_address=None,
            connected=True,
            channels={
                peer: ChannelStatistics(peer, ADDRESS, 0.01, 1200, 0, 0) for peer in self.channels
            },
            direct_failures=dict(self.failures),
        )


@dataclass(eq=False)
class FakeSend:
    """What ``PathNotes`` uses of a stream: ``.path``."""

    path: Path


def said(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The status lines printed since the last call, without their timestamps."""
    return [re.sub(r"^\S+ \S+ ", "", line) for line in capsys.readouterr().out.splitlines()]


async def test_direct_connections_are_said_once(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient(channels={"exp"})
    notes = PathNotes()
    async with trio.open_nursery() as nursery:
        session = Session(1, client, nursery)  # type: ignore[arg-type]
        for _ in range(5):
            send = FakeSend(Path.DIRECT)
            notes.opened(session, "exp", send)  # type: ignore[arg-type]
            notes.closed("exp", send)  # type: ignore[arg-type]
    assert said(capsys) == ["exp: direct via 198.51.100.3:4433"]


async def test_a_known_failure_is_said_with_its_reason_once(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient(failures={"exp": NO_PATH})
    notes = PathNotes()
    async with trio.open_nursery() as nursery:
        session = Session(1, client, nursery)  # type: ignore[arg-type]
        sends = [FakeSend(Path.PROXIED) for _ in range(3)]
        for send in sends:
            notes.opened(session, "exp", send)  # type: ignore[arg-type]
        await trio.sleep(5)
        for send in sends:
            notes.closed("exp", send)  # type: ignore[arg-type]
    assert said(capsys) == [f"exp: relayed through the coordinator: no direct path: {NO_PATH}"]


async def test_an_attempt_under_way_then_its_failure(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient()
    notes = PathNotes()
    async with trio.open_nursery() as nursery:
        session = Session(1, client, nursery)  # type: ignore[arg-type]
        send = FakeSend(Path.PROXIED)
        notes.opened(session, "exp", send)  # type: ignore[arg-type]
        assert said(capsys) == ["exp: relayed through the coordinator while a direct path is tried"]
        # The connection ends before the attempt does: its outcome is still said.
        notes.closed("exp", send)  # type: ignore[arg-type]
        await trio.sleep(9)
        assert said(capsys) == []
        client.failures["exp"] = NO_PATH
        await wait_for(lambda: "no direct path" in capsys.readouterr().out, 1.0)
        # Later connections take the same path: nothing new to say.
        notes.opened(session, "exp", FakeSend(Path.PROXIED))  # type: ignore[arg-type]
        await trio.sleep(1)
        assert said(capsys) == []
        nursery.cancel_scope.cancel()


async def test_relayed_connections_that_move_onto_a_direct_channel_are_said_once(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient(failures={"exp": NO_PATH})
    notes = PathNotes()
    async with trio.open_nursery() as nursery:
        session = Session(1, client, nursery)  # type: ignore[arg-type]
        sends = [FakeSend(Path.PROXIED) for _ in range(3)]
        for send in sends:
            notes.opened(session, "exp", send)  # type: ignore[arg-type]
        assert len(said(capsys)) == 1
        # A background retry opened a channel (the NAT changed): the streams move.
        client.failures.clear()
        client.channels.add("exp")
        for send in sends:
            send.path = Path.DIRECT
        await trio.sleep(1)
        assert said(capsys) == [
            "exp: direct via 198.51.100.3:4433: relayed connections moved onto it"
        ]
        notes.opened(session, "exp", FakeSend(Path.DIRECT))  # type: ignore[arg-type]
        await trio.sleep(1)
        assert said(capsys) == []
    # With no relayed connection left, nothing watches any more.
    assert trio.current_time() < OUTCOME_PATIENCE


async def test_a_channel_that_opens_after_the_connections_ended_is_said(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient()
    notes = PathNotes()
    async with trio.open_nursery() as nursery:
        session = Session(1, client, nursery)  # type: ignore[arg-type]
        send = FakeSend(Path.PROXIED)
        notes.opened(session, "exp", send)  # type: ignore[arg-type]
        notes.closed("exp", send)  # type: ignore[arg-type]
        said(capsys)
        await trio.sleep(2)
        client.channels.add("exp")
        await trio.sleep(1)
        assert said(capsys) == ["exp: direct via 198.51.100.3:4433"]
