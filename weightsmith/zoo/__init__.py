"""Zoos: K checkpoints of the same tensors, stacked, for the zoo generators.

A zoo lives in a store under `zoos/<id>/`:

    tensors/<key>.zarr   one array per tensor name, (K, *shape) float32, checkpoint k at [k];
                         its `weightsmith` attribute (sha256, stats) is written after its data
    zoo.json             written last: its presence means the zoo is complete

    base/<key>.zarr      (built zoos with a base model) the base's tensor, (1, *shape) float32

`<key>` is `encode_key(name)`, as for a model's tensors. `write_zoo` takes the tensors as a
mapping or as an iterator of (name, stack) pairs, so only one stack need be in memory at a time.
`weightsmith.zoo.build` builds a zoo from models in the store (streaming, resumable, with
provenance), `weightsmith.zoo.align` aligns independently initialised members by permutation.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from weightsmith.errors import WeightsmithError
from weightsmith.stats import RunningStats
from weightsmith.store import Store, arrays, encode_key

ZOO_MANIFEST = "zoo.json"
ZOO_FORMAT = "weightsmith-zoo/1"
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


def zoo_prefix(zoo_id: str) -> str:
    """`zoos/<id>` for a valid id: letters, digits, '-', '_', '.'; no '..', no leading '.'."""
    if not _ID.match(zoo_id) or ".." in zoo_id or zoo_id.startswith("."):
        raise WeightsmithError(
            f"zoo {zoo_id!r}",
            "ids use letters, digits, '-', '_' and '.' (not leading, never '..')",
        )
    return f"zoos/{zoo_id}"


def zoo_tensor_key(zoo_id: str, name: str) -> str:
    """Store key of the stacked checkpoints of tensor `name`."""
    return f"{zoo_prefix(zoo_id)}/tensors/{encode_key(name)}.zarr"


def write_zoo(
    store: Store,
    zoo_id: str,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    attrs: Mapping | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a zoo: each tensor's stack, then zoo.json.

    Args:
        store: the store to write into.
        zoo_id: the zoo's id (see `zoo_prefix`).
        tensors: name -> (K, *shape) stack of real values (stored as float32), as a mapping or
            an iterator of (name, stack) pairs; every stack has the same K.
        attrs: JSON-able facts kept in zoo.json, e.g. {"source": ..., "checkpoints": [...]}.
        overwrite: replace an existing zoo of this id (its zoo.json goes first).

    Returns:
        The zoo manifest, as written to zoo.json.
    """
    prefix = zoo_prefix(zoo_id)
    manifest_key = f"{prefix}/{ZOO_MANIFEST}"
    if store.exists(manifest_key):
        if not overwrite:
            raise WeightsmithError(store.url_of(prefix), "zoo already exists (pass overwrite=True to replace it)")
        store.delete(manifest_key)  # first: a half-replaced zoo is never complete
        store.delete(prefix)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    records: dict[str, dict] = {}
    k = None
    for name, stack in items:
        values = np.asarray(stack)
        if name in records:
            raise WeightsmithError(f"zoo {zoo_id!r}", f"tensor {name!r} given twice")
        if values.ndim < 1 or values.dtype.kind in "cOSUM":
            raise WeightsmithError(name, f"a zoo stack is (K, ...) of real values, got {values.dtype} {values.shape}")
        if k is not None and values.shape[0] != k:
            raise WeightsmithError(name, f"has {values.shape[0]} checkpoints, the zoo has {k}")
        k = values.shape[0]
        records[name] = _write_stack(store, zoo_tensor_key(zoo_id, name), name, values)
    if k is None:
        raise WeightsmithError(f"zoo {zoo_id!r}", "no tensors given")
    manifest = {
        "format": ZOO_FORMAT,
        "id": zoo_id,
        "checkpoints": k,
        "tensors": records,
        "attrs": dict(attrs or {}),
    }
    store.write_json(manifest_key, manifest)
    return manifest


def read_zoo(store: Store, zoo_id: str) -> dict:
    """The zoo's manifest; a missing or incomplete zoo is a one-line error."""
    prefix = zoo_prefix(zoo_id)
    try:
        manifest = store.read_json(f"{prefix}/{ZOO_MANIFEST}")
    except FileNotFoundError:
        raise WeightsmithError(store.url_of(prefix), "no zoo.json: the zoo is missing or incomplete") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ZOO_FORMAT:
        raise WeightsmithError(store.url_of(prefix), f"zoo.json is not a {ZOO_FORMAT} manifest")
    return manifest


def read_zoo_tensor(store: Store, zoo_id: str, name: str) -> np.ndarray:
    """The K checkpoints of tensor `name`, stacked: (K, *shape) float32."""
    manifest = read_zoo(store, zoo_id)
    records = manifest["tensors"]
    if name not in records:
        raise WeightsmithError(f"zoo {zoo_id!r}", f"has no tensor {name!r}")
    # zoo.json is the authority on K: a growing zoo's arrays may hold rows of an unfinished append
    k = manifest["checkpoints"]
    return np.asarray(arrays.open_array(store, records[name]["key"])[:k], dtype=np.float32)


def read_zoo_base(store: Store, zoo_id: str, name: str) -> np.ndarray | None:
    """The base model's tensor `name` (one member's shape, float32), or None for a zoo without a base."""
    base = read_zoo(store, zoo_id).get("base")
    if not base:
        return None
    if name not in base["tensors"]:
        raise WeightsmithError(f"zoo {zoo_id!r}", f"its base has no tensor {name!r}")
    return np.asarray(arrays.open_array(store, base["tensors"][name]["key"])[0], dtype=np.float32)


def list_zoos(store: Store) -> list[str]:
    """Ids of the complete zoos in the store, sorted."""
    found = (key.split("/") for key in store.list("zoos"))
    return sorted(p[1] for p in found if len(p) == 3 and p[2] == ZOO_MANIFEST)


@dataclass(frozen=True)
class ZooInfo:
    """What `zoo ls` and `zoo show` print about a complete zoo."""

    id: str
    url: str
    checkpoints: int  # K
    tensors: int
    bytes: int  # everything under zoos/<id>/
    align: str  # "none" | "permutation" (zoos written by write_zoo: "none")
    ordered: bool | None  # None: not recorded (zoos written by write_zoo)
    base: dict | None  # url, slug, revision, manifest_sha256 of the base model
    family: str | None = None  # the base model's id of a leaderboard family zoo
    members: list[dict] = field(default_factory=list)  # url, slug, revision, manifest_sha256 (built zoos)
    tensor_shapes: dict[str, list[int]] = field(default_factory=dict)  # name -> one member's shape


def describe_zoo(store: Store, zoo_id: str) -> ZooInfo:
    """Members, sizes and provenance of a complete zoo."""
    m = read_zoo(store, zoo_id)
    base = m.get("base")
    return ZooInfo(
        id=zoo_id,
        url=store.url_of(zoo_prefix(zoo_id)),
        checkpoints=m["checkpoints"],
        tensors=len(m["tensors"]),
        bytes=store.size(zoo_prefix(zoo_id)),
        align=m.get("align", "none"),
        ordered=m.get("ordered"),
        base={k: v for k, v in base.items() if k != "tensors"} if base else None,
        family=m.get("family"),
        members=list(m.get("members", [])),
        tensor_shapes={n: r["shape"] for n, r in m["tensors"].items()},
    )


def _write_stack(store: Store, key: str, name: str, values: np.ndarray) -> dict:
    """One (K, *shape) stack as float32, row block by row block; its record written last."""
    rows = arrays.chunk_rows(tuple(values.shape), 4)  # checkpoints per chunk
    blocks = (values[r0 : r0 + rows] for r0 in range(0, values.shape[0], rows))
    return write_stack(store, key, name, tuple(values.shape), blocks)


class StackWriter:
    """A (K, *shape) float32 stack being written, whole checkpoints appended in order.

    `finish` writes the array's record (name, key, one checkpoint's shape, sha256 of the float32
    values in C order, stats, plus `extra`) after the data: an array without it is unfinished.
    """

    def __init__(self, store: Store, key: str, name: str, shape: tuple[int, ...]):
        attrs = {"dtype": "F32", "shape": list(shape), "encoding": "raw"}
        self.key, self.name, self.shape = key, name, tuple(shape)
        self._array = arrays.create(store, key, self.shape, np.dtype("<f4"), attrs)
        self._hash = hashlib.sha256()
        self._stats = RunningStats()

    def append(self, values: np.ndarray) -> None:
        """The next checkpoints: (n, *shape[1:])."""
        block = np.ascontiguousarray(values, dtype="<f4")
        self._array.append(block)
        self._hash.update(block.view(np.uint8))
        self._stats.update(block)

    def finish(self, extra: Mapping | None = None) -> dict:
        record = {
            "name": self.name,
            "key": self.key,
            "shape": list(self.shape[1:]),  # one checkpoint's shape
            "sha256": self._hash.hexdigest(),  # of the float32 (K, *shape) values in C order
            "stats": self._stats.as_dict(),
            **(extra or {}),
        }
        self._array.finish(record)
        return record


def write_stack(
    store: Store,
    key: str,
    name: str,
    shape: tuple[int, ...],
    blocks: Iterable[np.ndarray],
    extra: Mapping | None = None,
) -> dict:
    """Stream a (K, *shape) float32 stack from blocks of whole checkpoints; returns its record."""
    writer = StackWriter(store, key, name, shape)
    for block in blocks:
        writer.append(block)
    return writer.finish(extra)
