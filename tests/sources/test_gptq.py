"""Tests for weightsmith.sources.gptq: grouping, settings, unpacking and dequantisation.

Real checks compare against GPTQModel's dequantised goldens in tests/fixtures/gptq; synthetic
round trips pack random integers with a deliberately naive bit-by-bit packer written here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import fixture_paths
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file

from weightsmith.errors import WeightsmithError
from weightsmith.sources.base import GptqGroup, TensorEntry
from weightsmith.sources.gptq import dequantize, find_groups

FIXTURES = fixture_paths.FIXTURES / "gptq"
REAL = ["llama_3_2_1b_int4", "llama_3_2_1b_gptqmodel_int8"]
PREFIX = "model.layers.0.mlp.gate_proj"
GOLDEN = f"{PREFIX}.weight_dequant_in_out"
WHERE = "s3://bucket/model.safetensors"

_DTYPE_NAMES = {np.dtype("int32"): "I32", np.dtype("float16"): "F16", np.dtype("float32"): "F32"}


# ---------------------------------------------------------------------------------------------
# helpers


def _header(path: Path) -> dict:
    """The safetensors JSON header: 8-byte little-endian length, then JSON."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _entries_from_file(path: Path) -> dict[str, TensorEntry]:
    header = _header(path)
    header.pop("__metadata__", None)
    return {name: TensorEntry(name, info["dtype"], tuple(info["shape"]), 0, 0, 0) for name, info in header.items()}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}


def _entries(tensors: dict[str, np.ndarray]) -> dict[str, TensorEntry]:
    return {name: TensorEntry(name, _DTYPE_NAMES[a.dtype], a.shape, 0, 0, 0) for name, a in tensors.items()}


def _pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ints [n, C] along axis 0, bit by bit: value i's bit b is stream bit i*bits + b of its
    column, and stream bit p is bit p % 32 of int32 word p // 32 (AutoGPTQ's layout, including
    3-bit values that straddle words)."""
    n, cols = values.shape
    words = np.zeros((-(-n * bits // 32), cols), dtype=np.uint64)
    for i in range(n):
        for b in range(bits):
            p = i * bits + b
            bit = (values[i].astype(np.uint64) >> np.uint64(b)) & np.uint64(1)
            words[p // 32] |= bit << np.uint64(p % 32)
    return words.astype(np.uint32).view(np.int32)


def _pad_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Zero rows up to a whole number of words (3-bit: of 3-word triples)."""
    unit = 32 if bits == 3 else 32 // bits
    n = values.shape[0]
    pad = -n % unit
    return np.concatenate([values, np.zeros((pad, values.shape[1]), values.dtype)])


def _quantise(
    rng: np.random.Generator,
    bits: int,
    in_f: int,
    out_f: int,
    group_size: int,
    fmt: str = "gptq",
    g_idx: str = "none",  # "none" | "ordered" | "act_order"
    prefix: str = "layer",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Random GPTQ tensors and the weight [out, in] they stand for."""
    maxq = (1 << bits) - 1
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    q = rng.integers(0, maxq + 1, size=(in_f, out_f))
    z = rng.integers(0, maxq + 1, size=(n_groups, out_f))
    z[0, :4] = [0, maxq, 0, maxq]  # v1 stores 0 as -1, i.e. maxq: the wrap-around case
    s = rng.uniform(0.001, 0.1, size=(n_groups, out_f)).astype(np.float16)
    groups = np.zeros(in_f, dtype=np.int64) if group_size == -1 else np.arange(in_f) // group_size
    if g_idx == "act_order":
        groups = rng.permutation(groups)
    stored_z = (z - 1) & maxq if fmt == "gptq" else z
    tensors = {
        f"{prefix}.qweight": _pack_stream(_pad_rows(q, bits), bits),
        f"{prefix}.qzeros": _pack_stream(_pad_rows(stored_z.T, bits), bits).T.copy(),
        f"{prefix}.scales": s,
    }
    if g_idx != "none":
        tensors[f"{prefix}.g_idx"] = groups.astype(np.int32)
    weight = (q.astype(np.float32) - z[groups].astype(np.float32)) * s[groups].astype(np.float32)
    return tensors, np.ascontiguousarray(weight.T)


def _dequantize_all(group: GptqGroup, t: dict[str, np.ndarray], rows: slice = slice(None)):
    g_idx = t[group.g_idx] if group.g_idx else None
    return dequantize(group, t[group.qweight], t[group.qzeros], t[group.scales], g_idx, rows)


def _config(bits: int, group_size: int, fmt: str) -> dict:
    return {"bits": bits, "group_size": group_size, "checkpoint_format": fmt}


# ---------------------------------------------------------------------------------------------
# real checkpoints


@pytest.mark.parametrize("model", REAL)
def test_real_slice_matches_gptqmodel_golden(model: str) -> None:
    path = FIXTURES / f"{model}.safetensors"
    meta = _metadata(path)
    groups = find_groups(_entries_from_file(path), None, meta, str(path))
    assert [g.prefix for g in groups] == [PREFIX]
    group = groups[0]
    assert group.bits == int(meta["bits"])
    assert group.group_size == int(meta["group_size"])
    assert group.checkpoint_format == "gptq"
    assert group.shape == (int(meta["out_features"]), int(meta["in_features"]))
    assert group.name == f"{PREFIX}.weight"

    tensors = load_file(str(path))
    weight = _dequantize_all(group, tensors)
    golden = load_file(str(FIXTURES / f"{model}.expected.safetensors"))[GOLDEN].T
    assert weight.dtype == np.float32 and weight.shape == golden.shape
    assert weight.flags.c_contiguous
    # the golden is BF16-rounded: within half a BF16 ulp (2**-8 relative) plus slack
    np.testing.assert_allclose(weight, golden, rtol=2**-7, atol=1e-6)

    band = _dequantize_all(group, tensors, slice(10, 50))
    np.testing.assert_array_equal(band, weight[10:50])


def test_real_slice_with_quant_config_overrides_metadata() -> None:
    path = FIXTURES / "llama_3_2_1b_int4.safetensors"
    meta = _metadata(path)
    # quantize_config.json wins over the metadata; bad metadata values are then never read
    meta = {**meta, "bits": "8", "group_size": "64", "checkpoint_format": "marlin"}
    config = {"bits": 4, "group_size": 128, "desc_act": False, "checkpoint_format": "gptq"}
    (group,) = find_groups(_entries_from_file(path), config, meta, str(path))
    assert (group.bits, group.group_size, group.checkpoint_format) == (4, 128, "gptq")


def test_real_slice_bits_inferred_without_settings() -> None:
    path = FIXTURES / "llama_3_2_1b_gptqmodel_int8.safetensors"
    (group,) = find_groups(_entries_from_file(path), None, {}, str(path))
    assert (group.bits, group.group_size, group.checkpoint_format) == (8, 128, "gptq")


def test_anamnesis_synthetic_file() -> None:
    path = FIXTURES / "anamnesis_gptq.safetensors"
    meta = _metadata(path)
    assert "bits" not in meta and "gptq_bits" in meta
    groups = find_groups(_entries_from_file(path), None, meta, str(path))
    assert [g.prefix for g in groups] == ["model.layers.0"]
    group = groups[0]
    assert group.bits == int(meta["gptq_bits"])
    assert group.group_size == int(meta["gptq_group_size"])
    weight = _dequantize_all(group, load_file(str(path)))
    assert weight.shape == group.shape == (32, 64)
    assert np.isfinite(weight).all()


# ---------------------------------------------------------------------------------------------
# synthetic round trips


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize(
    ("group_size", "g_idx"),
    [
        (32, "none"),
        (64, "none"),
        (-1, "none"),
        (32, "ordered"),
        (64, "act_order"),
        (-1, "ordered"),
    ],
)
def test_round_trip(bits: int, fmt: str, group_size: int, g_idx: str) -> None:
    rng = np.random.default_rng([bits, group_size % 97, len(g_idx), len(fmt)])
    in_f, out_f = 256, 96
    tensors, expected = _quantise(rng, bits, in_f, out_f, group_size, fmt, g_idx)
    (group,) = find_groups(_entries(tensors), _config(bits, group_size, fmt), {}, WHERE)
    assert group.shape == (out_f, in_f)
    assert group.g_idx == ("layer.g_idx" if g_idx != "none" else None)
    np.testing.assert_array_equal(_dequantize_all(group, tensors), expected)
    # bands that start and end inside packed words / 3-bit triples
    for rows in (slice(5, 77), slice(0, 1), slice(33, 96), slice(95, None), slice(-40, -3)):
        np.testing.assert_array_equal(_dequantize_all(group, tensors, rows), expected[rows])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_with_settings_inferred(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for g_idx in ("none", "act_order"):
        tensors, expected = _quantise(rng, bits, 128, 64, 32, "gptq", g_idx)
        (group,) = find_groups(_entries(tensors), None, {}, WHERE)
        assert (group.bits, group.group_size, group.checkpoint_format) == (bits, 32, "gptq")
        np.testing.assert_array_equal(_dequantize_all(group, tensors), expected)


def test_round_trip_in_features_not_a_multiple_of_the_packing() -> None:
    # g_idx gives the true input count; qweight rows are padded to whole 3-bit triples
    rng = np.random.default_rng(7)
    tensors, expected = _quantise(rng, 3, 100, 64, 25, "gptq_v2", "act_order")
    assert tensors["layer.qweight"].shape == (12, 64)
    (group,) = find_groups(_entries(tensors), _config(3, 25, "gptq_v2"), {}, WHERE)
    assert group.in_features == 100
    np.testing.assert_array_equal(_dequantize_all(group, tensors), expected)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    out_f=st.sampled_from([32, 64, 160]),
    data=st.data(),
)
def test_any_band_equals_rows_of_the_whole(bits: int, out_f: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(out_f * bits)
    tensors, expected = _quantise(rng, bits, 64, out_f, 32, "gptq", "act_order")
    (group,) = find_groups(_entries(tensors), _config(bits, 32, "gptq"), {}, WHERE)
    o0 = data.draw(st.integers(0, out_f))
    o1 = data.draw(st.integers(o0, out_f))
    band = _dequantize_all(group, tensors, slice(o0, o1))
    assert band.shape == (o1 - o0, 64)
    np.testing.assert_array_equal(band, expected[o0:o1])


def test_3bit_values_straddle_word_boundaries() -> None:
    # AutoGPTQ's 3-bit layout: value 10 = word 0 bits 30-31 + word 1 bit 0; value 21 = word 1
    # bit 31 + word 2 bits 0-1; value 22 starts at word 2 bit 2.
    q = np.zeros((32, 32), dtype=np.int64)
    q[10, 0], q[21, 1], q[22, 2] = 0b111, 0b111, 0b101
    packed = _pack_stream(q, 3).view(np.uint32)
    assert packed[:, 0].tolist() == [0xC0000000, 0x00000001, 0]
    assert packed[:, 1].tolist() == [0, 0x80000000, 0x00000003]
    assert packed[:, 2].tolist() == [0, 0, 0b101 << 2]
    tensors = {
        "l.qweight": packed.view(np.int32),
        "l.qzeros": np.zeros((1, 3), dtype=np.int32),  # v2 zeros of 0
        "l.scales": np.ones((1, 32), dtype=np.float16),
    }
    (group,) = find_groups(_entries(tensors), _config(3, -1, "gptq_v2"), {}, WHERE)
    np.testing.assert_array_equal(_dequantize_all(group, tensors), q.T.astype(np.float32))


def test_bias_and_other_tensors_are_not_grouped() -> None:
    rng = np.random.default_rng(1)
    tensors, _ = _quantise(rng, 4, 64, 32, 32, prefix="a.proj")
    more, _ = _quantise(rng, 4, 64, 32, 32, prefix="b.proj", g_idx="ordered")
    tensors.update(more)
    tensors["a.proj.bias"] = np.zeros(32, np.float16)
    tensors["norm.scales"] = np.zeros(32, np.float16)  # a lone `.scales` is not GPTQ
    groups = find_groups(_entries(tensors), None, {}, WHERE)
    assert [g.prefix for g in groups] == ["a.proj", "b.proj"]
    assert groups[0].components == ("a.proj.qweight", "a.proj.qzeros", "a.proj.scales")
    assert "a.proj.bias" not in groups[0].components


def test_no_gptq_tensors() -> None:
    entries = _entries({"w.weight": np.zeros((2, 2), np.float32)})
    assert find_groups(entries, {"quant_method": "awq"}, {"bits": "x"}, WHERE) == []


def test_metadata_settings_and_checkpoint_format() -> None:
    rng = np.random.default_rng(3)
    tensors, expected = _quantise(rng, 4, 128, 64, 64, "gptq_v2", "none")
    meta = {"gptq_bits": "4", "gptq_group_size": "64", "checkpoint_format": "gptq_v2"}
    (group,) = find_groups(_entries(tensors), None, meta, WHERE)
    assert (group.bits, group.group_size, group.checkpoint_format) == (4, 64, "gptq_v2")
    np.testing.assert_array_equal(_dequantize_all(group, tensors), expected)
    # "bits" beats "gptq_bits"; a descriptive format string is read by its first word
    meta = {"bits": "4", "gptq_bits": "8", "checkpoint_format": "gptq_v2 (zeros as stored)"}
    (group,) = find_groups(_entries(tensors), None, meta, WHERE)
    assert (group.bits, group.checkpoint_format) == (4, "gptq_v2")


def test_quant_config_overrides_metadata() -> None:
    rng = np.random.default_rng(4)
    tensors, expected = _quantise(rng, 8, 128, 32, 32, "gptq", "none")
    meta = {"bits": "4", "group_size": "128", "checkpoint_format": "gptq_v2"}
    config = {"quant_method": "gptq", "bits": "8", "group_size": 32, "checkpoint_format": "gptq"}
    (group,) = find_groups(_entries(tensors), config, meta, WHERE)
    assert (group.bits, group.group_size, group.checkpoint_format) == (8, 32, "gptq")
    np.testing.assert_array_equal(_dequantize_all(group, tensors), expected)


# ---------------------------------------------------------------------------------------------
# errors


def _valid_tensors() -> dict[str, np.ndarray]:
    tensors, _ = _quantise(np.random.default_rng(5), 4, 128, 64, 32, g_idx="ordered")
    return tensors


@pytest.mark.parametrize("missing", ["qweight", "qzeros", "scales"])
def test_partial_group_names_the_missing_tensor(missing: str) -> None:
    tensors = _valid_tensors()
    del tensors[f"layer.{missing}"]
    with pytest.raises(WeightsmithError, match=rf"layer\.{missing} is missing") as err:
        find_groups(_entries(tensors), None, {}, WHERE)
    assert WHERE in str(err.value)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("qweight", "I64"), ("qzeros", "F32"), ("g_idx", "I64"), ("scales", "I32")],
)
def test_wrong_dtype(name: str, dtype: str) -> None:
    entries = _entries(_valid_tensors())
    old = entries[f"layer.{name}"]
    entries[old.name] = TensorEntry(old.name, dtype, old.shape, 0, 0, 0)
    with pytest.raises(WeightsmithError, match=rf"layer\.{name} has dtype {dtype}") as err:
        find_groups(entries, None, {}, WHERE)
    assert WHERE in str(err.value)


@pytest.mark.parametrize(
    ("name", "shape", "config", "message"),
    [
        ("qweight", (16, 60), _config(4, 32, "gptq"), r"layer\.qweight has shape \[16, 60\]"),
        ("qweight", (20, 64), _config(4, 32, "gptq"), r"layer\.qweight has shape \[20, 64\]"),
        ("qzeros", (4, 9), _config(4, 32, "gptq"), r"layer\.qzeros has shape \[4, 9\]"),
        ("qzeros", (3, 8), _config(4, 32, "gptq"), r"layer\.qzeros has shape \[3, 8\]"),
        ("scales", (4, 64), _config(4, 64, "gptq"), r"layer\.scales has shape \[4, 64\]"),
        ("g_idx", (100,), _config(4, 32, "gptq"), r"layer\.qweight has shape"),
        ("g_idx", (128, 1), None, r"layer\.g_idx has shape \[128, 1\], not 1-D"),
        ("qweight", (16, 64), _config(8, 32, "gptq"), r"layer\.qweight has shape \[16, 64\]"),
        ("qweight", (16, 64), _config(3, 32, "gptq"), r"layer\.qweight has shape \[16, 64\]"),
        ("qweight", (24, 64), None, r"cannot infer GPTQ bits"),
    ],
)
def test_inconsistent_shapes(name: str, shape: tuple, config: dict | None, message: str) -> None:
    entries = _entries(_valid_tensors())
    old = entries[f"layer.{name}"]
    entries[old.name] = TensorEntry(old.name, old.dtype, shape, 0, 0, 0)
    with pytest.raises(WeightsmithError, match=message) as err:
        find_groups(entries, config, {}, WHERE)
    assert str(err.value).startswith(WHERE)


def test_3bit_qweight_rows_must_come_in_triples() -> None:
    entries = _entries(
        {
            "l.qweight": np.zeros((4, 32), np.int32),
            "l.qzeros": np.zeros((1, 3), np.int32),
            "l.scales": np.zeros((1, 32), np.float16),
        }
    )
    with pytest.raises(WeightsmithError, match=r"l\.qweight has 4 rows, not a multiple of 3"):
        find_groups(entries, {"bits": 3}, {}, WHERE)


@pytest.mark.parametrize(
    ("config", "metadata", "message"),
    [
        ({"bits": 5}, {}, r"bits=5 is not supported"),
        ({}, {"bits": "four"}, r"metadata 'bits' is 'four', not an integer"),
        ({"group_size": 0}, {}, r"group_size=0 must be -1 or positive"),
        ({"checkpoint_format": "marlin"}, {}, r"'marlin'; supported formats"),
        ({}, {"checkpoint_format": "awq"}, r"metadata 'checkpoint_format' is 'awq'"),
        ({"quant_method": "awq"}, {}, r"quant_method 'awq' is not GPTQ"),
    ],
)
def test_bad_settings(config: dict, metadata: dict, message: str) -> None:
    with pytest.raises(WeightsmithError, match=message) as err:
        find_groups(_entries(_valid_tensors()), config, metadata, WHERE)
    assert str(err.value).startswith(WHERE)


def test_group_size_cannot_be_inferred_without_g_idx() -> None:
    entries = _entries(
        {
            "l.qweight": np.zeros((12, 32), np.int32),  # 96 inputs
            "l.qzeros": np.zeros((5, 4), np.int32),
            "l.scales": np.zeros((5, 32), np.float16),  # 96 / 5 groups is no whole size
        }
    )
    with pytest.raises(WeightsmithError, match=r"cannot infer GPTQ group_size") as err:
        find_groups(entries, {"bits": 4}, {}, WHERE)
    assert WHERE in str(err.value)


def test_dequantize_checks_arrays_against_the_group() -> None:
    tensors = _valid_tensors()
    (group,) = find_groups(_entries(tensors), None, {}, WHERE)
    t = dict(tensors)
    t["layer.g_idx"] = t["layer.g_idx"].copy()
    t["layer.g_idx"][3] = 4  # only groups 0..3 exist
    with pytest.raises(WeightsmithError, match=r"layer\.g_idx: has group indices 0\.\.4"):
        _dequantize_all(group, t)
    with pytest.raises(WeightsmithError, match=r"layer\.qweight has shape"):
        dequantize(
            group,
            tensors["layer.qweight"][:, :32],
            tensors["layer.qzeros"],
            tensors["layer.scales"],
            tensors["layer.g_idx"],
        )
    with pytest.raises(ValueError, match="step 1"):
        _dequantize_all(group, tensors, slice(0, 10, 2))
    with pytest.raises(ValueError, match="g_idx was not given"):
        dequantize(group, tensors["layer.qweight"], tensors["layer.qzeros"], tensors["layer.scales"], None)
