"""Tensors as Zarr v3 arrays in the store: exact values, row chunks, a record written last.

Every array carries attributes `dtype` (the source dtype name), `shape` (the logical shape)
and `encoding`; BF16/F8 are stored as their raw bits, GGUF quantised tensors as uint8 rows of
blocks. The attribute `weightsmith` holds the tensor's manifest record and is written after
all data: an array without it is unfinished and is rewritten on the next run.
"""

from __future__ import annotations

import math

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from weightsmith import dtypes
from weightsmith.store.store import Store

CHUNK_BYTES = 8 << 20  # ~8 MB chunks: few objects on S3, cheap partial reads
# Compressed, as cheaply as possible: blosc lz4 level 1 with byte shuffle, the fastest codec
# measured here (bench/extract.py --codec). On the random-init benchmark model it saves ~0% and
# costs ~0.2-0.7 CPU-s per 500 MB over no codec; trained weights save a few % to ~10% (float32),
# more for BF16 and for the zero-filled tensors. Arrays written with another codec stay readable.
_COMPRESSORS = [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")]
RECORD = "weightsmith"


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows of dim 0 per chunk (0-d and 1-d arrays are one chunk).

    Chunks are at most CHUNK_BYTES and as even as the rows allow: Zarr stores the last chunk
    full size, padded, which uncompressed would waste up to a chunk per tensor.
    """
    if len(shape) < 2 or shape[0] == 0:
        return max(1, shape[0]) if shape else 1
    row = math.prod(shape[1:]) * itemsize
    most = max(1, min(shape[0], CHUNK_BYTES // max(1, row)))
    return -(-shape[0] // -(-shape[0] // most))  # rows split into ceil(rows / most) even chunks


def create(store: Store, key: str, shape: tuple[int, ...], np_dtype: np.dtype, attrs: dict) -> zarr.Array:
    """Create (or overwrite) an empty array for streaming row blocks into."""
    rows = chunk_rows(shape, np_dtype.itemsize)
    chunks = (rows, *shape[1:]) if len(shape) >= 2 else tuple(max(1, s) for s in shape)
    return zarr.create_array(
        store=store.zarr_store(key),
        shape=shape,
        dtype=np_dtype,
        chunks=chunks,
        compressors=_COMPRESSORS,
        attributes=attrs,
        fill_value=0,
        overwrite=True,
        # Write every chunk as it comes: else Zarr compares each chunk with the fill value
        # first (a pass over the data) to leave out all-zero chunks.
        config={"write_empty_chunks": True},
    )


def open_array(store: Store, key: str, mode: str = "r") -> zarr.Array:
    return zarr.open_array(store=store.zarr_store(key, read_only=mode == "r"), mode=mode)


def read_record(store: Store, key: str) -> dict | None:
    """The finished tensor's record, or None when the array is missing or unfinished."""
    try:
        attrs = open_array(store, key).attrs.asdict()
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.NodeNotFoundError):
        return None
    record = attrs.get(RECORD)
    return record if isinstance(record, dict) else None


def finish(array: zarr.Array, record: dict) -> None:
    """Mark the array complete by writing its record (the last write of a tensor)."""
    array.attrs.update({RECORD: record})


def read_exact(store: Store, key: str, rows: slice = slice(None)) -> np.ndarray:
    """Stored values with their original dtype (BF16/F8 viewed from bits; GGUF rows as uint8)."""
    array = open_array(store, key)
    data = array[rows] if array.ndim else array[()]
    data = np.asarray(data)
    return dtypes.from_storage(data, array.attrs["dtype"]) if array.attrs.get("encoding") == "raw" else data
