"""The streaming TIFF writer and the PNG encoder, checked against tifffile and Pillow."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from weightsmith import images

SHAPES = [(1, 1), (1, 5), (1, 700), (3, 3), (300, 700), (513, 256), (257, 1000), (40, 3000), (1000, 17)]


def bands_of(values: np.ndarray, cuts: list[int]):
    edges = [0, *[c for c in cuts if 0 < c < values.shape[0]], values.shape[0]]
    return [values[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@pytest.mark.parametrize("shape", SHAPES)
def test_tiff_round_trips_and_matches_its_values(tmp_path: Path, shape, monkeypatch) -> None:
    monkeypatch.setattr(images, "GROUP_BYTES", 1 << 18)  # several tile groups per tile row
    values = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    meta = {"name": "w", "shape": list(shape), "dtype": "F32"}
    path = tmp_path / "w.tiff"
    for cuts in ([], [1, 2, 3], [100, 356, 357]):  # any band heights, tile rows or not
        assert images.write_tiff(str(path), bands_of(values, cuts), shape, meta) is None
        with open(path, "rb") as f:  # rebuilt from other bands: the same bytes
            assert images.tiff_matches(f, bands_of(values, [2, 5]), shape, meta)
        image, got = images.read_tiff(str(path))
        assert got == meta and image.dtype == np.float32
        assert np.array_equal(image, values)
        with tifffile.TiffFile(path) as tif:
            (page,) = tif.pages
            assert page.is_tiled and not tif.is_bigtiff
            assert page.tilewidth % 16 == 0 and page.tilelength % 16 == 0
            assert page.tilewidth <= images.TILE and page.tilelength <= images.TILE


def test_tiff_matches_notices_any_change(tmp_path: Path) -> None:
    values = np.random.default_rng(4).standard_normal((40, 300)).astype(np.float32)
    meta = {"name": "w", "shape": [40, 300], "dtype": "F32"}
    path = tmp_path / "w.tiff"
    images.write_tiff(str(path), [values], values.shape, meta)
    other = values.copy()
    other[39, 299] = np.nextafter(other[39, 299], np.inf)  # the last pixel, one ulp off

    def matches(data: bytes, vals: np.ndarray = values, m: dict = meta) -> bool:
        return images.tiff_matches(io.BytesIO(data), [vals], vals.shape, m)

    data = path.read_bytes()
    assert matches(data)
    assert not matches(data, other)
    assert not matches(data, m={**meta, "dtype": "F16"})
    assert not matches(data[:-1]) and not matches(data + b"\0") and not matches(b"")


def test_big_files_are_bigtiff(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(images, "CLASSIC_MAX", 0)
    values = np.arange(300 * 40, dtype=np.float32).reshape(300, 40)
    path = tmp_path / "w.tiff"
    images.write_tiff(str(path), [values], values.shape, {"name": "w"})
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    assert np.array_equal(images.read_tiff(str(path))[0], values)


def test_tiff_needs_every_row(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows"):
        images.write_tiff(str(tmp_path / "w.tiff"), [np.zeros((3, 4), np.float32)], (4, 4), {})
    with pytest.raises(ValueError, match="rows"):
        images.write_tiff(str(tmp_path / "w.tiff"), [np.zeros((5, 4), np.float32)], (4, 4), {})


def test_compressed_tiff_goes_through_tifffile(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(images, "TIFF_COMPRESSION", "zlib")
    values = np.random.default_rng(2).standard_normal((300, 300)).astype(np.float32)
    path = tmp_path / "w.tiff"
    sha = images.write_tiff(str(path), bands_of(values, [7]), values.shape, {"name": "w"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert np.array_equal(images.read_tiff(str(path))[0], values)


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (1024, 1024)])
def test_png_is_the_pixels(shape) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    png = Image.open(io.BytesIO(images.png_gray8(pixels)))
    assert png.mode == "L"
    assert np.array_equal(np.asarray(png), pixels)
