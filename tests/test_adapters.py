"""Adapters over plain Trio memory channels: they must not need the network to be right."""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import math
import random
import time
import uuid
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conec_trio._exceptions import BadCborError, ConecError, Lagged, ProtocolError
from conec_trio._types import BroadcastMessage
from conec_trio.adapters import (
    CborReceiveChannel,
    CborSendChannel,
    open_nonblocking,
    untagged,
)

DEADLINE = 10  # seconds; every wait in these tests is bounded by it


class ScriptedReceiveChannel(trio.abc.ReceiveChannel[Any]):
    """A receive channel fed by a memory channel; exceptions fed to it are raised in turn."""

    def __init__(self) -> None:
        self.feed, self._inner = trio.open_memory_channel[Any](math.inf)
        self.closed = False

    async def receive(self) -> Any:
        item = await self._inner.receive()
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        self.closed = True
        await self._inner.aclose()


async def drained() -> None:
    """Wait until every background task has taken in everything available to it."""
    await trio.testing.wait_all_tasks_blocked()


async def expect_lagged(recv: trio.abc.ReceiveChannel[Any], count: int) -> None:
    with pytest.raises(Lagged) as info:
        await recv.receive()
    assert info.value.count == count
    assert isinstance(info.value, ConecError)


async def receive_n(recv: trio.abc.ReceiveChannel[Any], n: int) -> list[Any]:
    return [await recv.receive() for _ in range(n)]


# --- open_nonblocking ---------------------------------------------------------------------------


@pytest.mark.trio
async def test_nonblocking_lag_rounds() -> None:
    send, recv = trio.open_memory_channel[int](0)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 3) as nb:
            for i in range(10):  # with a zero-size source buffer, each send waits for the drain
                await send.send(i)
            await drained()
            await expect_lagged(nb, 7)
            assert await receive_n(nb, 2) == [7, 8]  # 9 stays buffered

            for i in range(10, 15):  # 9..14 arrive into 3 slots: 3 more dropped
                await send.send(i)
            await drained()
            await expect_lagged(nb, 3)
            assert await receive_n(nb, 3) == [12, 13, 14]

            for i in range(15, 17):  # fits: no lag this time
                await send.send(i)
            await drained()
            assert await receive_n(nb, 2) == [15, 16]

            await send.aclose()
            for _ in range(2):  # EndOfChannel again and again, like trio's own channels
                with pytest.raises(trio.EndOfChannel):
                    await nb.receive()


@pytest.mark.trio
async def test_nonblocking_lag_reported_before_end() -> None:
    send, recv = trio.open_memory_channel[int](math.inf)
    for i in range(20):
        send.send_nowait(i)
    await send.aclose()
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 5) as nb:
            await drained()
            await expect_lagged(nb, 15)
            assert [item async for item in nb] == [15, 16, 17, 18, 19]


@pytest.mark.trio
async def test_nonblocking_end_waits_for_buffer() -> None:
    send, recv = trio.open_memory_channel[str](0)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 4) as nb:
            await send.send("a")
            await send.send("b")
            await send.aclose()
            await drained()
            assert await nb.receive() == "a"
            assert await nb.receive() == "b"
            with pytest.raises(trio.EndOfChannel):
                await nb.receive()


@pytest.mark.trio
async def test_nonblocking_reader_waits_for_items() -> None:
    send, recv = trio.open_memory_channel[int](0)
    got: list[int] = []
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 2) as nb:

            async def reader() -> None:
                async for item in nb:
                    got.append(item)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await drained()  # the reader is parked on an empty buffer
                for i in range(5):
                    await send.send(i)
                    await drained()  # ...and takes each item before the next arrives
                await send.aclose()
    assert got == [0, 1, 2, 3, 4]


@pytest.mark.trio
async def test_nonblocking_capacity_one() -> None:
    send, recv = trio.open_memory_channel[int](0)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 1) as nb:
            for i in range(5):
                await send.send(i)
            await drained()
            await expect_lagged(nb, 4)
            assert await nb.receive() == 4
            await send.send(5)
            await drained()
            assert await nb.receive() == 5
            await send.send(6)
            await send.send(7)
            await send.aclose()
            await drained()
            await expect_lagged(nb, 1)
            assert await nb.receive() == 7
            with pytest.raises(trio.EndOfChannel):
                await nb.receive()


@pytest.mark.parametrize("capacity", [0, -1])
def test_nonblocking_capacity_too_small(capacity: int) -> None:
    _, recv = trio.open_memory_channel[int](0)
    with pytest.raises(ValueError, match="at least 1"):
        open_nonblocking(recv, capacity)


@pytest.mark.parametrize("capacity", [1.5, True, "3"])
def test_nonblocking_capacity_not_int(capacity: Any) -> None:
    _, recv = trio.open_memory_channel[int](0)
    with pytest.raises(TypeError):
        open_nonblocking(recv, capacity)


@pytest.mark.trio
async def test_nonblocking_never_holds_back_the_sender() -> None:
    capacity = 10
    send, recv = trio.open_memory_channel[int](0)
    async with open_nonblocking(recv, capacity) as nb:
        with trio.fail_after(DEADLINE):  # would time out if the reader held the sender back
            async with send:
                for i in range(1000):
                    await send.send(i)
            await drained()
            await expect_lagged(nb, 1000 - capacity)
            assert [item async for item in nb] == list(range(1000 - capacity, 1000))


@pytest.mark.trio
async def test_nonblocking_broken_source_delivers_buffer_first() -> None:
    source = ScriptedReceiveChannel()
    cause = trio.BrokenResourceError("peer reset the stream")
    for entry in (1, 2, cause):
        source.feed.send_nowait(entry)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(source, 5) as nb:
            await drained()
            assert await nb.receive() == 1
            assert await nb.receive() == 2
            for _ in range(2):
                with pytest.raises(trio.BrokenResourceError) as info:
                    await nb.receive()
                assert info.value.__cause__ is cause
    assert source.closed


@pytest.mark.trio
async def test_nonblocking_broken_source_after_drops() -> None:
    source = ScriptedReceiveChannel()
    for entry in (*range(6), trio.BrokenResourceError("gone")):
        source.feed.send_nowait(entry)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(source, 2) as nb:
            await drained()
            await expect_lagged(nb, 4)
            assert await receive_n(nb, 2) == [4, 5]
            with pytest.raises(trio.BrokenResourceError):
                await nb.receive()


@pytest.mark.trio
async def test_nonblocking_source_failing_unexpectedly_reads_as_broken() -> None:
    source = ScriptedReceiveChannel()
    cause = RuntimeError("a bug in the source")
    source.feed.send_nowait("x")
    source.feed.send_nowait(cause)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(source, 5) as nb:
            await drained()
            assert await nb.receive() == "x"
            with pytest.raises(trio.BrokenResourceError) as info:
                await nb.receive()
            assert info.value.__cause__ is cause


@pytest.mark.trio
async def test_nonblocking_folds_lag_of_its_source() -> None:
    source = ScriptedReceiveChannel()
    # a, b, c into 2 slots drops a; the source's own Lagged(4) adds 4; d then drops b.
    for entry in ("a", "b", "c", Lagged(4), "d"):
        source.feed.send_nowait(entry)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(source, 2) as nb:
            await drained()
            await expect_lagged(nb, 6)
            assert await receive_n(nb, 2) == ["c", "d"]


async def read_all(recv: trio.abc.ReceiveChannel[Any]) -> tuple[list[Any], int]:
    """Read to the end; returns (items read, total of the Lagged counts seen)."""
    got: list[Any] = []
    lagged = 0
    while True:
        try:
            got.append(await recv.receive())
        except Lagged as exc:
            lagged += exc.count
        except trio.EndOfChannel:
            return got, lagged


@pytest.mark.trio
async def test_nonblocking_stacked_on_nonblocking() -> None:
    send, recv = trio.open_memory_channel[int](0)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 2) as inner, open_nonblocking(inner, 5) as outer:
            for i in range(10):
                await send.send(i)
            await send.aclose()
            await drained()
            # Which adapter dropped what depends on scheduling; the totals do not.
            got, lagged = await read_all(outer)
    assert len(got) + lagged == 10
    assert len(got) <= 5
    assert got == sorted(set(got))
    assert got[-1] == 9


@pytest.mark.trio
async def test_nonblocking_keeps_per_message_errors_in_order() -> None:
    send, raw = trio.open_memory_channel[bytes](math.inf)
    for data in (cbor2.dumps(1), b"\xff", cbor2.dumps(2)):
        send.send_nowait(data)
    await send.aclose()
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(CborReceiveChannel(raw), 5) as nb:
            await drained()
            assert await nb.receive() == 1
            with pytest.raises(ProtocolError):
                await nb.receive()
            assert await nb.receive() == 2
            with pytest.raises(trio.EndOfChannel):
                await nb.receive()


@pytest.mark.trio
async def test_nonblocking_aclose() -> None:
    send, recv = trio.open_memory_channel[int](0)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 3) as nb:
            await send.send(1)
            await drained()
            await nb.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await nb.receive()
            with pytest.raises(trio.BrokenResourceError):  # the source was closed too
                await send.send(2)
            await nb.aclose()  # idempotent


@pytest.mark.trio
async def test_nonblocking_aclose_wakes_a_waiting_reader() -> None:
    _send, recv = trio.open_memory_channel[int](0)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 3) as nb:

            async def reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await nb.receive()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await drained()
                await nb.aclose()


@pytest.mark.trio
async def test_nonblocking_leaving_the_block_closes_everything() -> None:
    source = ScriptedReceiveChannel()
    source.feed.send_nowait("left unread")
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(source, 3) as nb:
            await drained()
    assert source.closed
    with pytest.raises(trio.ClosedResourceError):
        await nb.receive()


@pytest.mark.trio
async def test_nonblocking_body_errors_are_not_wrapped_in_groups() -> None:
    _send, recv = trio.open_memory_channel[int](0)

    async def body_fails() -> None:
        async with open_nonblocking(recv, 3):
            try:
                raise ValueError("cause")
            except ValueError as exc:
                raise KeyError("body") from exc

    with pytest.raises(KeyError) as info, trio.fail_after(DEADLINE):
        await body_fails()
    assert isinstance(info.value.__cause__, ValueError)  # chaining survives, nothing added


@pytest.mark.trio
async def test_nonblocking_cancelled_while_waiting() -> None:
    _send, recv = trio.open_memory_channel[int](0)
    with trio.fail_after(DEADLINE):
        with trio.CancelScope() as scope:
            async with open_nonblocking(recv, 3) as nb:

                async def cancel_when_parked() -> None:
                    await drained()
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_parked)
                    await nb.receive()
        assert scope.cancelled_caught


@pytest.mark.trio
async def test_nonblocking_receive_is_a_checkpoint() -> None:
    send, recv = trio.open_memory_channel[int](math.inf)
    send.send_nowait(1)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 3) as nb:
            await drained()
            with trio.CancelScope() as scope:
                scope.cancel()
                await nb.receive()  # cancelled before taking anything
            assert scope.cancelled_caught
            assert await nb.receive() == 1  # so the item is still there


async def _race(seed: int, total: int, capacity: int) -> tuple[list[Any], int]:
    """A producer and a reader interleaved at random; returns (items read, sum of lags)."""
    rng = random.Random(seed)
    send, recv = trio.open_memory_channel[int](rng.choice([0, 1, math.inf]))
    async with open_nonblocking(recv, capacity) as nb:

        async def producer() -> None:
            async with send:
                for i in range(total):
                    await send.send(i)
                    if rng.random() < 0.3:
                        await trio.lowlevel.checkpoint()

        async def slow_reader() -> tuple[list[Any], int]:
            got: list[Any] = []
            lagged = 0
            while True:
                try:
                    got.append(await nb.receive())
                except Lagged as exc:
                    lagged += exc.count
                except trio.EndOfChannel:
                    return got, lagged
                for _ in range(rng.randrange(3)):
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            got, lagged = await slow_reader()
    return got, lagged


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    total=st.integers(0, 200),
    capacity=st.integers(1, 20),
)
def test_nonblocking_concurrent_reader_loses_and_duplicates_nothing(
    seed: int, total: int, capacity: int
) -> None:
    got, lagged = trio.run(_race, seed, total, capacity)
    assert got == sorted(set(got))  # in order, no duplicates
    assert len(got) + lagged == total  # every message either read or counted as dropped
    if total:
        assert got[-1] == total - 1  # the newest message is never dropped


# --- untagged -----------------------------------------------------------------------------------


@pytest.mark.trio
async def test_untagged_plain_receiver() -> None:
    send, recv = trio.open_memory_channel[BroadcastMessage[bytes]](math.inf)
    send.send_nowait(BroadcastMessage("alice", b"one"))
    send.send_nowait(BroadcastMessage("bob", b"two"))
    await send.aclose()
    plain = untagged(recv)
    assert isinstance(plain, trio.abc.ReceiveChannel)
    with trio.fail_after(DEADLINE):
        assert [data async for data in plain] == [b"one", b"two"]


@pytest.mark.trio
async def test_untagged_aclose_closes_underlying() -> None:
    send, recv = trio.open_memory_channel[BroadcastMessage[bytes]](math.inf)
    plain = untagged(recv)
    await plain.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await plain.receive()
    with pytest.raises(trio.BrokenResourceError):
        await send.send(BroadcastMessage("alice", b"late"))


@pytest.mark.trio
async def test_untagged_rejects_untagged_items() -> None:
    send, recv = trio.open_memory_channel[Any](math.inf)
    send.send_nowait(b"no sender")
    with pytest.raises(TypeError, match="BroadcastMessage"):
        await untagged(recv).receive()


@pytest.mark.trio
async def test_untagged_on_nonblocking_broadcast_receiver() -> None:
    send, recv = trio.open_memory_channel[BroadcastMessage[bytes]](0)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(recv, 2) as nb:
            plain = untagged(nb)
            for i in range(5):
                await send.send(BroadcastMessage(f"peer{i}", bytes([i])))
            await send.aclose()
            await drained()
            await expect_lagged(plain, 3)  # Lagged passes through unchanged
            assert [data async for data in plain] == [b"\x03", b"\x04"]


# --- CBOR ---------------------------------------------------------------------------------------

NESTED = {
    "text": "héllo",
    "bytes": b"\x00\xff",
    "ints": [0, -1, 2**64, -(2**70)],
    "float": 1.5,
    "flags": [True, False, None],
    "nested": {"list": [[], [{}], [[1, [2, [3]]]]], 7: "int key"},
    "when": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
}

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=5)
        # Ints as keys only where CBOR has them without a tag: a big int (a bignum) as a key
        # is refused, since such keys can be chosen to collide in hash.
        | st.dictionaries(st.text() | st.integers(-(2**64), 2**64 - 1), inner, max_size=5)
    ),
    max_leaves=30,
)


def cbor_pair() -> tuple[CborSendChannel, CborReceiveChannel]:
    send, recv = trio.open_memory_channel[bytes](math.inf)
    return CborSendChannel(send), CborReceiveChannel(recv)


@pytest.mark.trio
async def test_cbor_round_trip_nested() -> None:
    send, recv = cbor_pair()
    assert isinstance(send, trio.abc.SendChannel)
    assert isinstance(recv, trio.abc.ReceiveChannel)
    with trio.fail_after(DEADLINE):
        values: list[Any] = [NESTED, [], "", b"", 0, None, (1, (2, 3))]
        for value in values:
            await send.send(value)
        await send.aclose()
        got = [value async for value in recv]
    assert got == [NESTED, [], "", b"", 0, None, [1, [2, 3]]]  # tuples come back as lists


@settings(max_examples=100, deadline=None)
@given(value=cbor_values)
def test_cbor_round_trip_generated(value: Any) -> None:
    async def main() -> Any:
        send, recv = cbor_pair()
        await send.send(value)
        return await recv.receive()

    assert trio.run(main) == value


@pytest.mark.trio
async def test_cbor_nesting_limit() -> None:
    def nest(depth: int) -> Any:
        value: Any = 0
        for _ in range(depth):
            value = [value]
        return value

    send, recv = cbor_pair()
    with trio.fail_after(DEADLINE):
        await send.send(nest(400))  # as deep as a receiver accepts
        assert await recv.receive() == nest(400)
        for depth in (401, 100_000):  # the second would overflow the C stack in cbor2
            with pytest.raises(ProtocolError, match="levels deep"):
                await send.send(nest(depth))
        await send.send("still usable")
        assert await recv.receive() == "still usable"


@pytest.mark.trio
async def test_cbor_unencodable_value() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    send, recv = cbor_pair()
    with trio.fail_after(DEADLINE):
        for value, name in ((object(), "object"), ({"f": len}, "dict"), (cyclic, "list")):
            with pytest.raises(ProtocolError, match=f"cannot encode {name} as CBOR"):
                await send.send(value)
        await send.send({"ok": True})  # nothing half-sent; the channel still works
        assert await recv.receive() == {"ok": True}


BAD_CBOR = [
    b"",  # nothing at all
    b"\xff",  # a break code where a value belongs
    b"\x1f",  # indefinite-length integer
    b"\x83\x01\x02",  # array of 3 with 2 items
    b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # byte string claiming 2**64-1 bytes
    b"\x62\xff\xfe",  # text string that is not UTF-8
    b"\x9f" * 100_000,  # nesting far deeper than any receiver allows
    b"\xc1\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # datetime at +infinity
    b"\xd8\x1e\x82\x01\x00",  # rational with a zero denominator
    b"\x01\x02",  # a valid value followed by trailing bytes
]


@pytest.mark.trio
@pytest.mark.parametrize("bad", BAD_CBOR, ids=lambda data: data[:12].hex() or "empty")
async def test_cbor_bad_message_then_good(bad: bytes) -> None:
    send, raw = trio.open_memory_channel[bytes](math.inf)
    recv = CborReceiveChannel(raw)
    send.send_nowait(bad)
    send.send_nowait(cbor2.dumps({"next": "message"}))
    with trio.fail_after(DEADLINE):
        with pytest.raises(ProtocolError):
            await recv.receive()
        assert await recv.receive() == {"next": "message"}


def colliding_bignum_keys(count: int) -> bytes:
    """A CBOR map whose keys are big ints (tag 2) that all have one Python hash, so building
    the dict compares every key with every earlier one."""
    p = 2**61 - 1  # hash(n) == n % p for a non-negative int
    keys = [(2**64 + i) * p for i in range(count)]
    assert len({hash(key) for key in keys}) == 1
    return b"\xb9" + count.to_bytes(2, "big") + b"".join(cbor2.dumps(k) + b"\x00" for k in keys)


async def refused_then_next(data: bytes, match: str, **options: Any) -> float:
    """Feed ``data`` then a good message to a CborReceiveChannel: the first is refused with
    BadCborError, the next one still arrives. How long the refusal took."""
    send, raw = trio.open_memory_channel[bytes](math.inf)
    recv = CborReceiveChannel(raw, **options)
    send.send_nowait(data)
    send.send_nowait(cbor2.dumps("next"))
    with trio.fail_after(DEADLINE):
        start = time.perf_counter()
        with pytest.raises(BadCborError, match=match):
            await recv.receive()
        took = time.perf_counter() - start
        assert await recv.receive() == "next"
    return took


@pytest.mark.trio
async def test_row03_map_of_colliding_bignum_keys_is_refused_before_it_is_built() -> None:
    # 56 KiB here; 506 KiB of such keys held the Trio thread for 7 s.
    data = colliding_bignum_keys(3000)
    took = await refused_then_next(data, "map key .* not a tagged value")
    assert took < 0.05  # refused on its first key, not after building the dict


@pytest.mark.trio
async def test_row03_array_as_map_key_is_refused() -> None:
    # [a, b] becomes a tuple key, and tuple hashes of chosen ints can be made to collide.
    await refused_then_next(b"\xa1\x82\x01\x02\x00", "map key .* not an array")


@pytest.mark.trio
async def test_row03_shared_reference_is_refused() -> None:
    # 28([1, 29(0)]): a list that contains itself, which cbor2 builds by default.
    await refused_then_next(b"\xd8\x1c\x82\x01\xd8\x1d\x00", "tag 28 is not allowed")


@pytest.mark.trio
@pytest.mark.parametrize(
    "value",
    [
        cbor2.CBORTag(4, [-2, 5]),  # decimal: arithmetic on an exponent of any size
        cbor2.CBORTag(30, [2**64, 3]),  # rational: a gcd of big ints
        cbor2.CBORTag(35, "(a+)+$"),  # a regex, compiled from the peer's pattern
        cbor2.CBORTag(99999, 0),  # a tag cbor2 does not know
    ],
    ids=repr,
)
async def test_row03_tags_not_allow_listed_are_refused(value: Any) -> None:
    await refused_then_next(cbor2.dumps(value), r"tag \d+ is not allowed")


@pytest.mark.trio
async def test_row03_items_are_bounded() -> None:
    value = [[{}] * 500] * 2  # empty maps: the most memory per byte of CBOR; 1003 items
    await refused_then_next(cbor2.dumps(value), "more than 1000 data items", max_items=1000)
    await refused_then_next(cbor2.dumps([0] * 1001), "array of 1001 items", max_items=1000)
    send, raw = trio.open_memory_channel[bytes](math.inf)
    send.send_nowait(cbor2.dumps(value))
    with trio.fail_after(DEADLINE):
        assert await CborReceiveChannel(raw).receive() == value  # the default: 1_000_000


def test_cbor_max_items_must_be_a_positive_int() -> None:
    _, raw = trio.open_memory_channel[bytes](0)
    with pytest.raises(ValueError, match="at least 1"):
        CborReceiveChannel(raw, max_items=0)
    with pytest.raises(TypeError, match="int"):
        CborReceiveChannel(raw, max_items=1.5)  # type: ignore[arg-type]


@pytest.mark.trio
async def test_cbor_allow_listed_tags_round_trip() -> None:
    send, recv = cbor_pair()
    values = [
        2**100,
        -(2**100),
        datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
        datetime.date(2024, 5, 6),
        {1, 2, "three"},
        uuid.UUID(int=5),
        ipaddress.ip_network("192.0.2.0/24"),
    ]
    with trio.fail_after(DEADLINE):
        for value in values:
            await send.send(value)
            assert await recv.receive() == value


@pytest.mark.trio
async def test_cbor_sender_refuses_what_receivers_refuse() -> None:
    send, recv = cbor_pair()
    with trio.fail_after(DEADLINE):
        for value, why in [
            (decimal.Decimal("1.5"), "tag 4 is not allowed"),
            ({(1, 2): "tuple key"}, "not an array"),
            ({2**70: "bignum key"}, "not a tagged value"),
            ({frozenset({1}): "set key"}, "not a tagged value"),
        ]:
            with pytest.raises(ProtocolError, match=f"receivers refuse it: .*{why}"):
                await send.send(value)
        await send.send("still usable")
        assert await recv.receive() == "still usable"


@pytest.mark.trio
async def test_cbor_broadcast_items() -> None:
    send, raw = trio.open_memory_channel[BroadcastMessage[bytes]](math.inf)
    recv = CborReceiveChannel(raw)
    send.send_nowait(BroadcastMessage("alice", cbor2.dumps({"n": [1, 2]})))
    send.send_nowait(BroadcastMessage("mallory", b"\xff"))
    send.send_nowait(BroadcastMessage("bob", cbor2.dumps("hi")))
    with trio.fail_after(DEADLINE):
        message = await recv.receive()
        assert isinstance(message, BroadcastMessage)
        assert message == BroadcastMessage("alice", {"n": [1, 2]})
        with pytest.raises(ProtocolError, match="mallory"):
            await recv.receive()
        assert await recv.receive() == BroadcastMessage("bob", "hi")


@pytest.mark.trio
async def test_cbor_over_nonblocking_broadcast_passes_lagged() -> None:
    send, raw = trio.open_memory_channel[BroadcastMessage[bytes]](0)
    with trio.fail_after(DEADLINE):
        async with open_nonblocking(raw, 2) as nb:
            recv = CborReceiveChannel(nb)
            values = CborReceiveChannel(untagged(nb))
            for i in range(4):
                await send.send(BroadcastMessage("alice", cbor2.dumps({"i": i})))
            await drained()
            await expect_lagged(recv, 2)
            assert await recv.receive() == BroadcastMessage("alice", {"i": 2})
            assert await values.receive() == {"i": 3}


@pytest.mark.trio
async def test_cbor_aclose_closes_underlying() -> None:
    raw_send, raw_recv = trio.open_memory_channel[bytes](math.inf)
    send, recv = CborSendChannel(raw_send), CborReceiveChannel(raw_recv)
    await recv.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await recv.receive()
    with pytest.raises(trio.BrokenResourceError):  # its receiver is gone
        await send.send(1)
    await send.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send.send(1)


@pytest.mark.trio
async def test_cbor_receive_needs_bytes() -> None:
    send, raw = trio.open_memory_channel[Any](math.inf)
    send.send_nowait("not bytes")
    with pytest.raises(TypeError, match="bytes"):
        await CborReceiveChannel(raw).receive()


@pytest.mark.trio
async def test_cbor_end_of_channel_passes_through() -> None:
    send, recv = cbor_pair()
    await send.aclose()
    with pytest.raises(trio.EndOfChannel):
        await recv.receive()


@pytest.mark.trio
async def test_nonblocking_entered_while_cancelled_closes_source() -> None:
    source = ScriptedReceiveChannel()
    with trio.CancelScope() as scope:
        scope.cancel()
        async with open_nonblocking(source, 3):
            pytest.fail("the body must not run in a cancelled scope")  # pragma: no cover
    assert scope.cancelled_caught
    assert source.closed


@pytest.mark.trio
async def test_nonblocking_drain_outlives_outside_cancellation_while_block_is_open() -> None:
    send, recv = trio.open_memory_channel[int](math.inf)
    with trio.CancelScope() as outer:
        async with open_nonblocking(recv, 3) as nb:
            outer.cancel()
            # A reader shielded inside the block still gets what arrives.
            with trio.CancelScope(shield=True), trio.fail_after(DEADLINE):
                send.send_nowait(1)
                assert await nb.receive() == 1
    assert outer.cancelled_caught
