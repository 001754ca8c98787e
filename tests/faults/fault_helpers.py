"""What the fault tests share: source models of random tensors, and waiting for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from weightsmith.model import ModelRef
from weightsmith.store import arrays
from weightsmith.verify import array_sha256


def write_model(path: Path, tensors: int, rows: int = 64, cols: int = 256, *, seed: int) -> Path:
    """`tensors` random float32 (rows, cols) tensors: random values do not compress, so every
    chunk is a real object in the store and the size on disk is predictable."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {f"layer.{i}.weight": rng.standard_normal((rows, cols)).astype(np.float32) for i in range(tensors)}
    save_file(values, str(path))
    return path


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, *, poll: float, log: Path | None = None
) -> None:
    """Check `predicate` every `poll` seconds until it holds; after `timeout` seconds the test
    fails, with the end of `log` where there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    message = f"timed out after {timeout:.0f} s waiting for {what}"
    pytest.fail(message if log is None else f"{message}\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def count_whole_tensors(
    model: ModelRef, names: Iterable[str], reference: dict | None = None, images: bool = False
) -> int:
    """How many of `names` are finished (have a record). Each finished tensor must hold the values
    its record names, equal the `reference` record (name -> record) when given, and with `images`
    have its TIFF and PNG in the store."""
    finished = 0
    for name in names:
        record = arrays.read_record(model.store, model.tensor_key(name))
        if record is None:
            continue
        finished += 1
        if reference is not None:
            assert record == reference[name], name
        assert array_sha256(model, record) == record["sha256"], name
        for kind in ("tiff", "png") if images else ():
            assert model.store.exists(record["artifacts"][kind]), (name, kind)
    return finished
