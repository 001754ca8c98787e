"""Tests for zoo storage (weightsmith.zoo) on a local store in tmp_path."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from weightsmith.errors import WeightsmithError
from weightsmith.store import Store, arrays, encode_key
from weightsmith.zoo import (
    ZOO_FORMAT,
    list_zoos,
    read_zoo,
    read_zoo_tensor,
    write_zoo,
    zoo_tensor_key,
)

K = 5


def stacks(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.0.mlp.weight": rng.standard_normal((K, 12, 7)).astype(np.float32),
        "model.norm.bias": rng.standard_normal((K, 7)).astype(np.float16),
        "odd/name with spaces": rng.standard_normal((K, 3, 2, 2)).astype(ml_dtypes.bfloat16),
    }


def test_write_read_round_trip(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    tensors = stacks()
    manifest = write_zoo(store, "lora-zoo_1.0", tensors, {"source": "a test"})
    assert manifest == read_zoo(store, "lora-zoo_1.0")
    assert manifest["format"] == ZOO_FORMAT and manifest["checkpoints"] == K
    assert manifest["attrs"] == {"source": "a test"}
    assert list(manifest["tensors"]) == list(tensors)
    for name, values in tensors.items():
        want = values.astype(np.float32)
        record = manifest["tensors"][name]
        assert record["shape"] == list(values.shape[1:])
        assert record["key"] == f"zoos/lora-zoo_1.0/tensors/{encode_key(name)}.zarr"
        assert record["sha256"] == hashlib.sha256(want.tobytes()).hexdigest()
        assert record["stats"]["mean"] == pytest.approx(float(want.mean(dtype=np.float64)))
        got = read_zoo_tensor(store, "lora-zoo_1.0", name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        assert arrays.read_record(store, zoo_tensor_key("lora-zoo_1.0", name)) == record
    assert list_zoos(store) == ["lora-zoo_1.0"]
    with pytest.raises(WeightsmithError, match="has no tensor 'nope'"):
        read_zoo_tensor(store, "lora-zoo_1.0", "nope")


def test_zoo_json_is_written_last(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))

    def failing() -> Iterator[tuple[str, np.ndarray]]:
        yield from stacks().items()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_zoo(store, "z", failing())
    assert store.exists(zoo_tensor_key("z", "model.norm.bias"))  # data came first
    assert not store.exists("zoos/z/zoo.json") and list_zoos(store) == []
    with pytest.raises(WeightsmithError, match="no zoo.json: the zoo is missing or incomplete"):
        read_zoo(store, "z")

    # the manifest is the last object written, after every tensor's record
    written: list[str] = []
    write_json = store.write_json
    store.write_json = lambda key, value: (written.append(key), write_json(key, value))[1]
    write_zoo(store, "z", iter(stacks().items()))
    assert written[-1] == "zoos/z/zoo.json"
    assert list_zoos(store) == ["z"]


def test_overwrite_and_bad_input(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    write_zoo(store, "z", stacks(0))
    with pytest.raises(WeightsmithError, match="zoo already exists"):
        write_zoo(store, "z", stacks(1))
    write_zoo(store, "z", {"only": np.ones((2, 3))}, overwrite=True)
    assert list(read_zoo(store, "z")["tensors"]) == ["only"]
    assert not store.exists(zoo_tensor_key("z", "model.norm.bias"))  # old tensors are gone
    np.testing.assert_array_equal(read_zoo_tensor(store, "z", "only"), np.ones((2, 3)))

    for bad in ("", "..", "a/b", ".hidden", "a..b", "é"):
        with pytest.raises(WeightsmithError, match="ids use letters, digits"):
            write_zoo(store, bad, stacks())
    with pytest.raises(WeightsmithError, match="has 3 checkpoints, the zoo has 2"):
        write_zoo(store, "y", [("a", np.ones((2, 4))), ("b", np.ones((3, 4)))])
    with pytest.raises(WeightsmithError, match="given twice"):
        write_zoo(store, "y", [("a", np.ones((2, 4))), ("a", np.ones((2, 4)))])
    with pytest.raises(WeightsmithError, match="real values"):
        write_zoo(store, "y", {"c": np.ones((2, 4), dtype=np.complex64)})
    with pytest.raises(WeightsmithError, match="no tensors given"):
        write_zoo(store, "y", {})
    assert list_zoos(store) == ["z"]
