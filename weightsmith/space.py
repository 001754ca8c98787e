"""Disk space: what an extraction will write, checked against a local store's free space
before anything is written (a run that cannot fit fails at once, with one line)."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from weightsmith.errors import WeightsmithError

if TYPE_CHECKING:
    from weightsmith.sources import Source
    from weightsmith.store import Store

_PREVIEW_BYTES = 1024 * 1024  # an 8-bit PNG preview is at most 1024 x 1024 pixels
# Per tensor: zarr.json, its record, TIFF and PNG headers, and the 4 KB blocks that ~4 small
# files and ~3 folders take on a local file system.
_PER_TENSOR_BYTES = 32 * 1024


class Unit(Protocol):
    """What the estimate needs of a planned work unit (weightsmith.extract.WorkUnit)."""

    names: tuple[str, ...]
    nbytes: int


def estimate_output_bytes(
    source_bytes: int, images: str, *, float32_bytes: int | None = None, tensors: int | None = None
) -> int:
    """Store bytes an extraction of `source_bytes` source bytes needs, roughly and generously.

    Zarr arrays hold the exact values (~1x: lz4 saves little on weights); `images="all"` adds a
    float32 TIFF of every tensor (`float32_bytes` when the caller knows it, else 2x the source,
    right for 16-bit dtypes; 8-bit and GGUF blocks expand more, small tensors pad to tiles);
    previews add one 8-bit pixel per value at most, capped at 1024 x 1024 per tensor. With
    `tensors`, each adds its small files and the file system blocks they take. Plus 5% and 1 MB.
    """
    view = 2 * source_bytes if float32_bytes is None else float32_bytes
    total = source_bytes + (tensors or 0) * _PER_TENSOR_BYTES
    if images == "all":
        total += view
    if images in ("all", "preview"):
        pixels = view // 4
        total += pixels if tensors is None else min(pixels, tensors * _PREVIEW_BYTES)
    return total + total // 20 + (1 << 20)


def estimate_extract_bytes(source: Source, units: Iterable[Unit], images: str) -> int:
    """`estimate_output_bytes` for the planned units of a source, TIFF sizes from the shapes.

    A GPTQ weight also stores its dequantised float32 array beside its packed components.
    """
    from weightsmith import images as tiff

    def tiff_bytes(shape: tuple[int, ...]) -> int:
        # float32 tiles as weightsmith.images.write_tiff cuts them: 16..256 a side
        rows, cols = tiff.view_2d(tuple(shape))
        tile_rows, tile_cols = (min(tiff.TILE, max(16, -(-n // 16) * 16)) for n in (rows, cols))
        return 4 * -(-rows // tile_rows) * tile_rows * -(-cols // tile_cols) * tile_cols

    gptq = {g.name: g.shape for g in source.groups}
    names = [n for u in units for n in u.names]
    shapes = {n: gptq[n] if n in gptq else source.tensors[n].shape for n in names}
    stored = sum(u.nbytes for u in units) + sum(4 * math.prod(shapes[n]) for n in names if n in gptq)
    return estimate_output_bytes(
        stored,
        images,
        float32_bytes=sum(tiff_bytes(s) for s in shapes.values()),
        tensors=len(names),
    )


def check_free_space(store: Store, needed_bytes: int) -> None:
    """Raise a one-line error when a local store's disk has less than `needed_bytes` free.

    S3 stores are not checked: a bucket has no free space to ask about, and a quota shows up
    as a failed write, which the run reports.
    """
    if store.protocol != "file":
        return
    path = store.root
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)  # the store folder is created on first write
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise WeightsmithError(
            store.url,
            f"needs about {format_bytes(needed_bytes)} free, has {format_bytes(free)} "
            "(free some space, e.g. with `weightsmith gc`, or use another --store)",
        )


def format_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (SI units, as `parse_size` reads them)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
