"""Verify: re-read every artifact of a model and check it against its manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from weightsmith import images
from weightsmith.model import ModelRef, parse_model_url
from weightsmith.sources.base import TensorEntry
from weightsmith.store import arrays

READ_BYTES = 64 << 20  # re-read arrays and objects in pieces of about this size


@dataclass
class VerifyReport:
    model_url: str
    checked: int = 0  # artifacts checked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(model_url: str, progress=None) -> VerifyReport:
    """Check every tensor array (sha256 of its values), image, preview and file.

    A TIFF with a sha256 in the manifest (compressed) is checked by it; an uncompressed one by
    rebuilding its bytes from the array's values, as the extraction wrote them.
    """
    model = parse_model_url(model_url)
    manifest = model.manifest()
    report = VerifyReport(model.url)
    for name, info in manifest.get("files", {}).items():
        _check_object(model, info["key"], info["sha256"], f"file {name!r}", report)
    for name, record in manifest["tensors"].items():
        arts = record.get("artifacts", {})
        try:
            sha = array_sha256(model, record)
        except Exception as e:  # a missing or corrupt array: report it, go on
            report.problems.append(f"tensor {name!r}: cannot read {arts.get('zarr')} ({e})")
            sha = None
        report.checked += 1
        if sha is not None and sha != record["sha256"]:
            report.problems.append(f"tensor {name!r}: values do not match the manifest checksum")
        if "tiff" in arts and "tiff_sha256" not in arts:
            if sha == record["sha256"]:  # rebuilt from the array: a bad array is reported above
                _check_tiff(model, record, report)
        elif "tiff" in arts:
            _check_object(model, arts["tiff"], arts["tiff_sha256"], f"tiff of {name!r}", report)
        if "png" in arts:
            _check_object(model, arts["png"], arts.get("png_sha256"), f"png of {name!r}", report)
        if progress:
            progress(1, name)
    return report


def array_sha256(model: ModelRef, record: dict) -> str:
    """sha256 of an array's values as raw little-endian bytes (the source bytes for raw tensors)."""
    array = arrays.open_array(model.store, record["artifacts"]["zarr"])
    if list(array.attrs.get("shape", [])) != record["shape"] or array.attrs.get("dtype") != record["dtype"]:
        raise ValueError("shape or dtype attributes differ from the manifest")
    h = hashlib.sha256()
    for block in _blocks(array):
        h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def _blocks(array) -> Iterator[np.ndarray]:
    """The stored values in whole chunks of rows, about READ_BYTES at a time (0-d: one value)."""
    if array.ndim == 0:
        yield np.asarray(array[()])
        return
    row = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
    step = max(array.chunks[0], READ_BYTES // row // array.chunks[0] * array.chunks[0])
    for r0 in range(0, array.shape[0], step):
        yield np.asarray(array[r0 : r0 + step])


def _check_tiff(model: ModelRef, record: dict, report: VerifyReport) -> None:
    """An uncompressed TIFF has no digest in the manifest: rebuild its bytes from the array."""
    from weightsmith.extract import float_rows

    report.checked += 1
    key, what = record["artifacts"]["tiff"], f"tiff of {record['name']!r}"
    meta = {"name": record["name"], "shape": record["shape"], "dtype": record["dtype"]}
    try:
        array = arrays.open_array(model.store, record["artifacts"]["zarr"])
        gguf = record.get("encoding") == "gguf"
        entry = TensorEntry(
            record["name"],
            record["dtype"],
            tuple(record["shape"]),
            0,
            0,
            0,
            record.get("encoding", "raw"),
            array.shape[-1] if gguf else 0,
        )
        bands = (float_rows(entry, block) for block in _blocks(array))
        with model.store.fs.open(model.store.path(key), "rb") as f:
            same = images.tiff_matches(f, bands, images.view_2d(entry.shape), meta)
    except FileNotFoundError:
        report.problems.append(f"{what}: {key} is missing")
        return
    except Exception as e:  # the TIFF's or the array's store failed under us
        report.problems.append(f"{what}: cannot check {key} against the array ({e})")
        return
    if not same:
        report.problems.append(f"{what}: {key} does not match the tensor's values")


def _check_object(model: ModelRef, key: str, sha: str | None, what: str, report: VerifyReport) -> None:
    report.checked += 1
    try:
        h = hashlib.sha256()
        with model.store.fs.open(model.store.path(key), "rb") as f:
            while chunk := f.read(READ_BYTES):
                h.update(chunk)
    except FileNotFoundError:
        report.problems.append(f"{what}: {key} is missing")
        return
    if sha is not None and h.hexdigest() != sha:
        report.problems.append(f"{what}: {key} does not match its checksum")
