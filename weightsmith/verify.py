"""Verify: re-read every artifact of a model and check it against its manifest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from weightsmith.model import ModelRef, parse_model_url
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
    """Check every tensor array (sha256 of its values), image, preview and file."""
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
        for kind in ("tiff", "png"):
            if kind in arts:
                _check_object(model, arts[kind], arts.get(f"{kind}_sha256"), f"{kind} of {name!r}", report)
        if progress:
            progress(1, name)
    return report


def array_sha256(model: ModelRef, record: dict) -> str:
    """sha256 of an array's values as raw little-endian bytes (the source bytes for raw tensors)."""
    array = arrays.open_array(model.store, record["artifacts"]["zarr"])
    if list(array.attrs.get("shape", [])) != record["shape"] or array.attrs.get("dtype") != record["dtype"]:
        raise ValueError("shape or dtype attributes differ from the manifest")
    h = hashlib.sha256()
    if array.ndim == 0:
        h.update(np.asarray(array[()]).tobytes())
        return h.hexdigest()
    row = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
    step = max(array.chunks[0], READ_BYTES // row // array.chunks[0] * array.chunks[0])
    for r0 in range(0, array.shape[0], step):
        h.update(np.ascontiguousarray(array[r0 : r0 + step]).tobytes())
    return h.hexdigest()


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
