"""Chunk rows (at most CHUNK_BYTES, split evenly) and the array writer (zarr's own bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from weightsmith.store import Store, arrays


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


# ---------------------------------------------------------------------------------------------
# the writer: the same zarr.json and chunk bytes as zarr's own writer, read back by zarr
CASES = [
    ((), "<f4"),
    ((0,), "<f4"),
    ((5,), "<f2"),
    ((5, 3), "<f4"),
    ((7, 0), "<f4"),
    ((0, 4), "<u2"),
    ((3, 4, 5), "<i8"),
    ((20, 3), "u1"),
    ((6,), "?"),
    ((41, 3, 2), "<f4"),
]


def _values(shape, dtype) -> np.ndarray:
    rng = np.random.default_rng(len(shape) + sum(shape))
    return (rng.standard_normal(shape) * 100).astype(dtype)


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_written_array_is_zarrs_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape, dtype) -> None:
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 64)  # several chunks, the last one padded
    store = Store(str(tmp_path))
    values = _values(shape, dtype)
    attrs = {"dtype": "X", "shape": list(shape), "encoding": "raw"}
    array = arrays.create(store, "ours.zarr", shape, np.dtype(dtype), attrs)
    if values.ndim:
        for r0 in range(0, shape[0], 3):  # bands that do not line up with the chunks
            array.append(values[r0 : r0 + 3])
    else:
        array.append(values)
    assert arrays.read_record(store, "ours.zarr") is None  # unfinished until its record is there
    array.finish({"name": "t", "n": 1})

    theirs = zarr.create_array(
        store=store.zarr_store("theirs.zarr"),
        shape=shape,
        dtype=np.dtype(dtype),
        chunks=array.chunks,
        compressors=[BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")],
        attributes=attrs,
        fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
        config={"write_empty_chunks": True},
    )
    theirs[...] = values
    theirs.attrs.update({arrays.RECORD: {"name": "t", "n": 1}})

    ours_dir, theirs_dir = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    assert json.loads((ours_dir / "zarr.json").read_text()) == json.loads((theirs_dir / "zarr.json").read_text())
    files = sorted(str(p.relative_to(ours_dir)) for p in ours_dir.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(theirs_dir)) for p in theirs_dir.rglob("*") if p.is_file())
    for f in files:  # chunks byte for byte; zarr.json (compact here, indented by zarr) as JSON above
        if f != "zarr.json":
            assert (ours_dir / f).read_bytes() == (theirs_dir / f).read_bytes(), f
    opened = arrays.open_array(store, "ours.zarr")
    assert opened.attrs.asdict() == {**attrs, arrays.RECORD: {"name": "t", "n": 1}}
    read = np.asarray(opened[()] if not shape else opened[...])
    assert read.dtype == values.dtype and np.array_equal(read, values)
    assert arrays.read_record(store, "ours.zarr") == {"name": "t", "n": 1}


def test_create_replaces_an_old_array(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    old = arrays.create(store, "a.zarr", (4, 2), np.dtype("<f4"), {"dtype": "F32"})
    old.append(np.ones((4, 2), "<f4"))
    old.finish({"old": True})
    new = arrays.create(store, "a.zarr", (2, 2), np.dtype("<f4"), {"dtype": "F32"})
    assert arrays.read_record(store, "a.zarr") is None  # the old record went first
    new.append(np.zeros((2, 2), "<f4"))
    new.finish({"old": False})
    assert np.array_equal(arrays.open_array(store, "a.zarr")[...], np.zeros((2, 2), "<f4"))


def test_too_many_rows_are_refused(tmp_path: Path) -> None:
    array = arrays.create(Store(str(tmp_path)), "a.zarr", (2, 2), np.dtype("<f4"), {})
    with pytest.raises(ValueError, match="more than 2"):
        array.append(np.zeros((3, 2), "<f4"))
