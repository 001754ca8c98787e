"""Tensor images: a float32 tiled TIFF (exact values) and an 8-bit PNG preview.

Both are fed row bands of the tensor's 2-D view (1-D as 1 x N, N-D as dim0 x rest) as the
extractor streams the tensor, so neither holds more than one band plus a small preview.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator

import numpy as np
import tifffile
from PIL import Image

TILE = 256  # TIFF tile side (a multiple of 16, as TIFF requires)
PREVIEW_MAX = 1024  # PNG preview: at most this many pixels a side
PERCENTILE = 99.5  # symmetric scaling: +-(this percentile of |x|) maps to 0..255
SAMPLE = 65_536  # values the percentile is taken from
# Uncompressed: TIFF of float weights gains little from compression and zlib runs ~10x
# slower than a copy on these machines; bench/extract.py measures the choice.
TIFF_COMPRESSION = None


def view_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D image shape of a tensor: () -> 1x1, (n,) -> 1xn, (a, ...) -> a x rest."""
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def write_tiff(path: str, bands: Iterable[np.ndarray], shape2d: tuple[int, int], meta: dict) -> None:
    """Write float32 row bands (in order, covering `shape2d`) as a tiled single-channel TIFF.

    `meta` (name, shape, dtype) goes into the image description as JSON.
    """
    rows, cols = shape2d
    tile = (min(TILE, _round16(rows)), min(TILE, _round16(cols)))
    tifffile.imwrite(
        path,
        data=_tiles(bands, tile, cols),
        shape=shape2d,
        dtype=np.float32,
        tile=tile,
        photometric="minisblack",
        compression=TIFF_COMPRESSION,
        description=json.dumps({"weightsmith": meta}),
        metadata=None,
    )


def read_tiff(path_or_file) -> tuple[np.ndarray, dict]:
    """The float32 image and its weightsmith metadata."""
    with tifffile.TiffFile(path_or_file) as tif:
        page = tif.pages[0]
        meta = json.loads(page.description).get("weightsmith", {})
        return page.asarray(), meta


def _round16(n: int) -> int:
    return max(16, -(-n // 16) * 16)


def _tiles(bands: Iterable[np.ndarray], tile: tuple[int, int], cols: int) -> Iterator[np.ndarray]:
    """Re-cut row bands of any height into tile rows, yielded tile by tile (row-major)."""
    th, tw = tile
    pending: list[np.ndarray] = []
    have = 0
    for band in bands:
        pending.append(band)
        have += band.shape[0]
        while have >= th:
            buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield from _tile_row(buf[:th], tw, cols)
            rest = buf[th:]
            pending, have = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
    if have:
        buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
        yield from _tile_row(buf, tw, cols)


def _tile_row(buf: np.ndarray, tw: int, cols: int) -> Iterator[np.ndarray]:
    for c in range(0, cols, tw):
        yield np.ascontiguousarray(buf[:, c : c + tw], dtype=np.float32)


class Preview:
    """Accumulates a decimated copy of the 2-D view, then renders an 8-bit PNG.

    Rows and columns are taken with a fixed stride so that the result is at most
    PREVIEW_MAX a side; the scaling percentile is computed from those sampled values.
    """

    def __init__(self, shape2d: tuple[int, int]):
        rows, cols = shape2d
        self.row_step = max(1, -(-rows // PREVIEW_MAX))
        self.col_step = max(1, -(-cols // PREVIEW_MAX))
        self.rows_seen = 0
        self.parts: list[np.ndarray] = []

    def add(self, band: np.ndarray) -> None:
        """Take the sampled rows of a row band (rows continue where the last band ended)."""
        first = (-self.rows_seen) % self.row_step
        self.parts.append(np.array(band[first :: self.row_step, :: self.col_step], dtype=np.float32))
        self.rows_seen += band.shape[0]

    def png_bytes(self) -> bytes:
        img = np.concatenate(self.parts) if self.parts else np.zeros((1, 1), np.float32)
        finite = np.abs(img[np.isfinite(img)])
        if finite.size > SAMPLE:  # the percentile of a fixed, evenly spaced sample is plenty
            finite = finite[:: finite.size // SAMPLE]
        scale = float(np.percentile(finite, PERCENTILE)) if finite.size else 0.0
        scale = scale if scale > 0 else 1.0
        scaled = np.nan_to_num(img / scale, nan=0.0, posinf=1.0, neginf=-1.0)
        pixels = np.clip(np.rint((scaled + 1.0) * 127.5), 0, 255).astype(np.uint8)
        import io

        out = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(out, format="PNG", compress_level=1)
        return out.getvalue()
