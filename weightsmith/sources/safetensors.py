"""safetensors headers read through the ranged reader, validated like the reference library.

Layout of a file: 8 bytes little-endian header length N, N bytes of UTF-8 JSON, then the data.
The checks follow safetensors' Rust `SafeTensors::read_metadata` (the version pinned in
pyproject), no stricter and no more lenient: what the reference opens is accepted (JSON
padded with whitespace, unknown keys in a tensor entry, a file without tensors, a repeated
tensor name whose last entry wins, as serde's map does), and what it refuses is refused here,
with one line naming the file and the problem. The header bytes are kept verbatim in the store,
so whatever was accepted is restored byte for byte.
"""

from __future__ import annotations

import json
import math
import struct

from weightsmith import dtypes
from weightsmith.errors import WeightsmithError
from weightsmith.ranged import RangedReader
from weightsmith.sources.base import Container, Segment, TensorEntry

MAX_HEADER_BYTES = 100_000_000  # the reference library's limit
_INT64_MAX = 2**63 - 1
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


def parse_safetensors(reader: RangedReader, container: int, name: str) -> tuple[Container, list[TensorEntry]]:
    """Read and validate a safetensors header.

    Args:
        reader: ranged reader on the file (two small reads: the length, then the header).
        container: index stored in every returned TensorEntry.
        name: the file's name relative to the source root.

    Returns:
        The container (segments: the 8 + N header bytes, then every tensor in offset order) and
        the tensor entries in offset order.
    """
    where = reader.url
    if reader.size < 8:
        raise WeightsmithError(where, f"truncated safetensors file ({reader.size} bytes, no header length)")
    (n,) = struct.unpack("<Q", reader.read(0, 8))
    if n > MAX_HEADER_BYTES:
        raise WeightsmithError(where, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > reader.size:
        raise WeightsmithError(where, f"header length {n} runs past the end of the file ({reader.size} bytes)")
    raw = reader.read(8, 8 + n)
    header = _decode_header(raw, where)
    metadata = _metadata(header.pop("__metadata__", None), where)

    data_start = 8 + n
    entries = [_entry(k, v, container, data_start, where) for k, v in header.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    _check_coverage(entries, data_start, reader.size, where)

    segments = [Segment(0, data_start)] + [Segment(e.start, e.end, e.name) for e in entries]
    return (
        Container(
            name=name, url=where, size=reader.size, format="safetensors", segments=tuple(segments), metadata=metadata
        ),
        entries,
    )


class _Object(dict):
    """A JSON object that remembers which of its keys appeared more than once (the last wins)."""

    repeated: frozenset[str] = frozenset()


def _decode_header(raw: bytes, where: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightsmithError(where, f"header is not valid UTF-8 (byte {e.start})") from None

    def remember_repeats(pairs: list[tuple[str, object]]) -> dict:
        obj = _Object(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            obj.repeated = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
        return obj

    def not_json(value: str) -> float:
        raise ValueError(f"{value} is not JSON")

    def finite(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            raise ValueError(f"number {text} out of range")
        return value

    try:
        # Python's json takes NaN/Infinity and numbers beyond float; serde_json does not.
        header = json.loads(text, object_pairs_hook=remember_repeats, parse_constant=not_json, parse_float=finite)
    except json.JSONDecodeError as e:
        raise WeightsmithError(where, f"header is not valid JSON ({e.msg} at char {e.pos})") from None
    except ValueError as e:
        raise WeightsmithError(where, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise WeightsmithError(where, "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise WeightsmithError(where, "header is not a JSON object")
    return header


def _metadata(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise WeightsmithError(where, "__metadata__ must map strings to strings")
    return value


def _entry(name: str, info: object, container: int, data_start: int, where: str) -> TensorEntry:
    if not isinstance(info, dict) or not _TENSOR_KEYS <= set(info):
        raise WeightsmithError(where, f"tensor {name!r}: entry must have dtype, shape and data_offsets")
    repeated = sorted(_TENSOR_KEYS & getattr(info, "repeated", frozenset()))
    if repeated:
        raise WeightsmithError(where, f"tensor {name!r}: duplicate field {repeated[0]!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise WeightsmithError(where, f"tensor {name!r}: dtype must be a string")
    if not dtypes.is_known(dtype):
        raise WeightsmithError(where, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not _is_uint_list(shape):
        raise WeightsmithError(where, f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (_is_uint_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise WeightsmithError(where, f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end")
    # Like the reference: the element count must fit in 64 bits even when a dim is 0, and
    # numpy/zarr hold at most 32 dims.
    if len(shape) > 32 or math.prod(max(d, 1) for d in shape) * dtypes.itemsize(dtype) > _INT64_MAX:
        raise WeightsmithError(where, f"tensor {name!r}: shape {shape} is too large to address")
    expected = math.prod(shape) * dtypes.itemsize(dtype)
    if offsets[1] - offsets[0] != expected:
        raise WeightsmithError(
            where,
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes in data_offsets but shape {shape} "
            f"of {dtype} needs {expected}",
        )
    return TensorEntry(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        container=container,
        start=data_start + offsets[0],
        end=data_start + offsets[1],
    )


def _is_uint_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


def _check_coverage(entries: list[TensorEntry], data_start: int, size: int, where: str) -> None:
    """Offsets start at 0, are contiguous, do not overlap, and cover the data to the end."""
    pos = data_start
    for e in entries:
        if e.start != pos:
            what = "overlaps the previous tensor" if e.start < pos else "leaves a gap before it"
            raise WeightsmithError(where, f"tensor {e.name!r} at data offset {e.start - data_start} {what}")
        pos = e.end
    if pos != size:
        if pos > size:
            raise WeightsmithError(where, f"truncated: tensors need {pos} bytes, file has {size}")
        raise WeightsmithError(where, f"{size - pos} bytes after the last tensor are not covered by the header")
