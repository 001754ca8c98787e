"""prefetch, Background and map_in_order: order, errors in any thread, no thread left behind."""

from __future__ import annotations

import threading
import time

import pytest

from weightsmith.overlap import Background, map_in_order, prefetch


def test_prefetch_keeps_order_and_stays_one_item_ahead() -> None:
    made: list[int] = []

    def items():
        for i in range(6):
            made.append(i)
            yield i

    for i in prefetch(items()):
        time.sleep(0.01)  # let the producer run ahead as far as it may
        assert len(made) <= i + 2  # the item given out and the one after it
    assert made == list(range(6))


def test_prefetch_raises_the_producers_error_in_the_consumer() -> None:
    def items():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1]


def test_consumer_error_stops_the_producer() -> None:
    closed = threading.Event()

    def items():
        try:
            yield from range(1000)
        finally:
            closed.set()

    before = threading.active_count()
    stream = prefetch(items())
    with pytest.raises(ZeroDivisionError):
        for _ in stream:
            1 / 0  # noqa: B018
    stream.close()
    assert closed.is_set() and threading.active_count() == before


def test_background_runs_in_order_and_waits_on_exit() -> None:
    done: list[int] = []
    with Background() as bg:
        for i in range(5):
            bg.submit(lambda i=i: (time.sleep(0.005), done.append(i)))
    assert done == list(range(5))


def test_background_error_is_raised_by_the_next_submit_or_the_exit() -> None:
    def fail() -> None:
        raise OSError("no space")

    with pytest.raises(OSError, match="no space"), Background() as bg:
        bg.submit(fail)
        bg.submit(lambda: None)
    with pytest.raises(OSError, match="no space"), Background() as bg:
        bg.submit(fail)


def test_an_error_in_the_block_wins_over_the_background_one() -> None:
    with pytest.raises(KeyError), Background() as bg:
        bg.submit(lambda: 1 / 0)
        raise KeyError("first")


def test_map_in_order_keeps_order_and_a_bound_on_calls_in_flight() -> None:
    lock = threading.Lock()
    now, most = 0, 0

    def work(i: int) -> int:
        nonlocal now, most
        with lock:
            now += 1
            most = max(most, now)
        time.sleep(0.01 * (i % 3))  # later items may finish first
        with lock:
            now -= 1
        return i * i

    assert list(map_in_order(work, range(9), 2)) == [i * i for i in range(9)]
    assert most == 2


def test_map_in_order_error_cancels_the_rest_and_waits_for_the_running() -> None:
    started: list[int] = []
    finished: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        if i == 1:
            raise OSError("disk gone")
        time.sleep(0.05)
        finished.append(i)
        return i

    with pytest.raises(OSError, match="disk gone"):
        list(map_in_order(work, range(10), 2))
    assert sorted(started) == sorted(finished + [1]) and len(started) <= 4  # none still running
    assert not [t for t in threading.enumerate() if t.name.startswith("weightsmith-map")]
