"""Images of a tensor in the store: statistics, float32 TIFF and PNG preview from row bands.

Shared by extraction (source tensors) and prediction (predicted tensors): both stream float32
row bands of the tensor's 2-D view through `write_images` once.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator

import numpy as np

from weightsmith import images
from weightsmith.stats import RunningStats
from weightsmith.store import Store


def write_images(
    store: Store, tiff_key: str, png_key: str, name: str, shape, dtype: str, bands: Iterable[np.ndarray], mode: str
) -> tuple[dict, dict]:
    """Consume the float32 bands: statistics always, TIFF/PNG as `mode` (all|preview|none) asks.

    Returns (statistics, artifacts): artifact keys, with the sha256 of the PNG and of a
    compressed TIFF (an uncompressed one is checked against the array's values instead).
    """
    stats = RunningStats()
    shape2d = images.view_2d(tuple(shape))
    if 0 in shape2d:
        mode = "none"  # an empty tensor has no image (TIFF and PNG need at least one pixel)
    preview = images.Preview(shape2d) if mode != "none" else None

    def observed() -> Iterator[np.ndarray]:
        for band in bands:
            stats.update(band)
            if preview is not None:
                preview.add(band)
            yield band

    artifacts: dict[str, str] = {}
    if mode == "all":
        tmp = _tmp_path(store, ".tiff")
        try:
            meta = {"name": name, "shape": list(shape), "dtype": dtype}
            sha = images.write_tiff(tmp, observed(), shape2d, meta)
            store.put_file(tmp, tiff_key)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        artifacts["tiff"] = tiff_key
        if sha is not None:  # compressed: else verify rebuilds the TIFF from the array to check it
            artifacts["tiff_sha256"] = sha
    else:
        for _ in observed():
            pass
    if preview is not None:
        png = preview.png_bytes()
        store.write_bytes(png_key, png)
        artifacts["png"] = png_key
        artifacts["png_sha256"] = hashlib.sha256(png).hexdigest()
    return stats.as_dict(), artifacts


def _tmp_path(store: Store, suffix: str) -> str:
    """A fresh temporary file name on the store's own file system (a rename publishes it), else in state.

    The file is not created here: opening an existing file with O_TRUNC, even an empty one, makes
    ext4 start writing it back to disk when it is closed (auto_da_alloc), which cost CPU and disk
    time during extraction. A new name opened with "wb" is created, not truncated.
    """
    folder = store.local_tmp_dir()
    if folder is None:
        from weightsmith.state import tmp_dir

        folder = tmp_dir()
    return os.path.join(folder, f"tmp{uuid.uuid4().hex}{suffix}")
