"""The pytest plugin of conec_trio.testing, used as a user would: test files of their own in a
fresh directory, with no conftest.py and no options (installing conec-trio loads it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import pytest
import trio

import conec_trio

clients_made = []


@pytest.fixture
async def conec_coordinator(conec_coordinator):
    # Wraps the plugin's fixture: everything that uses it, conec_client included, is torn
    # down before the code after the yield runs.
    yield conec_coordinator
    assert clients_made, "the tests made no client"
    # Closed, not abandoned: an abandoned client would count until its 10 s idle timeout.
    with trio.fail_after(5):
        while conec_coordinator.num_clients:
            await trio.sleep(0.01)
    clients_made.clear()


@pytest.mark.trio
async def test_clients_talk_through_the_coordinator(conec_coordinator, conec_client):
    host, port = conec_coordinator.address[:2]
    assert host == "127.0.0.1" and port != 0
    alice = await conec_client("alice")
    bob = await conec_client("bob", listen=False)
    clients_made.extend([alice, bob])
    assert conec_coordinator.client_ids() == ["alice", "bob"]
    with trio.fail_after(5):
        send, recv = await alice.new_proxied_stream("bob")
        await send.send(b"hello")
        incoming = await bob.incoming_streams.receive()
        assert (incoming.peer, await incoming.recv.receive()) == ("alice", b"hello")
        await incoming.send.send(b"hi")
        assert await recv.receive() == b"hi"


@pytest.mark.trio
async def test_a_refused_client_raises_from_the_factory(conec_coordinator, conec_client):
    clients_made.append(await conec_client("alice"))
    with pytest.raises(conec_trio.IdInUseError):
        await conec_client("alice")
    with pytest.raises(conec_trio.InvalidIdError):
        await conec_client("not an id")
    assert conec_coordinator.client_ids() == ["alice"]


@pytest.mark.trio
async def test_every_test_gets_a_coordinator_of_its_own(conec_coordinator, conec_client):
    assert conec_coordinator.num_clients == 0
    clients_made.append(await conec_client("alice"))
"""

OVERRIDDEN_CONFIG = """
import dataclasses

import pytest

import conec_trio


@pytest.fixture
def conec_coordinator_config(conec_coordinator_config):
    return dataclasses.replace(conec_coordinator_config, max_clients=1)


@pytest.mark.trio
async def test_the_coordinator_runs_with_the_overridden_config(conec_client):
    await conec_client("alice")
    with pytest.raises(conec_trio.RefusedError, match="maximum of 1"):
        await conec_client("bob")
"""


def test_the_fixtures_in_a_users_test_files(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS, test_config=OVERRIDDEN_CONFIG)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_a_failing_test_still_closes_its_clients(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user=USER_TESTS.split("@pytest.mark.trio")[0]
        + """
@pytest.mark.trio
async def test_fails(conec_client):
    clients_made.append(await conec_client("alice"))
    raise KeyError("the user's own failure")
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)  # and no teardown error: the client was closed
    result.stdout.fnmatch_lines(["*KeyError*the user's own failure*"])


def test_importing_conec_trio_needs_no_pytest() -> None:
    code = (
        "import sys, conec_trio, conec_trio.testing\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
