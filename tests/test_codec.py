"""Tests for weightsmith.codec: exact tile round trips, masks and positions, sizes, chunks."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from weightsmith.codec import (
    Chunk,
    PixelMap,
    TileLayout,
    chunk_region,
    chunks,
    decode,
    encode,
    fit_normalizer,
    from_image,
    parse_size,
    splice,
    to_image,
)
from weightsmith.errors import WeightsmithError
from weightsmith.images import view_2d

DIMS = st.sampled_from([1, 2, 3, 5, 7, 8, 13, 17, 31, 64])
SHAPES = st.lists(DIMS, min_size=0, max_size=4).map(tuple).filter(lambda s: math.prod(s) <= 40_000)
DTYPES = st.sampled_from(["float32", "float16", "bfloat16", "int8"])
KINDS = st.sampled_from(["normal", "heavy", "outliers", "sparse", "constant"])


def make_tensor(shape: tuple[int, ...], dtype: str, kind: str, seed: int, log_scale: int) -> np.ndarray:
    """A tensor of a realistic or awkward value distribution, cast to `dtype`."""
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    if kind == "normal":
        x = rng.standard_normal(shape) * scale
    elif kind == "heavy":
        x = rng.standard_t(2, shape) * scale
    elif kind == "outliers":
        x = rng.standard_normal(shape) * scale
        x.reshape(-1)[:: max(1, x.size // 3)] *= 1e3
    elif kind == "sparse":
        x = np.where(rng.random(shape) < 0.9, 0.0, rng.standard_normal(shape) * scale)
    else:
        x = np.full(shape, 0.37 * scale)
    if dtype == "int8":
        return np.clip(np.rint(x / scale * 20), -128, 127).astype(np.int8)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    if dtype == "float16":
        x = np.clip(x, -6e4, 6e4)
    return np.asarray(x, dtype=np_dtype)


def assert_round_trip(tensor: np.ndarray, decoded: np.ndarray) -> None:
    x = tensor.astype(np.float32)
    assert decoded.dtype == np.float32
    assert decoded.shape == tensor.shape
    finite = np.isfinite(x)
    np.testing.assert_array_equal(np.isfinite(decoded), finite)
    np.testing.assert_array_equal(decoded[~finite], x[~finite])
    bound = 1e-6 * float(np.abs(x[finite]).max(initial=0.0))
    err = np.abs(decoded[finite].astype(np.float64) - x[finite])
    assert err.max(initial=0.0) <= bound, (err.max(), bound)


@settings(max_examples=150, deadline=None)
@given(
    shape=SHAPES,
    dtype=DTYPES,
    tile=st.integers(8, 64),
    kind=KINDS,
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.integers(-6, 3),
    method=st.sampled_from(["mad", "percentile"]),
)
@example(shape=(), dtype="float32", tile=8, kind="normal", seed=0, log_scale=0, method="mad")
@example(shape=(64, 64), dtype="float32", tile=64, kind="normal", seed=0, log_scale=0, method="mad")
@example(shape=(65,), dtype="bfloat16", tile=8, kind="constant", seed=0, log_scale=0, method="mad")
def test_encode_decode_round_trip(shape, dtype, tile, kind, seed, log_scale, method) -> None:
    tensor = make_tensor(shape, dtype, kind, seed, log_scale)
    enc = encode(tensor, tile, method=method)

    rows, cols = view_2d(shape)
    gr, gc = -(-rows // tile), -(-cols // tile)
    assert enc.tiles.shape == (gr * gc, tile, tile) and enc.tiles.dtype == np.float32
    assert enc.mask.shape == enc.tiles.shape and enc.mask.dtype == bool
    assert enc.positions.shape == (gr * gc, 2)
    assert enc.shape == shape and enc.shape2d == (rows, cols) and enc.dtype == str(tensor.dtype)
    # masks count exactly the real elements; padding is zero
    assert int(enc.mask.sum()) == math.prod(shape)
    assert not enc.tiles[~enc.mask].any()
    # positions are the tile grid, and the masked tiles cover the 2-D view exactly once
    covered = np.zeros((gr * tile, gc * tile), dtype=np.int64)
    for (r, c), m in zip(enc.positions, enc.mask, strict=True):
        assert r % tile == 0 and c % tile == 0
        covered[r : r + tile, c : c + tile] += m
    assert (covered[:rows, :cols] == 1).all() and covered.sum() == rows * cols

    assert_round_trip(tensor, decode(enc))
    # a layout read back from JSON decodes the same tiles identically
    layout = TileLayout.from_dict(json.loads(json.dumps(enc.layout.to_dict())))
    np.testing.assert_array_equal(decode(layout, enc.tiles), decode(enc))


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=9),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    st.integers(8, 16),
)
def test_round_trip_any_finite_float32(tensor: np.ndarray, tile: int) -> None:
    """Adversarial values (extremes, subnormals, mixed magnitudes) still round trip."""
    enc = encode(tensor, tile)
    assert np.isfinite(enc.tiles).all()
    assert_round_trip(tensor, decode(enc))


def test_non_finite_values_pass_through() -> None:
    x = np.array([[1.0, np.nan, -np.inf], [np.inf, 2.0, -3.0]], dtype=np.float32)
    enc = encode(x, 8)
    assert enc.params.center == 1.0  # median of the finite values only
    assert_round_trip(x, decode(enc))


def test_constant_tensor_has_unit_scale_and_round_trips_exactly() -> None:
    x = np.full((3, 5, 2), -0.125, dtype=np.float32)
    enc = encode(x, 8)
    assert enc.params.scale == 1.0 and enc.params.center == -0.125
    np.testing.assert_array_equal(decode(enc), x)


def test_normalised_values_of_normal_data_have_unit_spread() -> None:
    x = np.random.default_rng(0).normal(0.5, 0.02, (300, 200)).astype(np.float32)
    params = fit_normalizer(x)
    assert params.center == pytest.approx(0.5, abs=1e-3)
    assert params.scale == pytest.approx(0.02, rel=0.02)  # MAD * 1.4826 estimates the std
    assert float(np.std(params.apply(x))) == pytest.approx(1.0, rel=0.02)


def test_empty_tensor() -> None:
    x = np.zeros((0, 5), dtype=np.float32)
    enc = encode(x, 8)
    assert enc.tiles.shape == (0, 8, 8)
    assert decode(enc).shape == (0, 5)


def test_decode_rejects_wrong_tiles() -> None:
    enc = encode(np.ones((10, 10), np.float32), 8)
    with pytest.raises(WeightsmithError, match=r"expected tiles of shape \(4, 8, 8\)"):
        decode(enc, np.zeros((3, 8, 8), np.float32))
    with pytest.raises(WeightsmithError, match="needs the tiles"):
        decode(enc.layout)
    with pytest.raises(WeightsmithError, match="at least 1"):
        encode(np.ones(3), 0)


@pytest.mark.parametrize("pixel_map", [PixelMap(), PixelMap(limit=3.0, low=0.0, high=1.0)])
def test_image_round_trip(pixel_map: PixelMap) -> None:
    x = (np.random.default_rng(1).standard_t(3, (40, 70)) * 0.05).astype(np.float32)
    enc = encode(x, 16)
    images = to_image(enc.tiles, pixel_map)
    assert images.shape == (enc.tiles.shape[0], 3, 16, 16) and images.dtype == np.float32
    inside = np.abs(enc.tiles) <= pixel_map.limit
    pixels = images[:, 0][inside]
    assert pixels.min() >= pixel_map.low and pixels.max() <= pixel_map.high
    # values beyond the limit are kept outside the pixel range, not clipped
    assert (images[:, 0][~inside] < pixel_map.low).any() or (images[:, 0][~inside] > pixel_map.high).any()
    back = from_image(images, pixel_map)
    np.testing.assert_array_equal(back, from_image(images[:, 0], pixel_map))
    decoded = decode(enc, back)
    assert np.abs(decoded - x).max() <= 2e-6 * np.abs(x).max()


# --- sizes and chunks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("780KB", 780_000),
        ("3MB", 3_000_000),
        ("12MB", 12_000_000),
        ("1.5MB", 1_500_000),
        ("64KiB", 65_536),
        ("2GiB", 2 * 2**30),
        ("1GB", 10**9),
        ("780 kb", 780_000),
        ("4096", 4096),
        ("100B", 100),
        (".5KB", 500),
        (780_000, 780_000),
    ],
)
def test_parse_size(text, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "KB", "12QB", "1.5", "-3MB", "0", "0KB", "1e3", "3 M B", "1.0001KB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(WeightsmithError, match=f"size {text!r}"):
        parse_size(text)


def test_chunk_region_and_cover() -> None:
    shape = (10, 7)
    assert chunk_region(shape, parse_size("40B"), 0) == Chunk(0, 10)
    assert chunk_region(shape, 41, 65) == Chunk(65, 5)  # cut at the end; 41 bytes -> 10 values
    parts = chunks(shape, 64)
    assert [c.offset for c in parts] == [0, 16, 32, 48, 64]
    assert sum(c.size for c in parts) == 70 and parts[-1].stop == 70
    assert Chunk.from_dict(parts[1].to_dict()) == parts[1] and parts[1].nbytes == 64
    with pytest.raises(WeightsmithError, match="outside the tensor"):
        chunk_region(shape, 40, 70)
    with pytest.raises(WeightsmithError, match="less than one float32"):
        chunk_region(shape, 3, 0)


@settings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple),
    data=st.data(),
)
def test_splice_replaces_exactly_the_run(shape: tuple[int, ...], data) -> None:
    numel = math.prod(shape)
    tensor = np.arange(numel, dtype=np.float32).reshape(shape)
    chunk = chunk_region(shape, 4 * data.draw(st.integers(1, numel)), data.draw(st.integers(0, numel - 1)))
    values = -1.0 - np.arange(chunk.size, dtype=np.float32)
    out = splice(tensor, values, chunk.offset)
    assert out.shape == tensor.shape and out.dtype == tensor.dtype
    flat = out.reshape(-1)
    np.testing.assert_array_equal(flat[chunk.offset : chunk.stop], values)
    keep = np.ones(numel, bool)
    keep[chunk.offset : chunk.stop] = False
    np.testing.assert_array_equal(flat[keep], tensor.reshape(-1)[keep])
    assert (tensor.reshape(-1) == np.arange(numel)).all()  # the input is untouched


def test_splice_casts_and_checks_bounds() -> None:
    base = np.zeros((4, 4), dtype=ml_dtypes.bfloat16)
    out = splice(base, np.full(3, 1.5, np.float32), 14 - 3)
    assert out.dtype == base.dtype and float(out.reshape(-1)[12]) == 1.5
    with pytest.raises(WeightsmithError, match="do not fit"):
        splice(base, np.ones(3, np.float32), 14)


def test_banded_normalisation_matches_one_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are normalised a few rows at a time; the bands must join seamlessly."""
    x = make_tensor((37, 3, 5), "float32", "heavy", 3, 0)
    whole = encode(x, 16)
    monkeypatch.setattr("weightsmith.codec._BAND_ELEMS", 40)  # 2 rows of 15 per band
    banded = encode(x, 16)
    np.testing.assert_array_equal(banded.tiles, whole.tiles)
    np.testing.assert_array_equal(decode(banded), decode(whole))
    assert_round_trip(x, decode(banded))
