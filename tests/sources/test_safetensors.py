"""safetensors sources: malformed headers are one-line errors naming the file, and every
safetensors dtype goes through extract -> store -> restore bit for bit.

Files are written by hand here (8-byte length, JSON, data) so that every byte is known; the
reference library's own parser (`safetensors.deserialize`) checks the valid ones and, where it
has an opinion, agrees that the malformed ones are malformed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors._safetensors_rust import SafetensorError
from safetensors._safetensors_rust import deserialize as reference_deserialize

from weightsmith import dtypes
from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import parse_model_url
from weightsmith.restore import restore
from weightsmith.sources import open_source
from weightsmith.store import arrays
from weightsmith.verify import verify


@pytest.fixture(autouse=True)
def _state_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the state folder (staged TIFFs of S3 stores, caches) out of the working directory."""
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path_factory.mktemp("weightsmith-home")))


def safetensors_bytes(header: dict | bytes, data: bytes = b"", pad: bool = True) -> bytes:
    """A safetensors file: length, header JSON (spaces to 8 bytes, as the reference pads), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensor(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


# ---------------------------------------------------------------------------------------------
# malformed headers

# id -> (file bytes, fragment of the message, does the reference library reject it too?)
MALFORMED: dict[str, tuple[bytes, str, bool]] = {
    "unknown-dtype": (
        safetensors_bytes({"w": tensor("F4X", [2], [0, 2])}, b"\0\0"),
        "unknown dtype 'F4X'",
        True,
    ),
    "overlapping-offsets": (
        safetensors_bytes({"a": tensor("F32", [2], [0, 8]), "b": tensor("F32", [2], [4, 12])}, bytes(12)),
        "overlaps the previous tensor",
        True,
    ),
    "duplicate-field": (
        safetensors_bytes(b'{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"),
        "duplicate field 'dtype'",
        True,
    ),
    "non-string-metadata": (
        safetensors_bytes({"__metadata__": {"bits": 4}, "w": tensor("U8", [1], [0, 1])}, b"\0"),
        "__metadata__ must map strings to strings",
        True,
    ),
    "metadata-not-a-map": (
        safetensors_bytes({"__metadata__": ["a"], "w": tensor("U8", [1], [0, 1])}, b"\0"),
        "__metadata__ must map strings to strings",
        True,
    ),
    "trailing-uncovered-bytes": (
        safetensors_bytes({"w": tensor("U8", [1], [0, 1])}, b"\0\0\0"),
        "2 bytes after the last tensor are not covered",
        True,
    ),
    "offsets-not-starting-at-0": (
        safetensors_bytes({"w": tensor("U8", [1], [1, 2])}, b"\0\0"),
        "leaves a gap",
        True,
    ),
    "gap-between-tensors": (
        safetensors_bytes({"a": tensor("U8", [1], [0, 1]), "b": tensor("U8", [1], [2, 3])}, bytes(3)),
        "tensor 'b' at data offset 2 leaves a gap",
        True,
    ),
    "size-mismatch": (
        safetensors_bytes({"w": tensor("F32", [3], [0, 8])}, bytes(8)),
        "needs 12",
        True,
    ),
    "truncated-data": (
        safetensors_bytes({"w": tensor("F32", [4], [0, 16])}, bytes(8)),
        "truncated",
        True,
    ),
    "missing-entry-key": (
        safetensors_bytes({"w": {"dtype": "U8", "shape": [1]}}, b"\0"),
        "must have dtype, shape and data_offsets",
        True,
    ),
    "reversed-offsets": (
        safetensors_bytes({"w": tensor("U8", [0], [1, 0])}, b"\0"),
        "data_offsets must be [begin, end]",
        True,
    ),
    "negative-shape": (
        safetensors_bytes({"w": tensor("U8", [-1], [0, 1])}, b"\0"),
        "shape must be a list of non-negative integers",
        True,
    ),
    "bool-shape": (
        safetensors_bytes({"w": tensor("U8", [True], [0, 1])}, b"\0"),
        "shape must be a list of non-negative integers",
        True,
    ),
    "header-is-an-array": (safetensors_bytes(b"[1,2]"), "not a JSON object", True),
    "header-not-json": (safetensors_bytes(b'{"w": '), "not valid JSON", True),
    "header-not-utf8": (safetensors_bytes(b'{"\xff":1}'), "not valid UTF-8", True),
    "shorter-than-8-bytes": (b"\x01\x00", "no header length", True),
    "header-length-too-large": (struct.pack("<Q", 200_000_000) + b"{}", "exceeds", True),
    "header-length-past-end": (struct.pack("<Q", 1000) + b"{}      ", "runs past the end", True),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_a_one_line_error_naming_the_file(tmp_path: Path, case: str) -> None:
    data, fragment, _ = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(WeightsmithError) as excinfo:
        open_source(str(path))
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert fragment in message


@pytest.mark.parametrize("case", sorted(c for c, (_, _, ref) in MALFORMED.items() if ref))
def test_reference_library_rejects_the_same_files(case: str) -> None:
    """The malformed cases are not invented: safetensors itself refuses them too."""
    with pytest.raises(SafetensorError):
        reference_deserialize(MALFORMED[case][0])


def test_malformed_shard_names_the_shard(tmp_path: Path) -> None:
    good = safetensors_bytes({"a": tensor("U8", [2], [0, 2])}, b"\1\2")
    bad = MALFORMED["trailing-uncovered-bytes"][0]
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(good)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(bad)
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "w": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsmithError) as excinfo:
        open_source(str(tmp_path))
    assert str(excinfo.value).startswith(f"{tmp_path / 'model-00002-of-00002.safetensors'}: ")


# ---------------------------------------------------------------------------------------------
# every dtype, exactly


def every_dtype_values() -> dict[str, tuple[str, np.ndarray]]:
    """name -> (safetensors dtype, values) with the awkward values of each dtype."""
    f32_nan_payload = np.array([0x7FC00001, 0xFFC12345, 0x80000000, 0x00000001], "<u4").view("<f4")
    return {
        # every bit pattern of the 16-bit and 8-bit floats: NaNs, infinities, subnormals
        "f16.all_bits": ("F16", np.arange(1 << 16, dtype="<u2").view("<f2").reshape(256, 256)),
        "bf16.all_bits": (
            "BF16",
            np.arange(1 << 16, dtype="<u2").view(ml_dtypes.bfloat16).reshape(256, 16, 16),
        ),
        "f8_e4m3.all_bits": (
            "F8_E4M3",
            np.arange(256, dtype="u1").view(ml_dtypes.float8_e4m3fn).reshape(16, 16),
        ),
        "f8_e5m2.all_bits": (
            "F8_E5M2",
            np.arange(256, dtype="u1").view(ml_dtypes.float8_e5m2).reshape(16, 16),
        ),
        "f64": ("F64", np.array([0.0, -0.0, 1.5, np.inf, -np.inf, np.nan, 1e300, 5e-324], "<f8")),
        "f32": (
            "F32",
            np.concatenate([np.array([0.0, -0.0, 3.25, np.inf, 1e-45], "<f4"), f32_nan_payload]).reshape(3, 3),
        ),
        "i64": ("I64", np.array([np.iinfo("i8").min, -1, 0, np.iinfo("i8").max], "<i8")),
        "i32": ("I32", np.array([[np.iinfo("i4").min, -1], [0, np.iinfo("i4").max]], "<i4")),
        "i16": ("I16", np.array([np.iinfo("i2").min, -1, 0, np.iinfo("i2").max], "<i2")),
        "i8": ("I8", np.arange(-128, 128, dtype="i1").reshape(2, 8, 16)),
        "u64": ("U64", np.array([0, 1, 2**53 + 1, np.iinfo("u8").max], "<u8")),
        "u32": ("U32", np.array([0, 1, np.iinfo("u4").max], "<u4")),
        "u16": ("U16", np.array([0, 1, np.iinfo("u2").max], "<u2")),
        "u8": ("U8", np.arange(256, dtype="u1").reshape(16, 16)),
        "bool": ("BOOL", np.array([[True, False, True], [False, False, True]])),
        "scalar": ("F32", np.array(2.5, "<f4")),
    }


def write_every_dtype(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Write the tensors with data in reverse name order (not the header's key order) and a
    metadata entry: restore must keep exactly this layout."""
    values = every_dtype_values()
    header: dict = {"__metadata__": {"format": "np", "note": "every dtype"}}
    chunks, offset = [], 0
    for name in sorted(values, reverse=True):
        dtype, array = values[name]
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = tensor(dtype, list(array.shape), [offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    path.write_bytes(safetensors_bytes(header, b"".join(chunks)))
    return values


def test_every_dtype_file_is_valid_for_the_reference_library(tmp_path: Path) -> None:
    path = tmp_path / "every_dtype.safetensors"
    values = write_every_dtype(path)
    parsed = dict(reference_deserialize(path.read_bytes()))
    assert set(parsed) == set(values)
    assert {spec["dtype"] for spec in parsed.values()} == set(dtypes.SAFETENSORS_DTYPES)
    for name, (dtype, array) in values.items():
        assert parsed[name]["dtype"] == dtype
        assert bytes(parsed[name]["data"]) == array.tobytes()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # F64 1e300 -> inf in the images
def test_every_dtype_round_trips_bit_for_bit(tmp_path: Path) -> None:
    path = tmp_path / "every-dtype" / "model.safetensors"
    path.parent.mkdir()
    values = write_every_dtype(path)
    result = extract(str(path), ExtractOptions(store=str(tmp_path / "store")))
    assert result.tensors == len(values)

    out = tmp_path / "restored.safetensors"
    assert restore(result.model_url, str(out)) == [str(out)]
    assert out.read_bytes() == path.read_bytes()
    report = verify(result.model_url)
    assert report.ok, report.problems

    model = parse_model_url(result.model_url)
    manifest = model.manifest()
    for name, (dtype, expected) in values.items():
        record = manifest["tensors"][name]
        assert (record["dtype"], record["shape"]) == (dtype, list(expected.shape))
        key = record["artifacts"]["zarr"]
        got = arrays.read_exact(model.store, key)
        assert got.dtype == dtypes.numpy_dtype(dtype), name
        assert got.shape == expected.shape
        assert got.tobytes() == expected.tobytes(), name  # NaN payloads and -0.0 included
        stored = arrays.open_array(model.store, key)
        assert stored.dtype == dtypes.storage_dtype(dtype)
        assert stored.attrs["dtype"] == dtype
    bf16 = arrays.open_array(model.store, manifest["tensors"]["bf16.all_bits"]["artifacts"]["zarr"])
    assert bf16.dtype == np.dtype("<u2")
    assert np.array_equal(bf16[...].ravel(), np.arange(1 << 16, dtype="<u2"))


def test_header_bytes_are_kept_verbatim(tmp_path: Path) -> None:
    """Unpadded headers, odd whitespace and key order are restored exactly as they were."""
    header = (
        b'{ "b" : {"shape":[2],"dtype":"U8","data_offsets":[2,4]},\n'
        b' "__metadata__":{"z":"1","a":"2"}, "a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]} }'
    )
    path = tmp_path / "odd" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(safetensors_bytes(header, b"\1\2\3\4", pad=False))
    assert len(header) % 8 != 0
    reference_deserialize(path.read_bytes())
    result = extract(str(path), ExtractOptions(store=str(tmp_path / "store"), images="none"))
    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == path.read_bytes()


def test_parse_covers_the_file_in_offset_order(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_every_dtype(path)
    source = open_source(str(path))
    (container,) = source.containers
    assert container.size == path.stat().st_size
    pos = 0
    for segment in container.segments:
        assert segment.start == pos
        pos = segment.end
    assert pos == container.size
    assert container.segments[0].tensor is None
    assert [s.tensor for s in container.segments[1:]] == sorted(every_dtype_values(), reverse=True)
    assert container.metadata == {"format": "np", "note": "every dtype"}
    assert source.bytes_read == container.segments[0].end  # the header only


@pytest.mark.parametrize("images", ["all", "preview", "none"])
@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0)])
def test_empty_tensor_round_trips(tmp_path: Path, shape: tuple, images: str) -> None:
    """safetensors allows tensors with no elements; extracting them must not crash, whatever
    the images option (an image needs at least one pixel, so an empty tensor gets none)."""
    path = tmp_path / "empty" / "model.safetensors"
    path.parent.mkdir()
    header = {"empty": tensor("F32", list(shape), [0, 0]), "x": tensor("U8", [2], [0, 2])}
    path.write_bytes(safetensors_bytes(header, b"\1\2"))
    reference_deserialize(path.read_bytes())
    result = extract(str(path), ExtractOptions(store=str(tmp_path / "store"), images=images))
    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == path.read_bytes()
    assert verify(result.model_url).ok
    record = parse_model_url(result.model_url).manifest()["tensors"]["empty"]
    assert record["shape"] == list(shape)
    assert record["stats"]["nan"] == 0 and record["stats"]["mean"] is None
    again = extract(str(path), ExtractOptions(store=str(tmp_path / "store"), images=images))
    assert (again.status, again.written) == ("unchanged", 0)
