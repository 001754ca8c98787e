"""Build a zoo from models in the store: plan from their manifests, then one stack at a time.

The stages, each usable on its own (the `build-zoo` flow maps over them):
1. `prepare` reads every member's manifest (and the base model's), selects the tensors
   (`include` globs), checks that every member has the same names and shapes, and returns a
   frozen `ZooPlan` of `StackUnit`s: one tensor each, or with `align="permutation"` the tensors
   of one MLP block together (they share one permutation). Nothing is written before it passes.
2. `build_unit` streams a unit's stacks into `zoos/<id>/tensors/<key>.zarr`, member by member:
   each member's tensor is read as float32 (GPTQ and GGUF dequantised, BF16/F16 widened
   exactly), aligned to the reference (member 0) when asked, and appended as row k. Memory is
   about one member's tensor (with alignment: the reference's block and one member's block).
   A stack whose record carries the plan's fingerprint is complete and skipped (resume).
3. `publish` reads the records back and writes `zoo.json` last, with provenance.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightsmith.errors import WeightsmithError
from weightsmith.model import MANIFEST, parse_model_url
from weightsmith.restore import float_values, logical_records
from weightsmith.store import Store, arrays, encode_key
from weightsmith.zoo import ZOO_FORMAT, ZOO_MANIFEST, StackWriter, write_stack, zoo_prefix, zoo_tensor_key
from weightsmith.zoo.align import align_block, mlp_blocks


class ZooOptions(BaseModel):
    """What zoo to build; written into zoo.json for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    zoo_id: str  # the zoo's id: zoos/<id>/ in the store
    models: tuple[str, ...] = Field(min_length=1)  # member model URLs (<store>/models/<slug>/<revision>), in order
    store: str | None = None  # where the zoo goes; default: the first member's store
    include: tuple[str, ...] = ()  # glob patterns over tensor names; empty: every tensor
    base: str | None = None  # the model the members were fine-tuned from (kept beside the stacks)
    align: Literal["none", "permutation"] = "none"  # permute MLP hidden units to match member 0
    # with align: match this model's units instead of member 0's (e.g. held-out models aligned to a zoo's member 0)
    align_to: str | None = None
    ordered: bool = False  # the members are a sequence (checkpoints of one run), not a set


@dataclass(frozen=True)
class Member:
    """A model of the zoo, as it was when the zoo was built."""

    url: str
    slug: str
    revision: str
    manifest_sha256: str  # of the member's manifest.json bytes


@dataclass(frozen=True)
class StackUnit:
    """Tensors stacked by one task: one tensor, or one MLP block aligned together."""

    index: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # one member's shape of each tensor
    axes: tuple[int, ...] | None = None  # hidden-unit axis of each tensor when aligned; None: not aligned

    @property
    def nbytes(self) -> int:
        """float32 bytes of one member's tensors."""
        return 4 * sum(math.prod(s) for s in self.shapes)


@dataclass(frozen=True)
class ZooPlan:
    """What a zoo build will do, decided from manifests alone (small: safe to pass around)."""

    options: ZooOptions
    store: str  # the zoo's store URL
    members: tuple[Member, ...]
    base: Member | None
    units: tuple[StackUnit, ...]
    fingerprint: str  # of the members, base, alignment and selection: stacks carrying it are complete
    align_to: Member | None = None  # the model aligned units match (None: member 0)


@dataclass(frozen=True)
class ZooResult:
    zoo_url: str
    members: int
    tensors: int
    written: int  # stacks written in this run
    skipped: int  # stacks already complete in the store
    status: str  # "created" | "unchanged"


def base_key(zoo_id: str, name: str) -> str:
    """Store key of the base model's tensor `name` (one member's shape, float32)."""
    return f"{zoo_prefix(zoo_id)}/base/{encode_key(name)}.zarr"


def _is_real(record: dict) -> bool:
    return record.get("encoding") == "gguf" or record["dtype"].startswith(("F", "BF"))


def member_of(url: str) -> tuple[Member, dict]:
    """The model at `url` as a member (with its manifest's sha256), and its manifest."""
    model = parse_model_url(url)
    manifest = model.manifest()  # a missing or incomplete model is a one-line error
    digest = hashlib.sha256(model.store.read_bytes(model.key(MANIFEST))).hexdigest()
    return Member(model.url, model.slug, model.revision, digest), manifest


def select_tensors(member: Member, manifest: dict, include: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """name -> shape of the selected tensors, in manifest order."""
    chosen = {}
    for r in logical_records(manifest):
        if include and not any(fnmatch.fnmatchcase(r["name"], p) for p in include):
            continue
        if not _is_real(r):
            raise WeightsmithError(member.url, f"tensor {r['name']!r} is {r['dtype']}, not real values (leave it out)")
        chosen[r["name"]] = tuple(r["shape"])
    return chosen


def first_difference(want: dict, got: dict, other: str) -> str | None:
    """One line naming the first tensor where `got` (name -> shape) differs from `other`'s `want`."""
    for name, shape in want.items():
        if name not in got:
            return f"has no tensor {name!r} ({other} has it)"
        if got[name] != shape:
            return f"tensor {name!r} has shape {list(got[name])}, {other} has {list(shape)}"
    extra = next((n for n in got if n not in want), None)
    return None if extra is None else f"has tensor {extra!r}, which {other} does not hold"


def prepare(options: ZooOptions) -> ZooPlan:
    """Check every member before anything is written; returns the plan."""
    zoo_prefix(options.zoo_id)  # a bad id is an error before any manifest is read
    members, selections = [], []
    for url in options.models:
        member, manifest = member_of(url)
        if any(m.url == member.url for m in members):
            raise WeightsmithError(member.url, "given twice as a member")
        members.append(member)
        selections.append(select_tensors(member, manifest, options.include))
    want = selections[0]
    if not want:
        raise WeightsmithError(members[0].url, f"no tensor matches --include {' '.join(options.include)}")
    for member, got in zip(members[1:], selections[1:], strict=True):
        problem = first_difference(want, got, members[0].url)
        if problem:
            raise WeightsmithError(member.url, problem)
    base = None
    if options.base:
        base, manifest = member_of(options.base)
        problem = first_difference(want, select_tensors(base, manifest, options.include), members[0].url)
        if problem:
            raise WeightsmithError(base.url, f"(the base model) {problem}")
    reference = None
    if options.align_to:
        if options.align != "permutation":
            raise WeightsmithError("--align-to", "needs --align permutation")
        reference, manifest = member_of(options.align_to)
        problem = first_difference(want, select_tensors(reference, manifest, options.include), members[0].url)
        if problem:
            raise WeightsmithError(reference.url, f"(--align-to) {problem}")
    units = _units(want, options.align)
    store = options.store or parse_model_url(options.models[0]).store.url
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "members": [asdict(m) for m in members],
                "base": asdict(base) if base else None,
                "align": options.align,
                **({"align_to": asdict(reference)} if reference else {}),
                "tensors": [[n, list(s)] for n, s in want.items()],
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    plan = ZooPlan(options, store, tuple(members), base, units, fingerprint, reference)
    existing = _existing(plan)
    if existing is not None and existing.get("fingerprint") != fingerprint:
        raise WeightsmithError(
            Store(store).url_of(zoo_prefix(options.zoo_id)),
            "a zoo of this id exists with other members, base, alignment or tensors (choose another id)",
        )
    Store(store).check_writable()
    return plan


def _units(shapes: dict[str, tuple[int, ...]], align: str) -> tuple[StackUnit, ...]:
    """One unit per tensor; with alignment, one per MLP block (its tensors share a permutation)."""
    blocks = mlp_blocks(shapes) if align == "permutation" else []
    if align == "permutation" and not blocks:
        raise WeightsmithError("--align permutation", "the selection holds no MLP (c_fc/c_proj or gate/up/down_proj)")
    in_block = {n: b for b in blocks for n in b.names}
    units: list[StackUnit] = []
    for name, shape in shapes.items():
        block = in_block.get(name)
        if block is None:
            units.append(StackUnit(len(units), (name,), (shape,)))
        elif name == block.names[0]:
            units.append(StackUnit(len(units), block.names, tuple(shapes[n] for n in block.names), block.axes))
    return tuple(units)


def _existing(plan: ZooPlan) -> dict | None:
    try:
        return Store(plan.store).read_json(f"{zoo_prefix(plan.options.zoo_id)}/{ZOO_MANIFEST}")
    except FileNotFoundError:
        return None


@lru_cache(maxsize=16)
def _records(url: str, manifest_sha256: str) -> dict[str, dict]:
    """name -> record of a member, read once per process; the member must be as planned."""
    model = parse_model_url(url)
    if hashlib.sha256(model.store.read_bytes(model.key(MANIFEST))).hexdigest() != manifest_sha256:
        raise WeightsmithError(model.url, "manifest.json changed since the zoo was planned (build again)")
    return {r["name"]: r for r in logical_records(model.manifest())}


def read_member_tensor(member: Member, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One member's tensor as float32 in its shape (GPTQ/GGUF dequantised, BF16/F16 widened)."""
    record = _records(member.url, member.manifest_sha256)[name]
    blocks = [np.asarray(b, np.float32).reshape(-1) for b in float_values(parse_model_url(member.url), record)]
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)).reshape(shape)


def _done(store: Store, key: str, fingerprint: str) -> bool:
    record = arrays.read_record(store, key)
    return record is not None and record.get("fingerprint") == fingerprint


def _aligned(unit: StackUnit, models: list[Member]) -> Iterator[list[np.ndarray]]:
    """Each model's tensors of the unit, one model at a time, aligned to models[0] when the unit is."""
    reference = None
    for model in models:
        values = [read_member_tensor(model, n, s) for n, s in zip(unit.names, unit.shapes, strict=True)]
        if unit.axes is not None:
            if reference is None:
                reference = values  # member 0: the reference, as it is
            else:
                values = align_block(reference, values, unit.axes)
        yield values


def build_unit(plan: ZooPlan, unit: StackUnit) -> int:
    """Write the unit's stacks (and base tensors); returns the stacks written (0: already complete)."""
    store = Store(plan.store)
    zoo_id = plan.options.zoo_id
    k = len(plan.members)
    keys = [zoo_tensor_key(zoo_id, n) for n in unit.names]
    bases = [base_key(zoo_id, n) for n in unit.names] if plan.base else []
    if all(_done(store, key, plan.fingerprint) for key in keys + bases):
        return 0
    extra = {"fingerprint": plan.fingerprint}
    # Member by member: each of the unit's stacks gets row k, then member k is dropped.
    writers = [StackWriter(store, key, n, (k, *s)) for key, n, s in zip(keys, unit.names, unit.shapes, strict=True)]
    ref = [plan.align_to] if plan.align_to is not None and unit.axes is not None else []
    for values in itertools.islice(_aligned(unit, ref + list(plan.members)), len(ref), None):
        for writer, v in zip(writers, values, strict=True):
            writer.append(v[None])
    for writer in writers:
        writer.finish(extra)
    if plan.base:
        # The base is aligned to member 0 like a member, so deltas are taken unit by unit.
        models = [plan.align_to or plan.members[0], plan.base] if unit.axes is not None else [plan.base]
        values = list(_aligned(unit, models))[-1]
        for key, name, shape, v in zip(bases, unit.names, unit.shapes, values, strict=True):
            write_stack(store, key, name, (1, *shape), [v[None]], extra)
    return len(keys)


def publish(plan: ZooPlan) -> dict:
    """Read every stack's record back and write zoo.json last; returns the zoo manifest."""
    store = Store(plan.store)
    zoo_id = plan.options.zoo_id
    existing = _existing(plan)
    if existing is not None and existing.get("fingerprint") == plan.fingerprint:
        return existing
    names = [n for u in plan.units for n in u.names]

    def records(key_of) -> dict[str, dict]:
        found = {}
        for name in names:
            record = arrays.read_record(store, key_of(zoo_id, name))
            if record is None or record.get("fingerprint") != plan.fingerprint:
                raise WeightsmithError(store.url_of(key_of(zoo_id, name)), "stack missing or unfinished (build again)")
            found[name] = record
        return found

    manifest = {
        "format": ZOO_FORMAT,
        "id": zoo_id,
        "checkpoints": len(plan.members),
        "tensors": records(zoo_tensor_key),
        "attrs": {},
        "members": [asdict(m) for m in plan.members],
        "base": {**asdict(plan.base), "tensors": records(base_key)} if plan.base else None,
        "ordered": plan.options.ordered,
        "align": plan.options.align,
        **({"align_to": asdict(plan.align_to)} if plan.align_to else {}),
        "include": list(plan.options.include),
        "fingerprint": plan.fingerprint,
    }
    store.write_json(f"{zoo_prefix(zoo_id)}/{ZOO_MANIFEST}", manifest)
    return manifest


def build_zoo(options: ZooOptions) -> ZooResult:
    """Build (or resume, or find complete) the zoo: prepare, every unit, then zoo.json."""
    plan = prepare(options)
    complete = _existing(plan) is not None
    written = sum(build_unit(plan, unit) for unit in plan.units)
    publish(plan)
    stacks = sum(len(u.names) for u in plan.units)
    url = Store(plan.store).url_of(zoo_prefix(options.zoo_id))
    return ZooResult(url, len(plan.members), stacks, written, stacks - written, "unchanged" if complete else "created")
