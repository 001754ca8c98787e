"""Zoos that grow one member at a time: the family zoos of the leaderboard batches.

A family zoo holds the fine-tunes of one base model, `zoos/family-<base>/`. Each newly
processed model of the family is appended along axis 0 of every stack: the arrays are chunked
one member per chunk, so an append resizes the array and writes the new member's chunks only;
existing members are never rewritten. `zoo.json` is rewritten last, with a conditional write,
and is the authority on K: rows past its `checkpoints` (left by an append that died before
zoo.json) are overwritten by the next append and never read.

A model whose selected tensors differ from the zoo's (names or shapes), or whose selection is
larger than the per-member cap, is not appended; the result says why. Appending a model that is
already a member changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightsmith.errors import WeightsmithError
from weightsmith.stats import RunningStats
from weightsmith.store import Store, arrays
from weightsmith.store.store import dumps
from weightsmith.zoo import ZOO_FORMAT, ZOO_MANIFEST, StackWriter, zoo_prefix, zoo_tensor_key
from weightsmith.zoo.build import first_difference, member_of, read_member_tensor, select_tensors


class GrowOptions(BaseModel):
    """Which tensors a family zoo holds and how large a member may be."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    include: tuple[str, ...] = ()  # glob patterns over tensor names; empty: every tensor
    max_member_bytes: int | None = Field(None, ge=1)  # float32 bytes of one member's selection; None: no cap


@dataclass(frozen=True)
class AppendResult:
    """What appending one model to a zoo did."""

    zoo_id: str
    status: Literal["appended", "present", "skipped"]
    reason: str  # why it was skipped, else ""
    checkpoints: int  # K after this call


def family_zoo_id(family: str) -> str:
    """`family-<base model id>`, with '/' as '--' and anything else outside [A-Za-z0-9_.-] as '-'."""
    return "family-" + re.sub(r"[^A-Za-z0-9_.-]", "-", family.strip().replace("/", "--")).strip(".")


def append_member(
    store: Store | str, zoo_id: str, model_url: str, options: GrowOptions, family: str | None = None
) -> AppendResult:
    """Append the model to zoo `zoo_id` (created with it as the first member when absent).

    Raises:
        WeightsmithError: the model is missing or incomplete, the zoo was not built to grow,
            or another writer changed zoo.json meanwhile.
    """
    store = store if isinstance(store, Store) else Store(store)
    prefix = zoo_prefix(zoo_id)
    member, manifest = member_of(model_url)
    selected = select_tensors(member, manifest, options.include)
    try:
        raw = store.read_bytes(f"{prefix}/{ZOO_MANIFEST}")
        zoo = json.loads(raw)
    except FileNotFoundError:
        raw, zoo = None, None
    k = zoo["checkpoints"] if zoo else 0
    if zoo and any(m["url"] == member.url for m in zoo.get("members", [])):
        return AppendResult(zoo_id, "present", "", k)
    if not selected:
        return AppendResult(zoo_id, "skipped", f"no tensor matches {' '.join(options.include) or '*'}", k)
    nbytes = 4 * sum(math.prod(s) for s in selected.values())
    if options.max_member_bytes is not None and nbytes > options.max_member_bytes:
        return AppendResult(
            zoo_id, "skipped", f"selected tensors are {nbytes:,} float32 bytes (cap {options.max_member_bytes:,})", k
        )
    if zoo:
        if not zoo.get("growable"):
            raise WeightsmithError(store.url_of(prefix), "this zoo was not built to grow (zoo build makes fixed zoos)")
        want = {n: tuple(r["shape"]) for n, r in zoo["tensors"].items()}
        problem = first_difference(want, selected, "the zoo")
        if problem:
            return AppendResult(zoo_id, "skipped", problem, k)
    records = {}
    for name, shape in selected.items():
        values = read_member_tensor(member, name, shape)
        records[name] = _append_row(store, zoo_tensor_key(zoo_id, name), name, shape, k, values)
    manifest_out = {
        "format": ZOO_FORMAT,
        "id": zoo_id,
        "checkpoints": k + 1,
        "tensors": records,
        "attrs": {},
        "members": [*(zoo["members"] if zoo else []), asdict(member)],
        "base": None,
        "family": family,
        "ordered": False,
        "align": "none",
        "include": list(options.include),
        "growable": True,
    }
    data = dumps(manifest_out)
    key = f"{prefix}/{ZOO_MANIFEST}"
    written = store.create_if_absent(key, data) if raw is None else store.replace_if_match(key, data, raw)
    if not written:
        raise WeightsmithError(store.url_of(key), "another writer changed the zoo meanwhile; run again")
    return AppendResult(zoo_id, "appended", "", k + 1)


def _append_row(store: Store, key: str, name: str, shape: tuple[int, ...], k: int, values: np.ndarray) -> dict:
    """Write `values` as row k of the (k + 1, *shape) stack; returns the stack's new record.

    Rows are one chunk each, so rows 0..k-1 are not touched. The record's sha256 and stats
    cover all k + 1 rows: the earlier rows are read (not written) to compute them.
    """
    if k == 0:
        writer = StackWriter(store, key, name, (1, *shape))
        writer.append(values[None])
        return writer.finish()
    array = arrays.open_array(store, key, mode="r+")
    if array.chunks[0] != 1:
        raise WeightsmithError(store.url_of(key), "stack is not chunked one member per chunk: it cannot grow")
    array.resize((k + 1, *shape))
    array[k] = np.asarray(values, np.float32)
    h = hashlib.sha256()
    stats = RunningStats()
    for row in range(k + 1):
        block = np.ascontiguousarray(array[row : row + 1], "<f4")  # (1, *shape)
        h.update(block.view(np.uint8))
        stats.update(block)
    record = {"name": name, "key": key, "shape": list(shape), "sha256": h.hexdigest(), "stats": stats.as_dict()}
    array.attrs.update({"shape": [k + 1, *shape], arrays.RECORD: record})
    return record
