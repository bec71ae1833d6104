"""The test helpers themselves: a failed wait says what it waited for, and until when."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from helpers import describe, wait_for


class Counter:
    value = 0


async def test_wait_for_names_the_condition_and_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counter = Counter()
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError) as info:
        await wait_for(lambda: counter.value >= 3, timeout=2.5)
    assert trio.current_time() - start == pytest.approx(2.5)
    message = str(info.value)
    assert "counter.value >= 3" in message
    assert "2.5 s" in message
    assert f"t={start + 2.5:.3f}" in message


async def test_wait_for_takes_a_description_and_returns_once_true(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counter = Counter()

    async def count_up() -> None:
        for _ in range(3):
            await trio.sleep(1)
            counter.value += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_up)
        await wait_for(lambda: counter.value == 3, timeout=10)
        assert trio.current_time() - start < 3.1
    with pytest.raises(trio.TooSlowError, match="the counter to wrap around"):
        await wait_for(lambda: counter.value == 0, 1, what="the counter to wrap around")


def test_describe_tells_lambdas_on_one_line_apart() -> None:
    a, b = (lambda: Counter.value == 1), (lambda: Counter.value != 2)
    assert (describe(a), describe(b)) == ("Counter.value == 1", "Counter.value != 2")

    def named_check() -> bool:
        return True

    assert describe(named_check).endswith("named_check")
