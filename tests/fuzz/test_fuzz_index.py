"""Fuzzing sharded sources: `model.safetensors.index.json` documents with hostile weight maps.

Each example writes a folder with two valid shards, an index drawn by hypothesis (random JSON,
weight_map values with `..`, absolute paths, separators, NUL, non-strings, very long names;
broken UTF-8, truncations, deep nesting) and, beside the folder, a `secret.safetensors` that
must never be opened. `open_source` on the index either returns or raises `WeightsmithError`
with a one-line message; any other exception fails. Every range it reads lies inside a file of
the model's folder and inside that file; it stays under a traced-memory cap.

The budget is small and fixed for CI; `WEIGHTSMITH_FUZZ_EXAMPLES=N` raises it (docs/FUZZING.md).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from fuzz_helpers import accepted_or_refused, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from weightsmith.errors import WeightsmithError
from weightsmith.ranged import RangedReader
from weightsmith.sources import open_source
from weightsmith.sources.source import INDEX_NAME, MAX_INDEX_BYTES

FUZZ = fuzz_settings(200)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
TENSORS = {"a": SHARDS[0], "b": SHARDS[0], "c": SHARDS[1]}


def shard_bytes(names: list[str]) -> bytes:
    header = {n: {"dtype": "U8", "shape": [2], "data_offsets": [2 * i, 2 * i + 2]} for i, n in enumerate(names)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(range(2 * len(names)))


def open_checked(index: bytes) -> tuple[object, list[tuple[str, int, int, int]]]:
    """open_source on `index` in a fresh folder; (source or None, every read made)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "secret.safetensors").write_bytes(shard_bytes(["a", "b", "c"]))
        folder = Path(tmp) / "model"
        folder.mkdir()
        for shard in SHARDS:
            (folder / shard).write_bytes(shard_bytes([n for n, s in TENSORS.items() if s == shard]))
        (folder / INDEX_NAME).write_bytes(index)
        reads: list[tuple[str, int, int, int]] = []
        original = RangedReader.read

        def recording(self: RangedReader, start: int, end: int) -> bytes:
            reads.append((self.path, start, end, self.size))
            return original(self, start, end)

        def open_recorded() -> object:
            with mock.patch.object(RangedReader, "read", recording):
                return open_source(str(folder / INDEX_NAME))

        source = accepted_or_refused(open_recorded, "open_source")
        for path, start, end, size in reads:
            assert os.path.dirname(path) == str(folder), f"read {path} outside the model folder"
            assert 0 <= start <= end <= size == os.path.getsize(path), (path, start, end, size)
        if source is not None:
            assert all(os.path.dirname(r.path) == str(folder) for r in source.readers)
            assert set(source.tensors) == set(json.loads(index)["weight_map"])
        return source, reads


# ---------------------------------------------------------------------------------------------
# strategies

json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)


json_any = st.recursive(json_leaf, _containers, max_leaves=10)
hostile_names = st.sampled_from(
    [
        "../secret.safetensors",
        "..",
        ".",
        "",
        "/etc/passwd",
        "model/../secret.safetensors",
        "sub/model-00001-of-00002.safetensors",
        "..\\secret.safetensors",
        "secret.safetensors",
        "model-00001-of-00002.safetensors\x00.txt",
        "model-00001-of-00002.safetensors/",
        "~/secret.safetensors",
        "%2e%2e/secret.safetensors",
        "model-00001-of-00002.json",
        "x" * 5000 + ".safetensors",
        "model-00001-of-00002.SAFETENSORS",
    ]
)
shard_values = st.sampled_from(SHARDS) | hostile_names | json_any | st.text(max_size=12)


@st.composite
def index_documents(draw) -> bytes:
    how = draw(st.sampled_from(["map", "map", "map", "json", "bytes", "deep"]))
    if how == "json":
        return json.dumps(draw(json_any)).encode()
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "deep":
        n = draw(st.integers(100, 200_000))
        return b'{"weight_map": ' + b"[" * n + b"]" * n + b"}"
    weight_map = dict(TENSORS) if draw(st.booleans()) else {}
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        weight_map[draw(st.sampled_from(sorted(TENSORS)) | st.text(max_size=6))] = draw(shard_values)
    doc: dict = {"metadata": draw(json_any), "weight_map": weight_map}
    if draw(st.integers(0, 9)) == 0:
        doc["weight_map"] = draw(json_any)
    raw = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    cut = draw(st.sampled_from([None, None, None, "cut"]))
    cut = draw(st.integers(0, len(raw))) if cut else None
    return raw if cut is None else raw[:cut]


# ---------------------------------------------------------------------------------------------
# properties


@FUZZ
@given(index_documents())
def test_hostile_indexes_are_opened_or_refused_cleanly(index: bytes) -> None:
    open_checked(index)


def test_the_valid_index_opens() -> None:
    source, _ = open_checked(json.dumps({"weight_map": TENSORS}).encode())
    assert source is not None and sorted(source.tensors) == ["a", "b", "c"]


@pytest.mark.parametrize("shard", ["../secret.safetensors", "/ABS/secret.safetensors", "sub/x.safetensors"])
def test_weight_map_outside_the_folder_is_refused_before_any_read(shard: str, tmp_path: Path) -> None:
    index = {"weight_map": {**TENSORS, "a": shard.replace("/ABS", str(tmp_path))}}
    source, reads = open_checked(json.dumps(index).encode())
    assert source is None
    assert [os.path.basename(p) for p, *_ in reads] == [INDEX_NAME]


def test_index_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    """A sparse file one byte over the limit: refused from its size alone."""
    folder = tmp_path / "model"
    folder.mkdir()
    with open(folder / INDEX_NAME, "wb") as f:
        f.truncate(MAX_INDEX_BYTES + 1)
    with mock.patch.object(RangedReader, "read", side_effect=AssertionError("read")):
        with pytest.raises(WeightsmithError, match="limit"):
            open_source(str(folder))


def test_large_index_stays_under_the_memory_cap() -> None:
    """2 MB of weight_map entries naming a missing shard: a one-line error, bounded memory."""
    weight_map = {f"model.layers.{i}.weight": "model-00009-of-00009.safetensors" for i in range(40_000)}
    source, _ = open_checked(json.dumps({"weight_map": {**TENSORS, **weight_map}}).encode())
    assert source is None
