"""Tensor images: a float32 tiled TIFF (exact values) and an 8-bit PNG preview.

Both are fed row bands of the tensor's 2-D view (1-D as 1 x N, N-D as dim0 x rest) as the
extractor streams the tensor, so neither holds more than one band plus a small preview.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np
import tifffile

TILE = 256  # TIFF tile side (a multiple of 16, as TIFF requires)
PREVIEW_MAX = 1024  # PNG preview: at most this many pixels a side
PERCENTILE = 99.5  # symmetric scaling: +-(this percentile of |x|) maps to 0..255
SAMPLE = 65_536  # values the percentile is taken from
# Uncompressed: TIFF of float weights gains little from compression and zlib runs ~10x
# slower than a copy on these machines; bench/extract.py measures the choice. None also lets
# TiffWriter stream the file and hash it as it writes; a codec name goes through tifffile.
TIFF_COMPRESSION = None
# Deflate level of previews. 0 stores the pixels: noise-like weight previews shrink only ~6% at
# level 1 (Pillow's PNG: ~35 ms per megapixel, over 1 s for GPT-2 small), while 0 costs ~nothing.
PNG_LEVEL = 0


def view_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D image shape of a tensor: () -> 1x1, (n,) -> 1xn, (a, ...) -> a x rest."""
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def write_tiff(path: str, bands: Iterable[np.ndarray], shape2d: tuple[int, int], meta: dict) -> str | None:
    """Write float32 row bands (in order, covering `shape2d`) as a tiled single-channel TIFF.

    `meta` (name, shape, dtype) goes into the image description as JSON. Returns the sha256 of a
    compressed file (read back), None for an uncompressed one: its bytes follow from the values
    and `meta` alone, so `tiff_matches` checks it against the array without a stored digest.
    """
    if TIFF_COMPRESSION is None:
        with open(path, "wb") as f:
            writer = TiffWriter(f, shape2d, _description(meta))
            for band in bands:
                writer.write(band)
            writer.close()
        return None
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
        description=_description(meta),
        metadata=None,
    )
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def tiff_matches(f: BinaryIO, bands: Iterable[np.ndarray], shape2d: tuple[int, int], meta: dict) -> bool:
    """Whether `f` holds, byte for byte, the uncompressed TIFF `write_tiff` makes of the bands."""
    sink = _Compare(f)
    writer = TiffWriter(sink, shape2d, _description(meta))
    for band in bands:
        writer.write(band)
        if not sink.same:
            return False
    writer.close()
    return sink.same and not f.read(1)


class _Compare:
    """A file to write that compares every byte written with the next bytes of `f`."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._at = 0
        self.same = True

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        self.same = self.same and self._f.read(len(data)) == data
        self._at += len(data)

    def tell(self) -> int:
        return self._at


def _description(meta: dict) -> str:
    return json.dumps({"weightsmith": meta})


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


# TIFF tag ids and field types (TIFF 6.0; BigTIFF adds LONG8)
_SHORT, _LONG, _ASCII, _LONG8 = 3, 4, 2, 16
_FORMATS = {_SHORT: "H", _LONG: "I", _LONG8: "Q"}
GROUP_BYTES = 8 << 20  # tiles are cut and written this many bytes at a time
CLASSIC_MAX = (1 << 32) - 1  # larger files are BigTIFF (classic TIFF offsets are 32-bit)


class TiffWriter:
    """Streams float32 row bands into an uncompressed tiled TIFF, front to back.

    Uncompressed tiles all have the same size, so the header and every tile offset are known
    before the first pixel: the file is written once, in order.
    Tiles are TILE x TILE (16-row multiples for thin images), zero-padded at the edges, row-major.
    The file is a BigTIFF when it would pass 4 GiB.
    """

    def __init__(self, f: BinaryIO, shape2d: tuple[int, int], description: str):
        self.rows, self.cols = shape2d
        self.tile = (min(TILE, _round16(self.rows)), min(TILE, _round16(self.cols)))
        th, tw = self.tile
        self.tiles_across = -(-self.cols // tw)
        self._f = f
        self._rows_done = 0
        self._carry: np.ndarray | None = None  # < th rows waiting for the rest of their tile row
        group = max(1, min(self.tiles_across, GROUP_BYTES // (th * tw * 4)))
        self._group = np.zeros((group, th, tw), "<f4")  # (tiles, th, tw): tiles cut, then written
        header, self._end = _tiff_header(shape2d, self.tile, description.encode("ascii"))
        self._f.write(header)

    def write(self, band: np.ndarray) -> None:
        """Add the next rows (band: (n, cols), any float dtype)."""
        th = self.tile[0]
        self._rows_done += band.shape[0]
        if self._rows_done > self.rows:
            raise ValueError(f"TIFF got {self._rows_done} rows, more than {self.rows}")
        start = 0
        if self._carry is not None:  # complete the tile row that the last band started
            start = min(th - self._carry.shape[0], band.shape[0])
            rows = np.concatenate([self._carry, band[:start]])
            self._carry = None
            if rows.shape[0] < th:
                self._carry = rows
                return
            self._tile_row(rows)
        whole = start + (band.shape[0] - start) // th * th
        for r0 in range(start, whole, th):
            self._tile_row(band[r0 : r0 + th])
        if whole < band.shape[0]:
            self._carry = np.array(band[whole:], dtype="<f4")  # a copy: the band is not kept

    def close(self) -> None:
        """Write the last rows."""
        if self._carry is not None:
            self._tile_row(self._carry)
            self._carry = None
        if self._rows_done != self.rows or self._f.tell() != self._end:
            raise ValueError(f"TIFF got {self._rows_done} rows of {self.rows}")

    def _tile_row(self, rows: np.ndarray) -> None:
        """Cut (r <= th, cols) rows into tiles, a group of tiles at a time, and write them."""
        th, tw = self.tile
        r = rows.shape[0]
        for t0 in range(0, self.tiles_across, self._group.shape[0]):
            t1 = min(self.tiles_across, t0 + self._group.shape[0])
            out = self._group[: t1 - t0]  # (tiles, th, tw)
            c0, c1 = t0 * tw, min(self.cols, t1 * tw)
            full = (c1 - c0) // tw
            out[:full, :r].transpose(1, 0, 2)[...] = rows[:, c0 : c0 + full * tw].reshape(r, full, tw)
            if full < t1 - t0:  # the last tile of the row is partial: zero its padding
                width = c1 - c0 - full * tw
                out[full, :r, :width] = rows[:, c0 + full * tw : c1]
                out[full, :, width:] = 0
            if r < th:  # the last tile row: zero the rows below the image
                out[:, r:] = 0
            self._f.write(out)


def _tiff_header(shape2d: tuple[int, int], tile: tuple[int, int], description: bytes) -> tuple[bytes, int]:
    """Header and IFD of an uncompressed tiled float32 TIFF, and where its file ends."""
    rows, cols = shape2d
    th, tw = tile
    tiles = -(-rows // th) * -(-cols // tw)
    tile_bytes = th * tw * 4
    for big in (False, True):
        offset_type = _LONG8 if big else _LONG
        entries = [  # (tag, type, values), sorted by tag as TIFF requires
            (256, _LONG, [cols]),  # ImageWidth
            (257, _LONG, [rows]),  # ImageLength
            (258, _SHORT, [32]),  # BitsPerSample
            (259, _SHORT, [1]),  # Compression: none
            (262, _SHORT, [1]),  # PhotometricInterpretation: min-is-black
            (270, _ASCII, description + b"\0"),  # ImageDescription
            (277, _SHORT, [1]),  # SamplesPerPixel
            (284, _SHORT, [1]),  # PlanarConfiguration: contiguous
            (322, _LONG, [tw]),  # TileWidth
            (323, _LONG, [th]),  # TileLength
            (324, offset_type, [0] * tiles),  # TileOffsets (filled in below)
            (325, offset_type, [tile_bytes] * tiles),  # TileByteCounts
            (339, _SHORT, [3]),  # SampleFormat: IEEE float
        ]
        data_at = len(_tiff_ifd(entries, big))
        data_at += -data_at % 16
        end = data_at + tiles * tile_bytes
        if big or end <= CLASSIC_MAX:
            break
    entries[10] = (324, offset_type, range(data_at, end, tile_bytes))
    head = _tiff_ifd(entries, big)
    return head + bytes(data_at - len(head)), end


def _tiff_ifd(entries: list, big: bool) -> bytes:
    """File header and one IFD; values that do not fit in an entry follow the IFD."""
    if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
        head, count, entry, slot = struct.pack("<2sHHHQ", b"II", 43, 8, 0, 16), "<Q", "<HHQ", 8
    else:
        head, count, entry, slot = struct.pack("<2sHI", b"II", 42, 8), "<H", "<HHI", 4
    extra_at = len(head) + struct.calcsize(count) + len(entries) * (struct.calcsize(entry) + slot) + slot
    ifd, extra = [struct.pack(count, len(entries))], []
    for tag, kind, values in entries:
        data = values if kind == _ASCII else struct.pack(f"<{len(values)}{_FORMATS[kind]}", *values)
        ifd.append(struct.pack(entry, tag, kind, len(data) if kind == _ASCII else len(values)))
        if len(data) <= slot:
            ifd.append(data.ljust(slot, b"\0"))
        else:
            ifd.append(struct.pack("<Q" if big else "<I", extra_at + sum(map(len, extra))))
            extra.append(data + bytes(len(data) % 2))  # values start on a word boundary
    ifd.append(bytes(slot))  # no next IFD
    return head + b"".join(ifd) + b"".join(extra)


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
        mask = np.isfinite(img)
        every = bool(mask.all())
        finite = img.ravel() if every else img[mask]
        if finite.size > SAMPLE:  # the percentile of a fixed, evenly spaced sample is plenty
            finite = finite[:: finite.size // SAMPLE]
        scale = float(np.percentile(np.abs(finite), PERCENTILE)) if finite.size else 0.0
        scale = scale if scale > 0 else 1.0
        scaled = img  # a copy of the parts: scaled, then (scaled + 1) * 127.5, rounded and clipped, in place
        scaled /= scale
        if not every:
            np.nan_to_num(scaled, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        scaled += 1.0
        scaled *= 127.5
        np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled)
        return png_gray8(scaled.astype(np.uint8))


def png_gray8(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of (rows, cols) uint8 pixels: no row filter, deflate at PNG_LEVEL."""
    rows, cols = pixels.shape
    raw = np.zeros((rows, cols + 1), np.uint8)  # each row starts with its filter type, 0: none
    raw[:, 1:] = pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)  # 8-bit gray, not interlaced
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), PNG_LEVEL))
        + chunk(b"IEND", b"")
    )
