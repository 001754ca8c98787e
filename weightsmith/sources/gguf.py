"""GGUF files: parse the header over a ranged reader into a container and its tensor entries.

`gguf.GGUFReader` memory-maps local files only, and a source may be on S3 or HTTP, so this parser
reads through `RangedReader.read(start, end)` alone: it fetches the header front to back in
windows that grow geometrically (64 KiB, then doubling) and never touches tensor data. Every
field is checked before it is used, so a damaged or hostile header fails fast with one
`WeightsmithError` line instead of a stray `IndexError`, `struct.error` or a huge allocation.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key-value
count, the key-values, the tensor infos (name, u32 n_dims, u64 dims ne0 first, u32 ggml type,
u64 offset relative to the data section), padding to `general.alignment`, then the data.

Dequantisation of block-quantised tensors is delegated to `gguf.quants.dequantize`, the
reference implementation, so values match what llama.cpp's own Python tooling computes.
"""

from __future__ import annotations

import math
import struct
from itertools import pairwise

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _reference_dequantize

from weightsmith.errors import WeightsmithError
from weightsmith.ranged import RangedReader
from weightsmith.sources.base import Container, Segment, TensorEntry

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Nested arrays are legal GGUF but never deeper than a couple of levels in practice; the cap
# keeps a crafted file from driving the recursive reader into RecursionError.
MAX_ARRAY_DEPTH = 8

_FIRST_WINDOW = 64 * 1024
_INT64_MAX = (1 << 63) - 1

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# GGUF metadata value types
_T_STRING = 8
_T_ARRAY = 9
_T_UINT32 = 4

# scalar value type -> (struct format, numpy dtype for arrays of it)
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    0: (struct.Struct("<B"), np.dtype("u1")),
    1: (struct.Struct("<b"), np.dtype("i1")),
    2: (struct.Struct("<H"), np.dtype("<u2")),
    3: (struct.Struct("<h"), np.dtype("<i2")),
    4: (struct.Struct("<I"), np.dtype("<u4")),
    5: (struct.Struct("<i"), np.dtype("<i4")),
    6: (struct.Struct("<f"), np.dtype("<f4")),
    7: (struct.Struct("<B"), np.dtype("u1")),  # bool: one byte, any non-zero is true
    10: (struct.Struct("<Q"), np.dtype("<u8")),
    11: (struct.Struct("<q"), np.dtype("<i8")),
    12: (struct.Struct("<d"), np.dtype("<f8")),
}
_T_BOOL = 7

# The fewest bytes one item of each value type takes: bounds an array's count by the bytes
# left in the file before anything is allocated.
_MIN_ITEM_BYTES = {t: s.size for t, (s, _) in _SCALARS.items()} | {_T_STRING: 8, _T_ARRAY: 12}

# Smallest possible tensor info (8-byte name length, n_dims, one dim, type, offset) and
# key-value (8-byte key length, type, one-byte value): bound the declared counts.
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_MIN_KV_BYTES = 8 + 4 + 1

# ggml types stored as plain little-endian values -> safetensors dtype names
_RAW_TYPES: dict[GGMLQuantizationType, str] = {
    GGMLQuantizationType.F32: "F32",
    GGMLQuantizationType.F16: "F16",
    GGMLQuantizationType.BF16: "BF16",
    GGMLQuantizationType.F64: "F64",
    GGMLQuantizationType.I8: "I8",
    GGMLQuantizationType.I16: "I16",
    GGMLQuantizationType.I32: "I32",
    GGMLQuantizationType.I64: "I64",
}

# Keys this parser adds to Container.metadata beside the file's own key-values.
VERSION_KEY = "gguf.version"
ALIGNMENT_KEY = "gguf.alignment"


class _Header:
    """A cursor over the file's first bytes, fetched on demand through the ranged reader."""

    def __init__(self, reader: RangedReader):
        self.reader = reader
        self.url = reader.url
        self.size = reader.size
        self.limit = min(reader.size, MAX_HEADER_BYTES)
        self.buf = b""
        self.pos = 0

    def error(self, problem: str) -> WeightsmithError:
        return WeightsmithError(self.url, problem)

    def left(self) -> int:
        """Bytes of the file after the cursor."""
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        """Make sure the buffer holds [pos, pos + n), fetching more of the file if not."""
        end = self.pos + n
        if end <= len(self.buf):
            return
        if end > self.size:
            raise self.error(
                f"truncated: {what} at offset {self.pos} needs {n} bytes, "
                f"the file has {max(self.size - self.pos, 0)} left"
            )
        if end > self.limit:
            raise self.error(
                f"header larger than the {MAX_HEADER_BYTES:,}-byte cap ({what} at offset {self.pos} needs {n} bytes)"
            )
        # Doubling keeps a long header (a 150k-token vocabulary) to a few reads and O(n)
        # copying; bytes (not bytearray) so numpy views never pin a buffer we grow.
        new_end = min(self.limit, max(end, 2 * len(self.buf), _FIRST_WINDOW))
        self.buf += self.reader.read(len(self.buf), new_end)

    def unpack(self, fmt: struct.Struct, what: str) -> int | float:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.unpack(_U64, what))

    def raw_string(self, what: str) -> bytes:
        """A GGUF string: u64 length, then that many bytes."""
        n = self.u64(f"{what} length")
        # need() also rejects a length beyond the file before anything is allocated.
        self.need(n, f"{what} (string)")
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def name(self, what: str) -> str:
        """A string that must be valid UTF-8 (keys, tensor names)."""
        start = self.pos
        data = self.raw_string(what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} at offset {start} is not valid UTF-8: {data[:64]!r}") from None

    def text(self, what: str) -> str:
        """A string value; metadata is informative, so bad UTF-8 is kept as replacements."""
        return self.raw_string(what).decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` string values: the tokenizer vocabulary path, so kept tight."""
        out: list[str] = []
        append = out.append
        unpack_u64 = _U64.unpack_from
        for i in range(count):
            if self.pos + 8 > len(self.buf):
                self.need(8, f"{what}[{i}] length")
            (n,) = unpack_u64(self.buf, self.pos)
            self.pos += 8
            if self.pos + n > len(self.buf):
                self.need(n, f"{what}[{i}] (string)")
            append(self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace"))
            self.pos += n
        return out

    def numbers(self, dtype: np.dtype, count: int, what: str) -> list:
        """`count` little-endian numbers as Python ints/floats."""
        self.need(count * dtype.itemsize, f"{what} ({count} items)")
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return values.tolist()


def parse_gguf(reader: RangedReader, container: int, name: str) -> tuple[Container, list[TensorEntry]]:
    """Parse a GGUF file's header into its container and tensor entries.

    Only the header is fetched, through `reader.read`; tensor data is never read.

    Args:
        reader: A ranged reader on the .gguf file (local, s3:// or http(s)://).
        container: The index stored in each `TensorEntry.container`.
        name: The file name recorded as `Container.name`.

    Returns:
        The container (segments cover the file exactly, in file order; metadata holds the
        key-values plus "gguf.version" and "gguf.alignment") and the tensor entries in the
        order of the file's tensor infos, with absolute byte ranges and numpy-order shapes.

    Raises:
        WeightsmithError: The file is not a valid GGUF v2/v3 file; the message names the URL
            and the first problem found.
    """
    head = _Header(reader)
    try:
        version, n_tensors, n_kv = _read_preamble(head)
        metadata, kv_types = _read_metadata(head, n_kv)
        infos = _read_tensor_infos(head, n_tensors)
    except MemoryError:
        # Counts are bounded by the file size and the header by MAX_HEADER_BYTES, but 100 MB
        # of one-byte array items is still ~1 GB of Python objects: report, do not crash.
        raise head.error("header too large to parse in memory") from None
    alignment = _alignment(head, metadata, kv_types)
    data_start = _align(head.pos, alignment)
    entries = [_entry(head, info, container, data_start, alignment) for info in infos]
    _check_layout(head, entries)
    for key, value in ((VERSION_KEY, version), (ALIGNMENT_KEY, alignment)):
        if key in metadata:
            raise head.error(f"metadata key {key!r} clashes with the key weightsmith adds")
        metadata[key] = value
    result = Container(
        name=name,
        url=reader.url,
        size=reader.size,
        format="gguf",
        segments=_segments(reader.size, data_start, entries),
        metadata=metadata,
    )
    return result, entries


def dequantize(entry: TensorEntry, blocks: np.ndarray) -> np.ndarray:
    """Values of GGUF block-quantised rows, computed by `gguf.quants.dequantize`.

    Args:
        entry: A tensor entry with encoding "gguf" (its dtype names the ggml type).
        blocks: uint8 rows of `entry.row_bytes` bytes, shape (rows, entry.row_bytes); any
            leading shape works as long as the last axis is one row.

    Returns:
        float32 values of shape (rows, entry.shape[-1]) (leading axes as given).

    Raises:
        WeightsmithError: The entry is not block-quantised, the rows have the wrong width, or
            the installed gguf package cannot dequantise this type.
    """
    where = f"tensor {entry.name!r}"
    if entry.encoding != "gguf":
        raise WeightsmithError(where, f"encoding {entry.encoding!r} is not GGUF block-quantised")
    try:
        qtype = GGMLQuantizationType[entry.dtype]
    except KeyError:
        raise WeightsmithError(where, f"unknown ggml type {entry.dtype!r}") from None
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim == 0 or blocks.shape[-1] != entry.row_bytes:
        raise WeightsmithError(
            where,
            f"expected uint8 rows of {entry.row_bytes} bytes, got {blocks.dtype} {blocks.shape}",
        )
    try:
        values = _reference_dequantize(np.ascontiguousarray(blocks), qtype)
    except NotImplementedError:
        raise WeightsmithError(where, f"the installed gguf package cannot dequantise ggml type {qtype.name}") from None
    return values.astype(np.float32, copy=False)


def metadata_json(container: Container) -> dict:
    """The container's metadata as strict JSON values.

    Metadata is already made of dicts, lists, strings, ints, floats and bools; the one thing
    strict JSON lacks is non-finite floats, written here as the strings "NaN", "Infinity" and
    "-Infinity" (the convention Zarr v3 uses).

    Args:
        container: A container from `parse_gguf`.

    Returns:
        A new dict that `json.dumps(..., allow_nan=False)` accepts.
    """
    return {key: _strict_json(value) for key, value in container.metadata.items()}


def _strict_json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    return value


def _read_preamble(head: _Header) -> tuple[int, int, int]:
    """Magic, version and the two counts, each checked."""
    head.need(4, "magic")
    magic = head.buf[:4]
    if magic != MAGIC:
        raise head.error(f"bad magic {magic!r}: not a GGUF file (expected {MAGIC!r})")
    head.pos = 4
    version = head.u32("version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise head.error(f"unsupported GGUF version {version}{hint}: only versions 2 and 3 are read")
    n_tensors = head.u64("tensor count")
    n_kv = head.u64("key-value count")
    # Counts are bounded by what the rest of the file could hold, so a corrupt count fails
    # here instead of driving a loop for 2**64 iterations.
    if n_tensors * _MIN_TENSOR_INFO_BYTES > head.left():
        raise head.error(f"tensor count {n_tensors} cannot fit in a file of {head.size} bytes")
    if n_kv * _MIN_KV_BYTES > head.left():
        raise head.error(f"key-value count {n_kv} cannot fit in a file of {head.size} bytes")
    return version, n_tensors, n_kv


def _read_metadata(head: _Header, n_kv: int) -> tuple[dict, dict[str, int]]:
    """The key-values (JSON-able) and each key's value type."""
    metadata: dict = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = head.name(f"metadata key #{i}")
        if key in metadata:
            raise head.error(f"duplicate metadata key {key!r}")
        vtype = head.u32(f"value type of metadata key {key!r}")
        metadata[key] = _read_value(head, vtype, key, depth=0)
        types[key] = vtype
    return metadata, types


def _read_value(head: _Header, vtype: int, key: str, depth: int) -> object:
    """One metadata value of type `vtype`."""
    scalar = _SCALARS.get(vtype)
    if scalar is not None:
        value = head.unpack(scalar[0], f"value of metadata key {key!r}")
        return bool(value) if vtype == _T_BOOL else value
    if vtype == _T_STRING:
        return head.text(f"value of metadata key {key!r}")
    if vtype == _T_ARRAY:
        return _read_array(head, key, depth)
    raise head.error(_bad_type(vtype, key))


def _read_array(head: _Header, key: str, depth: int) -> list:
    """An array value: u32 item type, u64 count, items (arrays may nest)."""
    if depth >= MAX_ARRAY_DEPTH:
        raise head.error(f"metadata key {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    itype = head.u32(f"array item type of metadata key {key!r}")
    if itype not in _MIN_ITEM_BYTES:
        raise head.error(_bad_type(itype, key))
    count = head.u64(f"array length of metadata key {key!r}")
    if count * _MIN_ITEM_BYTES[itype] > head.left():
        raise head.error(
            f"metadata key {key!r}: array of {count} items cannot fit in the {head.left()} bytes left in the file"
        )
    if itype == _T_STRING:
        return head.strings(count, f"metadata key {key!r}")
    if itype == _T_ARRAY:
        return [_read_array(head, key, depth + 1) for _ in range(count)]
    values = head.numbers(_SCALARS[itype][1], count, f"array of metadata key {key!r}")
    return [v != 0 for v in values] if itype == _T_BOOL else values


def _bad_type(vtype: int, key: str) -> str:
    return f"metadata key {key!r}: metadata value type {vtype} is not a GGUF value type (0..12)"


def _read_tensor_infos(head: _Header, n_tensors: int) -> list[tuple[str, list[int], int, int]]:
    """(name, dims ne0 first, raw ggml type, relative offset) of each tensor, in file order."""
    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = head.name(f"name of tensor #{i}")
        if name in seen:
            raise head.error(f"duplicate tensor name {name!r}")
        seen.add(name)
        n_dims = head.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise head.error(f"tensor {name!r}: n_dims {n_dims} is not between 1 and {MAX_DIMS}")
        head.need(8 * n_dims, f"dims of tensor {name!r}")
        dims = list(struct.unpack_from(f"<{n_dims}Q", head.buf, head.pos))
        head.pos += 8 * n_dims
        raw_type = head.u32(f"ggml type of tensor {name!r}")
        offset = head.u64(f"data offset of tensor {name!r}")
        infos.append((name, dims, raw_type, offset))
    return infos


def _alignment(head: _Header, metadata: dict, types: dict[str, int]) -> int:
    """`general.alignment`: a non-zero power of two stored as u32, 32 when absent."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    if types["general.alignment"] != _T_UINT32:
        raise head.error(f"general.alignment has value type {types['general.alignment']}, expected uint32 (4)")
    alignment = metadata["general.alignment"]
    if alignment == 0 or alignment & (alignment - 1):
        raise head.error(f"general.alignment {alignment} is not a power of two")
    return alignment


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _entry(
    head: _Header,
    info: tuple[str, list[int], int, int],
    container: int,
    data_start: int,
    alignment: int,
) -> TensorEntry:
    """One tensor info checked and turned into an entry with absolute offsets."""
    name, dims, raw_type, offset = info
    try:
        gtype = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[gtype]
    except (ValueError, KeyError):
        raise head.error(f"tensor {name!r}: unknown ggml type {raw_type}") from None
    # ggml keeps every dim, and the product of dims, within int64.
    if (
        any(d > _INT64_MAX for d in dims)
        or -(-math.prod(max(d, 1) for d in dims) // block_size) * type_size > _INT64_MAX
    ):
        raise head.error(f"tensor {name!r}: dims {dims} overflow int64")
    if dims[0] % block_size:
        raise head.error(
            f"tensor {name!r}: row length {dims[0]} is not a multiple of the {gtype.name} block size {block_size}"
        )
    if offset % alignment:
        raise head.error(f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {alignment}")
    nbytes = math.prod(dims) // block_size * type_size
    start = data_start + offset
    end = start + nbytes
    if end > head.size:
        raise head.error(f"truncated: tensor {name!r} needs bytes [{start}, {end}) but the file has {head.size} bytes")
    shape = tuple(reversed(dims))  # GGUF lists ne0 (the fastest axis) first
    raw = _RAW_TYPES.get(gtype)
    if raw is not None:
        return TensorEntry(name, raw, shape, container, start, end)
    row_bytes = shape[-1] // block_size * type_size
    return TensorEntry(name, gtype.name, shape, container, start, end, "gguf", row_bytes)


def _check_layout(head: _Header, entries: list[TensorEntry]) -> None:
    """Tensors must not overlap (they already lie inside the file)."""
    ordered = sorted(entries, key=lambda e: (e.start, e.end))
    for prev, cur in pairwise(ordered):
        if cur.start < prev.end:
            raise head.error(
                f"tensors {prev.name!r} [{prev.start}, {prev.end}) and {cur.name!r} [{cur.start}, {cur.end}) overlap"
            )


def _segments(size: int, data_start: int, entries: list[TensorEntry]) -> tuple[Segment, ...]:
    """Header, tensors, padding gaps and trailing bytes: [0, size) exactly, in file order."""
    segments: list[Segment] = []
    # A file without tensors may end before the padded data start; clamp to the file.
    pos = min(data_start, size)
    if pos:
        segments.append(Segment(0, pos))
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start > pos:
            segments.append(Segment(pos, entry.start))
        segments.append(Segment(entry.start, entry.end, tensor=entry.name))
        pos = entry.end
    if pos < size:
        segments.append(Segment(pos, size))
    return tuple(segments)
