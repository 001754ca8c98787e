"""GGUF parsing over the ranged reader, checked against gguf-py's own reader and dequantiser.

Real files come from the shared fixtures (written by llama.cpp tooling, never by this project);
synthetic ones are written here with gguf-py's `GGUFWriter` or made by corrupting a copy of a
good file in tmp_path.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import fixture_paths
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from weightsmith import dtypes
from weightsmith.errors import WeightsmithError
from weightsmith.ranged import open_reader
from weightsmith.sources.base import TensorEntry
from weightsmith.sources.gguf import dequantize, metadata_json, parse_gguf

FIXTURES = fixture_paths.FIXTURES
TINY_LLAMA = FIXTURES / "gguf" / "ollama_llama-2-tiny-random.gguf"
MULTIQUANT = FIXTURES / "gguf" / "derived_multiquant_real_blocks.gguf"


def _parse(path: Path):
    reader = open_reader(str(path))
    container, entries = parse_gguf(reader, 3, path.name)
    return reader, container, entries


def _assert_matches_reference(path: Path) -> None:
    """Names, shapes, byte ranges, key-values and every value agree with gguf.GGUFReader."""
    _, container, entries = _parse(path)
    ref = gguf.GGUFReader(path)
    data = path.read_bytes()

    assert [e.name for e in entries] == [t.name for t in ref.tensors]
    for entry, t in zip(entries, ref.tensors, strict=True):
        assert entry.container == 3
        assert entry.shape == tuple(reversed(t.shape.tolist()))
        assert (entry.start, entry.end) == (t.data_offset, t.data_offset + t.n_bytes)
        raw = data[entry.start : entry.end]
        if entry.encoding == "raw":
            assert entry.dtype == t.tensor_type.name and entry.row_bytes == 0
            values = dtypes.from_bytes(raw, entry.dtype, entry.shape)
            expected = np.asarray(t.data).view(dtypes.numpy_dtype(entry.dtype))
            np.testing.assert_array_equal(values, expected.reshape(entry.shape))
        else:
            assert entry.encoding == "gguf" and entry.dtype == t.tensor_type.name
            blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, entry.row_bytes)
            values = dequantize(entry, blocks)
            expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert values.dtype == np.float32
            assert values.shape == (entry.numel // entry.shape[-1], entry.shape[-1])
            np.testing.assert_array_equal(values, expected.reshape(values.shape))

    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    own = {k: v for k, v in container.metadata.items() if not k.startswith("gguf.")}
    assert list(own) == list(ref_fields)
    for key, field in ref_fields.items():
        value = own[key]
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[1:2] == [gguf.GGUFValueType.ARRAY]:
            value = _flatten(value)  # gguf-py flattens nested arrays
        np.testing.assert_equal(value, field.contents(), err_msg=key)  # NaN == NaN here
        assert type(value) is type(field.contents()), key
    assert container.metadata["gguf.version"] == int(ref.fields["GGUF.version"].contents())
    assert container.metadata["gguf.alignment"] == ref.alignment
    _assert_segments_rebuild(container, entries, data)


def _assert_segments_rebuild(container, entries: list[TensorEntry], data: bytes) -> None:
    """Segments tile [0, size) in order, name each tensor once, and rebuild the file."""
    assert container.size == len(data) and container.format == "gguf"
    segments = container.segments
    assert segments[0].start == 0 and segments[-1].end == len(data)
    for prev, cur in zip(segments, segments[1:], strict=False):
        assert prev.end == cur.start
    assert all(s.start < s.end for s in segments if s.tensor is None)
    by_name = {e.name: e for e in entries}
    tensors = [s for s in segments if s.tensor is not None]
    assert sorted(s.tensor for s in tensors) == sorted(by_name)
    for s in tensors:
        assert (s.start, s.end) == (by_name[s.tensor].start, by_name[s.tensor].end)
    assert b"".join(data[s.start : s.end] for s in segments) == data


def _flatten(value: list) -> list:
    return [x for v in value for x in (_flatten(v) if isinstance(v, list) else [v])]


# -- real files -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [TINY_LLAMA, MULTIQUANT], ids=lambda p: p.name)
def test_matches_gguf_reader(path: Path) -> None:
    _assert_matches_reference(path)


def test_container_fields_and_types() -> None:
    _, container, entries = _parse(MULTIQUANT)
    assert container.name == MULTIQUANT.name
    assert container.url == str(MULTIQUANT)
    assert container.metadata["general.architecture"] == "llama"
    assert {e.dtype for e in entries} >= {"Q4_K", "IQ2_XXS", "TQ1_0", "MXFP4", "IQ1_M"}
    assert all(e.encoding == "gguf" and e.shape == (256, 256) for e in entries)
    q8 = next(e for e in entries if e.dtype == "Q8_0")
    assert q8.row_bytes == 256 // 32 * 34


def test_reads_only_the_header() -> None:
    reader, container, _ = _parse(MULTIQUANT)
    assert container.segments[0].end == 1376  # the header; ~700 KB of tensor data follow
    assert reader.bytes_read <= 64 * 1024 < reader.size // 8

    reader, container, _ = _parse(TINY_LLAMA)  # a 724 KB header (32k-token vocabulary)
    assert container.segments[0].end <= reader.bytes_read < reader.size
    assert len(container.metadata["tokenizer.ggml.tokens"]) == 32000


def test_metadata_json_is_strict_json() -> None:
    _, container, _ = _parse(TINY_LLAMA)
    text = json.dumps(metadata_json(container), allow_nan=False)
    assert json.loads(text)["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]


# -- files written here with the reference writer ---------------------------------------------


def _write_gguf(path: Path, *, alignment: int | None = None, tensors: bool = True) -> None:
    w = gguf.GGUFWriter(path, "test")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_int32("t.i32", -70000)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**40))
    w.add_float32("t.f32", float("nan"))
    w.add_float64("t.f64", 1.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.floats", [0.5, float("inf")])
    w.add_array("t.nested", [[1, 2], [3]])
    if tensors:
        rng = np.random.default_rng(0)
        w.add_tensor("f64", rng.standard_normal((2, 3, 4)))
        w.add_tensor("i8", np.arange(-6, 6, dtype=np.int8).reshape(1, 2, 2, 3))
        w.add_tensor("i16", np.arange(5, dtype=np.int16))
        w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(3, 2))
        w.add_tensor("i64", np.arange(4, dtype=np.int64))
        bf16 = rng.standard_normal((4, 8)).astype(np.float32).view(np.uint32) >> 16
        w.add_tensor("bf16", bf16.astype(np.uint16), raw_dtype=GGMLQuantizationType.BF16)
        q = gguf.quants.quantize(rng.standard_normal((3, 2, 64)).astype(np.float32), _Q8)
        w.add_tensor("q8", q, raw_dtype=_Q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_Q8 = GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("alignment", [None, 64])
def test_reference_writer_file(tmp_path: Path, alignment: int | None) -> None:
    path = tmp_path / "w.gguf"
    _write_gguf(path, alignment=alignment)
    _assert_matches_reference(path)
    _, container, entries = _parse(path)
    assert container.metadata["gguf.alignment"] == (alignment or 32)
    assert {e.name: e.dtype for e in entries if e.encoding == "raw"} == {
        "f64": "F64",
        "i8": "I8",
        "i16": "I16",
        "i32": "I32",
        "i64": "I64",
        "bf16": "BF16",
    }
    q8 = next(e for e in entries if e.name == "q8")
    assert (q8.shape, q8.dtype, q8.row_bytes) == ((3, 2, 64), "Q8_0", 68)
    assert all(e.start % (alignment or 32) == 0 for e in entries)
    # the writer pads small tensors up to the alignment: those gaps are opaque segments
    assert sum(s.tensor is None for s in container.segments) > 1
    assert container.metadata["t.nested"] == [[1, 2], [3]]
    assert container.metadata["t.u64"] == 2**63 + 5
    strict = json.loads(json.dumps(metadata_json(container), allow_nan=False))
    assert strict["t.f32"] == "NaN" and strict["t.floats"] == [0.5, "Infinity"]


def test_trailing_bytes_and_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "tail.gguf"
    _write_gguf(path)
    path.write_bytes(path.read_bytes() + b"trailing")
    _, container, entries = _parse(path)
    assert container.segments[-1].tensor is None
    _assert_segments_rebuild(container, entries, path.read_bytes())

    path = tmp_path / "empty.gguf"
    _write_gguf(path, tensors=False)
    _, container, entries = _parse(path)
    assert entries == []
    _assert_segments_rebuild(container, entries, path.read_bytes())


# -- bad files --------------------------------------------------------------------------------

BAD = {
    "ollama_test_truncated_6B.gguf": "truncated",
    "llamacpp_example_draft_2023-07.gguf": "magic",
    "llamacpp_test_writer_pr_2024-02.gguf": "value type 13",
    "third_party_safetensors_abuse_attempt_1.safetensors": "magic",
}


def test_every_bad_gguf_fixture_is_listed() -> None:
    assert {p.name for p in (FIXTURES / "bad").glob("*.gguf")} <= set(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_fixture(name: str) -> None:
    path = FIXTURES / "bad" / name
    with pytest.raises(WeightsmithError) as info:
        _parse(path)
    assert str(path) in str(info.value)
    assert BAD[name] in str(info.value)
    assert "\n" not in str(info.value)


def _kv_value_at(data: bytes, key: str) -> int:
    """Offset of the value type u32 of metadata key `key`."""
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def _tensor_info_at(data: bytes, name: str) -> int:
    """Offset of the n_dims u32 of tensor `name` (its dims, type and offset follow)."""
    return _kv_value_at(data, name)


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def _corrupt_multiquant(data: bytes, kind: str) -> bytes:
    first = _tensor_info_at(data, "mistral_7b_iq1_m")  # n_dims, 2 dims, type, offset
    second = _tensor_info_at(data, "mistral_7b_iq1_s")
    if kind == "truncated_data":
        return data[:-1000]
    if kind == "unknown_type":
        return _patch(data, first + 20, "<I", 99)
    if kind == "misaligned":
        return _patch(data, second + 24, "<Q", struct.unpack_from("<Q", data, second + 24)[0] + 1)
    if kind == "overlap":
        return _patch(data, second + 24, "<Q", 0)
    if kind == "n_dims":
        return _patch(data, first, "<I", 5)
    if kind == "row_not_blocks":
        return _patch(data, first + 4, "<Q", 100)
    if kind == "huge_dims":
        return _patch(_patch(data, first + 4, "<Q", 2**63), first + 12, "<Q", 2**40)
    if kind == "huge_offset":
        return _patch(data, second + 24, "<Q", 2**64 - 32)
    if kind == "duplicate_tensor":
        return data.replace(b"mistral_7b_iq1_s", b"mistral_7b_iq1_m", 1)
    if kind == "bad_utf8_name":
        return data.replace(b"mistral_7b_iq1_s", b"\xffistral_7b_iq1_s", 1)
    if kind == "huge_string":
        return _patch(data, _kv_value_at(data, "general.name") + 4, "<Q", 2**63)
    if kind == "huge_tensor_count":
        return _patch(data, 8, "<Q", 2**62)
    if kind == "huge_kv_count":
        return _patch(data, 16, "<Q", 2**64 - 1)
    if kind == "version_1":
        return _patch(data, 4, "<I", 1)
    if kind == "big_endian":
        return _patch(data, 4, ">I", 3)
    if kind == "value_type_13":
        return _patch(data, _kv_value_at(data, "general.name"), "<I", 13)
    raise AssertionError(kind)


MULTIQUANT_CORRUPTIONS = {
    "truncated_data": "truncated: tensor 'tinyllama_q5_0'",
    "unknown_type": "unknown ggml type 99",
    "misaligned": "not a multiple of the alignment",
    "overlap": "overlap",
    "n_dims": "n_dims 5",
    "row_not_blocks": "block size",
    "huge_dims": "overflow",
    "huge_offset": "truncated",
    "duplicate_tensor": "duplicate tensor name",
    "bad_utf8_name": "not valid UTF-8",
    "huge_string": "truncated",
    "huge_tensor_count": "tensor count",
    "huge_kv_count": "key-value count",
    "version_1": "version 1",
    "big_endian": "big-endian",
    "value_type_13": "metadata value type 13",
}


@pytest.mark.parametrize("kind", sorted(MULTIQUANT_CORRUPTIONS))
def test_corrupted_multiquant(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.gguf"
    path.write_bytes(_corrupt_multiquant(MULTIQUANT.read_bytes(), kind))
    with pytest.raises(WeightsmithError) as info:
        _parse(path)
    assert str(path) in str(info.value)
    assert MULTIQUANT_CORRUPTIONS[kind] in str(info.value)


def _corrupt_llama(data: bytes, kind: str) -> bytes:
    tokens = _kv_value_at(data, "tokenizer.ggml.tokens")  # type 9, item type 8, u64 count
    if kind == "huge_array":
        return _patch(data, tokens + 8, "<Q", 2**62)
    if kind == "array_item_type":
        return _patch(data, tokens + 4, "<I", 13)
    if kind == "huge_token":
        return _patch(data, tokens + 16, "<Q", 2**40)
    if kind == "duplicate_key":
        return data.replace(b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.bos_token_id")
    raise AssertionError(kind)


LLAMA_CORRUPTIONS = {
    "huge_array": "array of 4611686018427387904 items cannot fit",
    "array_item_type": "metadata value type 13",
    "huge_token": "truncated",
    "duplicate_key": "duplicate metadata key 'tokenizer.ggml.bos_token_id'",
}


@pytest.mark.parametrize("kind", sorted(LLAMA_CORRUPTIONS))
def test_corrupted_llama_metadata(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.gguf"
    path.write_bytes(_corrupt_llama(TINY_LLAMA.read_bytes(), kind))
    reader = open_reader(str(path))
    with pytest.raises(WeightsmithError) as info:
        parse_gguf(reader, 0, path.name)
    assert LLAMA_CORRUPTIONS[kind] in str(info.value)
    if kind in ("huge_array", "huge_token"):
        assert reader.bytes_read <= 64 * 1024  # failed on the count, before fetching more


def _alignment_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.gguf"
    _write_gguf(path, alignment=64)
    data = path.read_bytes()
    at = _kv_value_at(data, "general.alignment")
    if kind == "not_power_of_two":
        data = _patch(data, at + 4, "<I", 48)
    elif kind == "zero":
        data = _patch(data, at + 4, "<I", 0)
    else:
        data = _patch(data, at, "<I", 5)  # int32: same width, wrong type
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("kind", "word"),
    [("not_power_of_two", "power of two"), ("zero", "power of two"), ("int32", "uint32")],
)
def test_bad_alignment(tmp_path: Path, kind: str, word: str) -> None:
    with pytest.raises(WeightsmithError, match=word):
        _parse(_alignment_file(tmp_path, kind))


def test_random_damage_raises_only_weightsmith_errors(tmp_path: Path) -> None:
    """Flipped header bytes and cut files either parse consistently or fail cleanly."""
    good = MULTIQUANT.read_bytes()
    header_end = 1376
    rng = random.Random(1234)
    path = tmp_path / "fuzz.gguf"
    for i in range(300):
        data = bytearray(good)
        if i % 4 == 0:
            data = data[: rng.randrange(0, header_end + 64)]
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(header_end)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            _, container, entries = _parse(path)
        except WeightsmithError as e:
            assert str(path) in str(e)
            continue
        _assert_segments_rebuild(container, entries, bytes(data))


# -- dequantize -------------------------------------------------------------------------------


def test_dequantize_rejects_misuse() -> None:
    raw = TensorEntry("a", "F32", (2, 4), 0, 0, 32)
    with pytest.raises(WeightsmithError, match="not GGUF block-quantised"):
        dequantize(raw, np.zeros((2, 16), dtype=np.uint8))
    q8 = TensorEntry("b", "Q8_0", (2, 32), 0, 0, 68, "gguf", 34)
    with pytest.raises(WeightsmithError, match="rows of 34 bytes"):
        dequantize(q8, np.zeros((2, 33), dtype=np.uint8))
    # Q8_K exists in ggml but gguf-py has no dequantiser for it.
    q8k = TensorEntry("c", "Q8_K", (1, 256), 0, 0, 292, "gguf", 292)
    with pytest.raises(WeightsmithError, match="cannot dequantise"):
        dequantize(q8k, np.zeros((1, 292), dtype=np.uint8))


def test_header_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header past the cap fails without fetching past it (the cap is 100 MB; lowered here)."""
    import weightsmith.sources.gguf as gguf_source

    monkeypatch.setattr(gguf_source, "MAX_HEADER_BYTES", 200_000)
    reader = open_reader(str(TINY_LLAMA))  # its header is 724 KB
    with pytest.raises(WeightsmithError, match="header larger than"):
        parse_gguf(reader, 0, TINY_LLAMA.name)
    assert reader.bytes_read <= 200_000
