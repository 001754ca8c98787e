"""Codec: a tensor as normalised float32 image tiles and back, plus sizes and chunks.

A tensor is seen as its 2-D view (`weightsmith.images.view_2d`: 1-D as 1 x N, N-D as
dim0 x rest), normalised with robust per-tensor parameters kept as floats, and cut into square
single-channel tiles in row-major order; the last tile row and column are padded and the
padding is masked. Tiles are float32 arrays, not 8-bit images, so nothing is clipped and
`decode(encode(x))` returns `x` within 1e-6 of its largest magnitude (float32 rounding only).

A *chunk* is a run of `chunk_bytes // 4` float32 values of a tensor in C order, starting at a
recorded element offset: generators can predict one chunk of a large tensor, and `splice`
puts it back. `parse_size` reads chunk sizes in SI units ("780KB" is 780,000 bytes).

`to_image` / `from_image` map normalised tiles onto the pixel range an image pipeline expects
([-1, 1] or [0, 1], 3 channels) by a fixed affine map, again in float32 without quantising.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from weightsmith.errors import WeightsmithError
from weightsmith.images import view_2d

# Scale of the median absolute deviation that estimates the std of normal data
# (Rousseeuw & Croux 1993: 1 / Phi^-1(3/4)).
MAD_TO_STD = 1.482602218505602
PERCENTILE = 99.5  # with method "percentile": this percentile of |x - center| maps to 1
# Normalised values stay below this magnitude, so float32 tiles never overflow even when a
# tensor's typical deviation is tiny next to its largest one.
MAX_NORMALISED = 1e30
_BAND_ELEMS = 1 << 22  # normalise this many elements at a time (bounds the float64 temporary)
FLOAT32_BYTES = 4
_F32_MAX = float(np.finfo(np.float32).max)

# size units -> bytes: SI (powers of 1000) and IEC (powers of 1024), matched case-insensitively
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# normalisation


@dataclass(frozen=True)
class Normalizer:
    """Per-tensor affine x_norm = (x - center) / scale; inverts up to float32 rounding."""

    center: float  # the median of the finite values
    scale: float  # robust spread of the finite values (> 0)
    method: str = "mad"  # how `scale` was chosen: "mad" or "percentile"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 values of `x` (computed in float64, NaN and Inf kept)."""
        return ((np.asarray(x, dtype=np.float64) - self.center) / self.scale).astype(np.float32)

    def invert(self, z: np.ndarray) -> np.ndarray:
        """The float32 values whose normalisation is `z`."""
        x = np.asarray(z, dtype=np.float64) * self.scale + self.center
        # rounding can carry a value at float32's limit just past it; keep it finite (Inf
        # and NaN, which were Inf and NaN before encoding, stay as they are)
        finite = np.isfinite(x)
        np.minimum(x, _F32_MAX, out=x, where=finite)
        np.maximum(x, -_F32_MAX, out=x, where=finite)
        return x.astype(np.float32)

    def to_dict(self) -> dict:
        return {"center": self.center, "scale": self.scale, "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(center=float(d["center"]), scale=float(d["scale"]), method=str(d["method"]))


def fit_normalizer(
    x: np.ndarray, method: Literal["mad", "percentile"] = "mad", percentile: float = PERCENTILE
) -> Normalizer:
    """Robust normalisation parameters of a tensor's finite values.

    Args:
        x: the tensor, any shape and real dtype.
        method: "mad": scale = 1.4826 * median|x - median| (the std for normal data);
            "percentile": scale = the `percentile`-th percentile of |x - median|.
        percentile: used by method "percentile".

    Returns:
        The parameters as Python floats. A zero spread (a constant or mostly constant
        tensor) falls back to max|x - median|, then to 1.
    """
    if method not in ("mad", "percentile"):
        raise WeightsmithError("normalizer", f"unknown method {method!r} (use 'mad' or 'percentile')")
    v = np.asarray(x, dtype=np.float32).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Normalizer(center=0.0, scale=1.0, method=method)
    center = float(np.median(v))
    dev = np.abs(v.astype(np.float64) - center)  # float64: no overflow for far-apart values
    if method == "mad":
        scale = MAD_TO_STD * float(np.median(dev))
    else:
        scale = float(np.percentile(dev, percentile))
    largest = float(dev.max())
    if scale == 0.0:
        scale = largest
    scale = max(scale, largest / MAX_NORMALISED)
    scale = scale if scale > 0 else 1.0
    return Normalizer(center=center, scale=scale, method=method)


# ---------------------------------------------------------------------------------------------
# tiles


@dataclass(frozen=True)
class TileLayout:
    """Everything needed to decode tiles into a tensor; JSON-able via `to_dict`."""

    shape: tuple[int, ...]  # the tensor's shape
    dtype: str  # the tensor's dtype name before encoding ("bfloat16", "float32", "int8", ...)
    tile: int  # tile side in pixels
    params: Normalizer  # normalisation of the tensor's values

    @property
    def shape2d(self) -> tuple[int, int]:
        return view_2d(self.shape)

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles down and across the 2-D view."""
        rows, cols = self.shape2d
        return (-(-rows // self.tile), -(-cols // self.tile))

    @property
    def n_tiles(self) -> int:
        return math.prod(self.grid)

    def positions(self) -> np.ndarray:
        """(n, 2) int64: the (row, col) of each tile's top-left pixel in the 2-D view."""
        gr, gc = self.grid
        r, c = np.meshgrid(np.arange(gr), np.arange(gc), indexing="ij")
        return (np.stack([r.ravel(), c.ravel()], axis=1) * self.tile).astype(np.int64)

    def mask(self) -> np.ndarray:
        """(n, tile, tile) bool: True on real elements, False on padding."""
        rows, cols = self.shape2d
        gr, gc = self.grid
        t = self.tile
        row_ok = np.arange(gr * t).reshape(gr, t) < rows  # (gr, t)
        col_ok = np.arange(gc * t).reshape(gc, t) < cols  # (gc, t)
        mask = row_ok[:, None, :, None] & col_ok[None, :, None, :]  # (gr, gc, t, t)
        return mask.reshape(gr * gc, t, t)

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "tile": self.tile,
            "params": self.params.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TileLayout:
        return cls(
            shape=tuple(int(n) for n in d["shape"]),
            dtype=str(d["dtype"]),
            tile=int(d["tile"]),
            params=Normalizer.from_dict(d["params"]),
        )


@dataclass(frozen=True)
class Encoded:
    """A tensor as normalised tiles: what `encode` returns and `decode` inverts."""

    tiles: np.ndarray  # (n, tile, tile) float32 normalised values, padding 0
    positions: np.ndarray  # (n, 2) int64 top-left (row, col) of each tile in the 2-D view
    mask: np.ndarray  # (n, tile, tile) bool, False on padding
    layout: TileLayout  # shape, dtype, tile size and normalisation

    @property
    def params(self) -> Normalizer:
        return self.layout.params

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def shape2d(self) -> tuple[int, int]:
        return self.layout.shape2d

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def tile(self) -> int:
        return self.layout.tile


def encode(tensor: np.ndarray, tile: int, method: Literal["mad", "percentile"] = "mad") -> Encoded:
    """Normalise a tensor and cut its 2-D view into square tiles.

    Args:
        tensor: any shape (0-d included) and real dtype (float32/16, bfloat16, integers);
            values are read as float32.
        tile: tile side in pixels (>= 1).
        method: the normaliser's scale (see `fit_normalizer`).

    Returns:
        Tiles in row-major order of the tile grid, their positions, the padding mask and the
        layout that `decode` needs.
    """
    if tile < 1:
        raise WeightsmithError("tile", f"tile size must be at least 1, got {tile}")
    x = np.asarray(tensor)
    dtype = str(x.dtype)
    x = x.astype(np.float32, copy=False)
    layout = TileLayout(shape=tuple(x.shape), dtype=dtype, tile=tile, params=fit_normalizer(x, method))
    rows, cols = layout.shape2d
    gr, gc = layout.grid
    view = x.reshape(rows, cols)
    padded = np.zeros((gr * tile, gc * tile), dtype=np.float32)  # padding is the center (0)
    band = max(1, _BAND_ELEMS // max(cols, 1))
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        padded[r0:r1, :cols] = layout.params.apply(view[r0:r1])
    # (gr*t, gc*t) -> (gr, t, gc, t) -> (gr, gc, t, t): tile (i, j) is padded[i*t:, j*t:]
    tiles = padded.reshape(gr, tile, gc, tile).transpose(0, 2, 1, 3).reshape(gr * gc, tile, tile)
    return Encoded(
        tiles=np.ascontiguousarray(tiles),
        positions=layout.positions(),
        mask=layout.mask(),
        layout=layout,
    )


def decode(encoded: Encoded | TileLayout, tiles: np.ndarray | None = None) -> np.ndarray:
    """The float32 tensor whose tiles these are: the exact inverse of `encode`.

    Args:
        encoded: an `Encoded`, or just its `TileLayout` (e.g. read back from JSON).
        tiles: (n, tile, tile) tiles to decode instead of `encoded.tiles` (e.g. generated
            ones); required with a bare layout. Padding pixels are ignored.

    Returns:
        A float32 array of the original shape (cast to the original dtype is the caller's).
    """
    layout = encoded.layout if isinstance(encoded, Encoded) else encoded
    if tiles is None:
        if not isinstance(encoded, Encoded):
            raise WeightsmithError("decode", "a bare TileLayout needs the tiles to decode")
        tiles = encoded.tiles
    t = layout.tile
    gr, gc = layout.grid
    if tuple(tiles.shape) != (gr * gc, t, t):
        raise WeightsmithError("decode", f"expected tiles of shape {(gr * gc, t, t)}, got {tuple(tiles.shape)}")
    rows, cols = layout.shape2d
    # (n, t, t) -> (gr, gc, t, t) -> (gr, t, gc, t) -> (gr*t, gc*t), then drop the padding
    padded = np.asarray(tiles).reshape(gr, gc, t, t).transpose(0, 2, 1, 3).reshape(gr * t, gc * t)
    out = np.empty((rows, cols), dtype=np.float32)
    band = max(1, _BAND_ELEMS // max(cols, 1))
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        out[r0:r1] = layout.params.invert(padded[r0:r1, :cols])
    return out.reshape(layout.shape)


# ---------------------------------------------------------------------------------------------
# images for pipelines that want pixels


@dataclass(frozen=True)
class PixelMap:
    """Affine map of normalised values [-limit, limit] onto pixels [low, high]; not clipped."""

    limit: float = 4.0  # normalised magnitude that reaches the pixel range's ends (~4 std, MAD)
    low: float = -1.0  # pixel value of -limit: -1 for diffusers latents/pipelines, 0 for [0, 1]
    high: float = 1.0  # pixel value of +limit

    def __post_init__(self) -> None:
        if not (self.limit > 0 and self.high > self.low):
            raise WeightsmithError("pixel map", f"need limit > 0 and high > low, got {self}")


def to_image(tiles: np.ndarray, pixel_map: PixelMap = PixelMap(), channels: int = 3) -> np.ndarray:
    """(n, t, t) normalised tiles -> (n, channels, t, t) float32 pixels, channels repeated.

    Values beyond +-limit land outside [low, high] and are kept, so `from_image` inverts
    this up to float32 rounding.
    """
    z = np.asarray(tiles, dtype=np.float64)
    half = (pixel_map.high - pixel_map.low) / 2.0
    p = ((z / pixel_map.limit + 1.0) * half + pixel_map.low).astype(np.float32)  # (n, t, t)
    return np.repeat(p[:, None], channels, axis=1)


def from_image(images: np.ndarray, pixel_map: PixelMap = PixelMap()) -> np.ndarray:
    """(n, C, t, t) or (n, t, t) pixels -> (n, t, t) float32 normalised tiles (channel mean)."""
    p = np.asarray(images, dtype=np.float64)
    if p.ndim == 4:
        p = p.mean(axis=1)
    half = (pixel_map.high - pixel_map.low) / 2.0
    return (((p - pixel_map.low) / half - 1.0) * pixel_map.limit).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# sizes and chunks


def parse_size(text: str | int) -> int:
    """A byte count from "780KB", "1.5MB", "64KiB", "4096" or an int.

    KB/MB/GB/TB are SI (10^3, 10^6, ...), KiB/MiB/GiB/TiB binary (2^10, ...); units are
    case-insensitive and a space before the unit is allowed. The result must be a whole,
    positive number of bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise WeightsmithError(f"size {text!r}", "must be a positive number of bytes")
        return text
    m = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if m is None or m.group(2).lower() not in _UNITS:
        raise WeightsmithError(f"size {text!r}", "not a size (use e.g. 780KB, 3MB, 1.5GB, 64KiB or a byte count)")
    number, unit = m.groups()
    whole, _, frac = number.partition(".")
    # exact decimal arithmetic: 1.5MB is 1_500_000, never 1_499_999.9999
    mult = _UNITS[unit.lower()]
    numer = int(whole or "0") * 10 ** len(frac) + int(frac or "0")
    nbytes, rest = divmod(numer * mult, 10 ** len(frac))
    if rest or nbytes <= 0:
        raise WeightsmithError(f"size {text!r}", "must be a whole, positive number of bytes")
    return nbytes


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of a tensor's elements in C order: [offset, offset + size)."""

    offset: int  # first element
    size: int  # number of elements (float32 output bytes / 4)

    @property
    def stop(self) -> int:
        return self.offset + self.size

    @property
    def nbytes(self) -> int:
        return self.size * FLOAT32_BYTES

    def to_dict(self) -> dict:
        return {"offset": self.offset, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> Chunk:
        return cls(offset=int(d["offset"]), size=int(d["size"]))


def chunk_region(shape: tuple[int, ...], chunk_bytes: int, offset: int = 0) -> Chunk:
    """The chunk of `chunk_bytes // 4` float32 elements at `offset`, cut at the tensor's end.

    Args:
        shape: the tensor's shape.
        chunk_bytes: float32 output bytes of a chunk (e.g. `parse_size("780KB")`).
        offset: the first element, 0 <= offset < numel.
    """
    numel = math.prod(shape)
    if chunk_bytes < FLOAT32_BYTES:
        raise WeightsmithError("chunk size", f"{chunk_bytes} bytes is less than one float32 value")
    if not 0 <= offset < numel:
        raise WeightsmithError(
            "chunk offset",
            f"{offset} is outside the tensor of shape {tuple(shape)} ({numel} values)",
        )
    return Chunk(offset=offset, size=min(chunk_bytes // FLOAT32_BYTES, numel - offset))


def chunks(shape: tuple[int, ...], chunk_bytes: int) -> list[Chunk]:
    """The chunks that cover a tensor in order (the last one may be shorter)."""
    size = chunk_bytes // FLOAT32_BYTES
    return [chunk_region(shape, chunk_bytes, o) for o in range(0, math.prod(shape), max(size, 1))]


def splice(tensor: np.ndarray, values: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `tensor` with elements [offset, offset + values.size) (C order) replaced.

    The values are cast to the tensor's dtype; the input is not modified.
    """
    out = np.array(tensor, copy=True, order="C")
    flat = out.reshape(-1)
    v = np.asarray(values).reshape(-1)
    if not 0 <= offset <= flat.size - v.size:
        raise WeightsmithError(
            "splice",
            f"{v.size} values at offset {offset} do not fit a tensor of {flat.size} values",
        )
    flat[offset : offset + v.size] = v.astype(out.dtype)
    return out
