"""Overlap the stages of streaming a tensor on a few threads, with a bound on what is in flight.

Reading, hashing, compressing and writing files all release the GIL (numpy, hashlib, blosc,
zlib, file I/O), so a band can be read and hashed while the previous one is written to Zarr
and cut into TIFF tiles, and two work units can be extracted at once. The helpers keep a
fixed number of items in flight, so memory stays a few row blocks whatever the tensor's size,
and none lets a thread outlive the `with` or the loop that started it: after an error nothing
is written behind the caller's back.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield `items`, produced on a background thread at most `depth` items ahead.

    While the consumer holds item k, the producer may make k+1 .. k+depth, no more. An
    exception of the producer is raised here, in the consumer's thread. Closing the iterator
    early (an error in the consumer) stops the producer and waits for it.
    """
    ahead: queue.SimpleQueue = queue.SimpleQueue()
    slots = threading.Semaphore(depth + 1)  # items made and not yet given back by the consumer
    stop = threading.Event()

    def produce() -> None:
        it = iter(items)
        try:
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(it, _DONE)
                ahead.put((item, None))
                if item is _DONE:
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            ahead.put((_DONE, e))
        finally:
            if hasattr(it, "close"):  # a generator's cleanup runs here, on its own thread
                it.close()

    thread = threading.Thread(target=produce, name="weightsmith-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ahead.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
            slots.release()  # the consumer is done with the item: one more may be made
    finally:
        stop.set()
        thread.join()


class Background:
    """Runs calls one at a time on a worker thread; `submit` first waits for the call before.

    Leaving the `with` waits for the last call; its exception, if any, is raised then (unless
    an exception is already leaving the block, which wins).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-bg")
        self._pending: Future | None = None

    def submit(self, fn: Callable[..., object], *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Wait for the call in flight; raise its exception."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.wait()
            elif self._pending is not None:
                self._pending.exception()  # wait, but let the error in flight win
        finally:
            self._pool.shutdown(wait=True)


def map_in_order(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """Yield fn(item) for each item, in order, computed on `workers` threads at a time.

    A call starts as soon as one of the `workers` running ends, so one long call (the embedding
    matrix) does not hold the other threads up; results ready before their turn wait for it, so
    they should be small. An error, of a call or of the consumer, is raised as soon as it is
    seen: the calls not started are cancelled and the running ones waited for first.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weightsmith-map") as pool:
        pending: collections.deque[Future] = collections.deque()  # in item order, not yet yielded
        it = iter(items)
        more = True
        try:
            while True:
                while more and sum(not f.done() for f in pending) < workers:
                    item = next(it, _DONE)
                    if item is _DONE:
                        more = False
                    else:
                        pending.append(pool.submit(fn, item))
                if not pending:
                    return
                if pending[0].done():
                    yield pending.popleft().result()
                    continue
                done, _ = wait([f for f in pending if not f.done()], return_when=FIRST_COMPLETED)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()
        finally:
            for future in pending:
                future.cancel()


def map_ahead(
    fn: Callable[[T], R], items: Iterable[T], size: Callable[[T], int], budget: int, workers: int
) -> Iterator[R]:
    """Yield fn(item) for each item, in order, computing later items ahead on `workers` threads.

    Items are started while the sizes of those started and not yet given back stay within
    `budget` (the item the consumer holds counts until it asks for the next; one item always
    starts, whatever its size): several GETs in flight, a bounded amount of memory. An error of
    a call is raised in its turn; closing the iterator early cancels what has not started and
    waits for the rest.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weightsmith-ahead") as pool:
        pending: collections.deque[tuple[Future, int]] = collections.deque()
        it = iter(items)
        upcoming = next(it, _DONE)
        held = 0
        try:
            while True:
                while upcoming is not _DONE and (not pending or held + size(upcoming) <= budget):
                    n = size(upcoming)
                    pending.append((pool.submit(fn, upcoming), n))
                    held += n
                    upcoming = next(it, _DONE)
                if not pending:
                    return
                future, n = pending[0]
                result = future.result()
                pending.popleft()
                yield result
                held -= n  # the consumer is done with it
        finally:
            for future, _ in pending:
                future.cancel()
