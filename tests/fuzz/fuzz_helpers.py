"""What the fuzz tests share: the hypothesis budget, an in-memory ranged reader that records
every range asked for, and the error and memory contract every input must keep."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import fixture_paths
from hypothesis import HealthCheck, event, settings
from hypothesis.control import currently_in_test_context

from weightsmith.errors import WeightsmithError
from weightsmith.ranged import RangedReader

T = TypeVar("T")

EXAMPLES = int(os.environ.get("WEIGHTSMITH_FUZZ_EXAMPLES") or 0)
MEMORY_CAP = 64 << 20  # traced bytes one parse (or open_source) may peak at
FIXTURES = fixture_paths.FIXTURES


def fuzz_settings(ci_examples: int) -> settings:
    """`ci_examples` per property, the same every run; WEIGHTSMITH_FUZZ_EXAMPLES=N explores N."""
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        database=None,  # nothing written outside temporary folders; failures print their input
        derandomize=not EXAMPLES,  # CI: the same inputs every run; a long run explores
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


class _Bytes:
    """The one fsspec method RangedReader uses, over bytes in memory."""

    def __init__(self, data: bytes):
        self.data = data

    def cat_file(self, path: str, start: int, end: int) -> bytes:
        return self.data[start:end]


@dataclass
class ProbeReader(RangedReader):
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def read(self, start: int, end: int) -> bytes:
        self.ranges.append((start, end))
        assert 0 <= start <= end <= self.size, f"asked for [{start}, {end}) of a {self.size}-byte file"
        return super().read(start, end)


def probe(data: bytes, name: str) -> ProbeReader:
    """A recording reader over `data`, as if it were the file `name`."""
    return ProbeReader(url=name, fs=_Bytes(data), path=name, size=len(data))


def accepted_or_refused(call: Callable[[], T], what: str) -> T | None:
    """call() under a memory cap: its result, or None where it raised WeightsmithError, whose
    message must be one line; any other exception propagates and fails the test."""
    tracemalloc.start()
    try:
        result = call()
    except WeightsmithError as e:
        assert "\n" not in str(e), str(e)
        result = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_CAP, f"{what} peaked at {peak:,} traced bytes"
    if currently_in_test_context():  # counts shown by --hypothesis-show-statistics
        event("accepted" if result is not None else "refused")
    return result
