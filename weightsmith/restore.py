"""Restore: rebuild the source container(s) byte for byte from a model's store artifacts.

Containers are written segment by segment (verbatim header and padding bytes from files/,
tensor bytes from Zarr), each tensor's bytes checked against its manifest sha256 on the way.
`dequantize=True` writes one float32 safetensors file of the logical tensors instead
(GPTQ groups as `<prefix>.weight`, GGUF blocks dequantised).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator

import numpy as np

from weightsmith import dtypes
from weightsmith.errors import WeightsmithError
from weightsmith.model import ModelRef, parse_model_url
from weightsmith.store import arrays

READ_BYTES = 64 << 20


def restore(model_url: str, out: str, dequantize: bool = False) -> list[str]:
    """Write the model under `out`; returns the paths written.

    A single-container model goes to `out` itself when `out` does not name an existing folder;
    a sharded model (or an existing folder as `out`) goes into the folder `out`.
    """
    model = parse_model_url(model_url)
    manifest = model.manifest()
    if dequantize:
        path = _target(out, "model.safetensors", single=True)
        _atomic_write(path, _dequantized(model, manifest))
        return [path]
    if not manifest.get("selection", {}).get("complete", False):
        raise WeightsmithError(
            model.url, "only some tensors were extracted (--include/--exclude): restore --dequantize writes those"
        )
    containers = manifest["source"]["containers"]
    written = []
    for c in containers:
        name = c["name"]
        if "/" in name or name in ("", ".", "..") or "\x00" in name:
            raise WeightsmithError(model.url, f"manifest names an unsafe container file {name!r}")
        path = _target(out, name, single=len(containers) == 1)
        _atomic_write(path, _container_bytes(model, manifest, c))
        written.append(path)
    if manifest["source"]["kind"] == "sharded":
        index = manifest["files"].get("model.safetensors.index.json")
        if index:
            path = os.path.join(out, "model.safetensors.index.json")
            _atomic_write(path, iter([model.store.read_bytes(index["key"])]))
            written.append(path)
    return written


def _target(out: str, name: str, single: bool) -> str:
    if single and not os.path.isdir(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        return out
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, name)


def _atomic_write(path: str, chunks: Iterator[bytes]) -> None:
    """Write to a temporary name beside `path`, then rename: never a half-written file."""
    tmp = f"{path}.partial"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _container_bytes(model: ModelRef, manifest: dict, container: dict) -> Iterator[bytes]:
    pos = 0
    for segment in container["segments"]:
        start, end, tensor = segment[0], segment[1], segment[2]
        if start != pos:
            raise WeightsmithError(model.url, f"manifest segments of {container['name']} leave a gap at {pos}")
        if tensor is None:
            data = model.store.read_bytes(segment[3])
            if len(data) != end - start:
                raise WeightsmithError(model.url, f"{segment[3]} has {len(data)} bytes, expected {end - start}")
            yield data
        else:
            record = manifest["tensors"].get(tensor)
            if record is None:
                raise WeightsmithError(model.url, f"manifest has no record of tensor {tensor!r}")
            h = hashlib.sha256()
            n = 0
            for block in stored_blocks(model, record):
                data = block.tobytes()
                h.update(data)
                n += len(data)
                yield data
            if n != end - start or h.hexdigest() != record["sha256"]:
                raise WeightsmithError(model.url, f"tensor {tensor!r}: stored values do not match the manifest")
        pos = end


def stored_blocks(model: ModelRef, record: dict) -> Iterator[np.ndarray]:
    """The stored array of a record in row blocks, as stored (bits for BF16/F8).

    A missing or undecodable chunk is a one-line error naming the tensor and its array.
    """
    key = record["artifacts"]["zarr"]
    try:
        array = arrays.open_array(model.store, key)
        if array.ndim == 0:
            yield np.ascontiguousarray(array[()])
            return
        row = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
        step = max(array.chunks[0], READ_BYTES // row // array.chunks[0] * array.chunks[0])
        for r0 in range(0, array.shape[0], step):
            yield np.ascontiguousarray(array[r0 : r0 + step])
    except WeightsmithError:
        raise
    except Exception as e:  # zarr/codec errors: corrupt or missing data in the store
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise WeightsmithError(model.url, f"tensor {record['name']!r}: cannot read {key} ({reason})") from None


def logical_records(manifest: dict) -> list[dict]:
    """Records a user sees as tensors: everything but GPTQ components."""
    return [r for r in manifest["tensors"].values() if r.get("role") != "gptq-component"]


def float_values(model: ModelRef, record: dict) -> Iterator[np.ndarray]:
    """A tensor's values in row blocks: float32 for float dtypes and GGUF blocks, else as is."""
    if record["encoding"] == "gguf":
        from weightsmith.sources.base import TensorEntry
        from weightsmith.sources.gguf import dequantize

        entry = TensorEntry(
            record["name"],
            record["dtype"],
            tuple(record["shape"]),
            0,
            0,
            0,
            "gguf",
            int(np.asarray(arrays.open_array(model.store, record["artifacts"]["zarr"]).shape)[-1]),
        )
        for block in stored_blocks(model, record):
            yield dequantize(entry, block)
        return
    for block in stored_blocks(model, record):
        values = dtypes.from_storage(block, record["dtype"])
        yield (
            values.astype(np.float32)
            if values.dtype.kind == "f" or record["dtype"].startswith(("BF", "F8"))
            else values
        )


def _out_dtype(record: dict) -> str:
    if record["encoding"] == "gguf" or record["dtype"] in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"):
        return "F32"
    return record["dtype"]


def _dequantized(model: ModelRef, manifest: dict) -> Iterator[bytes]:
    records = logical_records(manifest)
    header: dict = {"__metadata__": {"format": "pt", "weightsmith.source": f"{model.slug}/{model.revision}"}}
    offset = 0
    for r in records:
        dtype = _out_dtype(r)
        size = int(np.prod(r["shape"], dtype=np.int64)) * dtypes.itemsize(dtype)
        header[r["name"]] = {"dtype": dtype, "shape": r["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    yield struct.pack("<Q", len(raw)) + raw
    for r in records:
        want = dtypes.numpy_dtype(_out_dtype(r))
        for block in float_values(model, r):
            yield np.ascontiguousarray(block, dtype=want).tobytes()
