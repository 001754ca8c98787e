"""Chunk rows: at most CHUNK_BYTES, split evenly so the padded last chunk wastes little."""

from __future__ import annotations

import pytest

from weightsmith.store import arrays


@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (50257, 768), (4100, 1024), (7, 3 << 20)])
def test_chunks_are_bounded_and_even(shape) -> None:
    rows = arrays.chunk_rows(shape, 4)
    row_bytes = shape[1] * 4
    assert rows * row_bytes <= max(arrays.CHUNK_BYTES, row_bytes)
    chunks = -(-shape[0] // rows)
    assert chunks * rows - shape[0] < chunks  # padding: less than a row per chunk


def test_small_arrays_are_one_chunk() -> None:
    assert arrays.chunk_rows((), 4) == 1
    assert arrays.chunk_rows((5,), 4) == 5
    assert arrays.chunk_rows((3, 4), 4) == 3
