"""Tensors as Zarr v3 arrays in the store: exact values, row chunks, a record written last.

Every array carries attributes `dtype` (the source dtype name), `shape` (the logical shape)
and `encoding`; BF16/F8 are stored as their raw bits, GGUF quantised tensors as uint8 rows of
blocks. The attribute `weightsmith` holds the tensor's manifest record and is written after
all data: an array without it is unfinished and is rewritten on the next run.

Arrays are written here, not through zarr: each compressed chunk is one store write, and
`zarr.json` one more, last, with the record; the same chunk bytes and metadata as zarr writes
(tests open them with zarr). zarr's own writer cost ~4 ms of metadata handling and store round
trips per tensor, and wrote zarr.json twice. An unfinished array has no zarr.json yet. Reads go
through zarr.
"""

from __future__ import annotations

import json
import math

import numcodecs
import numpy as np
import zarr

from weightsmith import dtypes
from weightsmith.store.store import Store

CHUNK_BYTES = 8 << 20  # ~8 MB chunks: few objects on S3, cheap partial reads
# Compressed, as cheaply as possible: blosc lz4 level 1 with *bit* shuffle. Measured here on
# 154 MB of random-init float32 (one thread): bitshuffle+lz4 runs 3.4 GB/s and keeps 88% of the
# bytes; byte shuffle+lz4 runs 1.1 GB/s and keeps 95%; zstd-1 with shuffle 0.9 GB/s, 92%. On
# BF16 bits bitshuffle keeps 76% (byte shuffle 89%). The sign and exponent bit planes of
# weights are nearly constant, which lz4 finds quickly; the mantissa planes are stored as they
# are. bench/extract.py --codec compares the choices. Arrays written with another codec stay
# readable. Zarr v3 codec metadata after the `bytes` codec (blosc's typesize is the dtype's,
# set per array).
_COMPRESSORS: list[dict] = [
    {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 1, "shuffle": "bitshuffle", "blocksize": 0}}
]
# Chunk keys "c.<row>.0" (zarr's default encoding with "." between indices): every chunk is a
# file in the array's folder. With "/" each row chunk of a matrix had a folder of its own (c/,
# c/<row>/), 40% of the inodes of an extraction; creating inodes is a large part of writing
# many small files on a local disk. Arrays written with "/" stay readable: zarr.json says which.
CHUNK_SEPARATOR = "."
RECORD = "weightsmith"
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


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


class ArrayWriter:
    """An array being written: rows appended in order, each chunk stored as soon as it is whole.

    Made by `create`; `finish` writes zarr.json last. The last chunk is padded with zeros, as
    zarr stores it.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunks: tuple[int, ...],
        metadata: dict,
        encoders: list,
    ):
        self.store, self.key, self.shape, self.dtype, self.chunks = store, key, shape, dtype, chunks
        self.metadata = metadata  # zarr.json without the record
        self._encoders = encoders  # numcodecs codecs, applied in order to each chunk's bytes
        self._rows = 0  # rows appended so far
        self._carry: np.ndarray | None = None  # rows of a chunk not yet whole

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def append(self, values: np.ndarray) -> None:
        """Store the next rows (values: (n, *shape[1:]); a 0-d array takes its one value)."""
        values = np.ascontiguousarray(values, self.dtype)
        if not self.ndim:
            self._put(0, values.reshape(()))
            return
        first = self._rows  # the array row of values[0]; a chunk's first row after the carry
        self._rows += values.shape[0]
        if self._rows > self.shape[0]:
            raise ValueError(f"{self.key}: {self._rows} rows written, more than {self.shape[0]}")
        if self._carry is not None:
            first -= self._carry.shape[0]
            values = np.concatenate([self._carry, values])
            self._carry = None
        step = self.chunks[0]
        for r0 in range(0, values.shape[0], step):
            chunk = values[r0 : r0 + step]  # (rows <= step, *shape[1:])
            if chunk.shape[0] == step or first + r0 + chunk.shape[0] == self.shape[0]:
                self._put((first + r0) // step, chunk)
            else:
                self._carry = chunk.copy()  # the bands it views are not kept

    def finish(self, record: dict) -> None:
        """Mark the array complete: write zarr.json, the record in its attributes (the last write)."""
        if self.ndim and self._rows != self.shape[0]:
            raise ValueError(f"{self.key}: {self._rows} rows written of {self.shape[0]}")
        meta = {**self.metadata, "attributes": {**self.metadata["attributes"], RECORD: record}}
        # Compact: json's C encoder runs only without indent (zarr indents; readers do not care).
        self.store.write_bytes(f"{self.key}/zarr.json", json.dumps(meta, allow_nan=True).encode())

    def _put(self, index: int, chunk: np.ndarray) -> None:
        if chunk.size == 0:
            return
        step = self.chunks[0] if self.ndim else 1
        if self.ndim and chunk.shape[0] < step:
            chunk = np.concatenate([chunk, np.zeros((step - chunk.shape[0], *chunk.shape[1:]), self.dtype)])
        data = chunk.tobytes() if not self._encoders else chunk.reshape(-1).view(np.uint8)
        for codec in self._encoders:
            data = codec.encode(data)
        sep = CHUNK_SEPARATOR
        name = "c" + f"{sep}{index}" * bool(self.ndim) + f"{sep}0" * (self.ndim - 1)  # zarr's chunk key
        self.store.write_bytes(f"{self.key}/{name}", data)


def create(store: Store, key: str, shape: tuple[int, ...], np_dtype: np.dtype, attrs: dict) -> ArrayWriter:
    """Create (or overwrite) an empty array for streaming row blocks into."""
    shape = tuple(shape)
    rows = chunk_rows(shape, np_dtype.itemsize)
    chunks = (rows, *shape[1:]) if len(shape) >= 2 else tuple(max(1, s) for s in shape)
    codecs = [{"name": "bytes"} if np_dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}]
    encoders = []
    for c in _COMPRESSORS:
        config = dict(c.get("configuration", {}))
        if c["name"] == "blosc":
            config = {"typesize": np_dtype.itemsize, **config}
            encoders.append(
                numcodecs.Blosc(
                    cname=config["cname"],
                    clevel=config["clevel"],
                    shuffle=_SHUFFLE[config["shuffle"]],
                    blocksize=config["blocksize"],
                    typesize=np_dtype.itemsize,
                )
            )
        else:
            encoders.append(numcodecs.get_codec({"id": c["name"], **config}))
        codecs.append({"name": c["name"], "configuration": config})
    metadata = {
        "shape": list(shape),
        "data_type": np_dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": CHUNK_SEPARATOR}},
        "fill_value": np.zeros((), np_dtype).item(),
        "codecs": codecs,
        "attributes": attrs,
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }
    # An old array, its record included, goes before any new chunk lands. Only a folder: a
    # file in the array's place stays, and the first write fails on it, as with zarr.
    if any(k.startswith(f"{key}/") for k in store.list(key)):
        store.delete(key)
    return ArrayWriter(store, key, shape, np_dtype, chunks, metadata, encoders)


def open_array(store: Store, key: str, mode: str = "r") -> zarr.Array:
    return zarr.open_array(store=store.zarr_store(key, read_only=mode == "r"), mode=mode)


def read_record(store: Store, key: str) -> dict | None:
    """The finished tensor's record, or None when the array is missing or unfinished.

    Read from zarr.json itself: opening the array through zarr costs ~0.5 ms of Python per
    tensor, which every extraction pays once per tensor to find what is already done.
    """
    try:
        meta = json.loads(store.read_bytes(f"{key}/zarr.json"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
        return None
    attrs = meta.get("attributes")
    record = attrs.get(RECORD) if isinstance(attrs, dict) else None
    return record if isinstance(record, dict) else None


def read_exact(store: Store, key: str, rows: slice = slice(None)) -> np.ndarray:
    """Stored values with their original dtype (BF16/F8 viewed from bits; GGUF rows as uint8)."""
    array = open_array(store, key)
    data = array[rows] if array.ndim else array[()]
    data = np.asarray(data)
    return dtypes.from_storage(data, array.attrs["dtype"]) if array.attrs.get("encoding") == "raw" else data
