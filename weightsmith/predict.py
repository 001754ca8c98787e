"""Predict: fit a generator on tensors of a model (or of a zoo) and write predicted tensors.

For each selected tensor: examples (the model's tensor, K = 1, or the zoo's K checkpoints) ->
a fitted generator state, reused from `generators/<name>/<fingerprint>/` while its inputs are
unchanged -> `samples` draws -> `predictions/<run-id>/tensors/<key>.zarr` (samples stacked,
(n, *shape), float32) with a TIFF and PNG per sample -> `prediction.json`, written last, with
the generator, its config, the seed, the device of every sample, the sampling version (how
random numbers are derived; see `weightsmith.generators.base`) and, per fit, the examples it
saw (`examples`: zoo, K, whether ordered, sha256 of the values).
With a chunk size, each sample is the source tensor with one run of elements replaced.

Which tensors are fitted together (`fit_batches`, recorded as each tensor's `fitted_with`):
- by default, generators that train (`packs_roles`: tile-diffusion, zoo-diffusion) fit small
  tensors of one role and shape together: the role is the name without its layer index
  (`transformer.h.{i}.ln_1.weight`), and a pack holds at most `pack_bytes` of float32. A pack of
  n vectors is fitted as (n, len) (one row per layer), of n matrices as their rows stacked
  (n * rows, ...), so a tile generator sees each matrix in its own orientation. A fit costs
  about the same for a 64-value LayerNorm as for a 64 x 64 matrix, so a small model's LayerNorms
  and biases take a fit per role instead of one per layer. Baselines always fit each tensor
  alone (their statistics are per tensor), and so does every generator with a chunk size.
- with `joint`, a generator that fits groups (`fits_groups`: zoo-diffusion) fits all selected
  tensors as ONE group, whatever their shapes (e.g. an MLP block's LayerNorm, c_fc and c_proj):
  one flat vector per member, the tensors flattened and concatenated in manifest order
  (`group_examples`), so each sample's tensors come from one draw and belong together. Every
  other generator (tile-diffusion needs 2-D tiles; baselines) fits all selected tensors of one
  shape as one stack (n, *shape) (e.g. every LayerNorm weight and bias of a model), whatever
  their size. A single selected tensor is fitted alone either way.
Each sample of a packed or grouped fit is split back into its tensors exactly (a reshape, then
an index; a group's pieces by their offsets).

Fits of generators that train fan out over `workers` spawned processes (default: one per
core, at most one per fit), each with cores // workers torch threads, so the cores are busy
and not oversubscribed (a script that calls `predict` needs the usual
`if __name__ == "__main__":` guard); then every tensor is sampled and written in order.
The `predict-layer` flow runs the fits as one Prefect task each (`plan_fits` + `fit_unit`)
and then calls `predict`, which finds their states.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import multiprocessing
import os
import re
import socket
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from weightsmith import __version__
from weightsmith.artifacts import write_images
from weightsmith.codec import chunk_region, parse_size, splice
from weightsmith.errors import WeightsmithError
from weightsmith.extract import new_run_id
from weightsmith.generators import SAMPLING_VERSION, Examples, SampleSpec, state_from_bytes, state_to_bytes
from weightsmith.generators.base import group_examples, split_group
from weightsmith.generators.registry import get as get_generator
from weightsmith.model import ModelRef, parse_model_url
from weightsmith.store import arrays, encode_key

PREDICTION = "prediction.json"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _size(value):
    """A size as given on the command line ("780KB", "3MB") or in bytes."""
    return parse_size(value) if isinstance(value, str) else value


class PredictOptions(BaseModel):
    """What to predict and how; written into prediction.json for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: tuple[str, ...]  # glob patterns over tensor names (at least one)
    generator: str  # registry name, e.g. "tile-diffusion", "zoo-diffusion", "gaussian"
    config: dict = Field(default_factory=dict)  # the generator's options
    # predict one run of this many float32 bytes, spliced into the tensor ("780KB" or an int: bytes)
    chunk_size: Annotated[int | None, BeforeValidator(_size)] = None
    chunk_offset: int = Field(0, ge=0)  # element offset of that run in the flattened tensor
    samples: int = Field(1, ge=1)  # draws per tensor
    seed: int = Field(0, ge=0)  # same seed, same device -> same values
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: $DEVICE, else CUDA when present
    zoo: str | None = None  # fit on zoos/<id>/ (K checkpoints) instead of the model alone
    joint: bool = False  # one fit for all tensors (fits_groups generators) or per shape (others), not one per tensor
    pack_bytes: int = Field(1 << 20, ge=0)  # generators that train fit small same-role tensors together, up to this
    workers: int = Field(0, ge=0)  # fits in parallel (0: one per core); torch threads = cores // workers
    images: Literal["all", "preview", "none"] = "all"  # TIFF + PNG per sample, PNG, or neither
    run_id: str | None = None  # default: a new time-stamped id


@dataclass(frozen=True)
class PredictionResult:
    run_url: str
    run_id: str
    tensors: list[str]
    devices: list[str]


def resolve_device(requested: str = "auto") -> str:
    """ "auto" -> $DEVICE if set, else "cuda" when torch sees a GPU, else "cpu"."""
    choice = requested if requested != "auto" else os.environ.get("DEVICE", "auto").lower()
    if choice not in ("auto", "cpu", "cuda"):
        raise WeightsmithError("DEVICE", f"unknown device {choice!r} (auto, cpu or cuda)")
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise WeightsmithError("--device", "cuda was asked for but torch sees no CUDA device")
    return choice


def select(manifest: dict, patterns: tuple[str, ...]) -> list[dict]:
    """Records of the float tensors whose names match any pattern (GPTQ components excluded)."""
    records = [
        r
        for r in manifest["tensors"].values()
        if r.get("role") != "gptq-component"
        and (r["dtype"] in _FLOAT_DTYPES or r["encoding"] == "gguf")
        and any(fnmatch.fnmatchcase(r["name"], p) for p in patterns)
    ]
    if not records:
        raise WeightsmithError(", ".join(patterns), "no float tensor of the model matches")
    return records


def read_values(model: ModelRef, record: dict) -> np.ndarray:
    """A stored tensor's values as float32, in its shape."""
    from weightsmith.restore import float_values

    blocks = list(float_values(model, record))
    flat = (
        np.concatenate([np.asarray(b, dtype=np.float32).ravel() for b in blocks]) if blocks else np.zeros(0, np.float32)
    )
    return flat.reshape(record["shape"])


def predict(model_url: str, options: PredictOptions, progress=None) -> PredictionResult:
    """Fit (or reuse) the generator per tensor, sample, and write the prediction run."""
    model = parse_model_url(model_url)
    manifest = model.manifest()
    records = select(manifest, options.layer)
    device = resolve_device(options.device)
    gen = get_generator(options.generator)(device=device)
    run_id = options.run_id or new_run_id()
    prefix = model.key("predictions", run_id)
    if model.store.exists(f"{prefix}/{PREDICTION}"):
        raise WeightsmithError(model.store.url_of(prefix), "this prediction run is already complete")
    if options.joint and options.chunk_size is not None:
        raise WeightsmithError("--joint", "cannot be combined with --chunk-size")
    ordered = zoo_is_ordered(model, options.zoo)
    if gen.ordered and not ordered:
        where = f"zoo {options.zoo!r}" if options.zoo else "the model alone"
        raise WeightsmithError(gen.name, f"needs an ordered zoo (zoo.json `ordered: true`), got {where}")
    started = time.time()
    entries, devices = {}, []
    group = _groups(gen, options)
    batches = fit_batches(records, options.joint, _pack_bytes(gen, options), group)
    fitted = _fit_all(model_url, model, gen, batches, options)  # state key -> reused from an earlier run
    for batch in batches:
        examples = _examples(model, batch, options.zoo, options.joint, group)
        state, state_key, _ = _fit_or_reuse(model, gen, examples, options.config)
        reused = fitted[state_key]
        chunk = None
        if options.chunk_size is not None:
            chunk = chunk_region(examples.shape, options.chunk_size, options.chunk_offset)
        result = gen.sample(state, options.samples, SampleSpec(examples.shape, chunk), options.seed)
        if any(d.startswith("cuda") and "cpu" in d for d in result.devices):
            warnings.warn(f"{examples.name}: CUDA ran out of memory; some samples were computed on CPU", stacklevel=2)
        base = examples.values[0] if chunk is not None else None
        drawn = [splice(base, a, chunk.offset) if chunk is not None else a for a in result.arrays]
        if examples.sizes:  # a group: each sample cut into its tensors by their offsets
            shapes = [tuple(r["shape"]) for r in batch]
            pieces = [split_group(a, examples.offsets, shapes) for a in drawn]
        for j, record in enumerate(batch):
            name = record["name"]
            if examples.sizes:
                samples = [p[j] for p in pieces]
            else:
                samples = [split_sample(a, batch, j) for a in drawn] if len(batch) > 1 else drawn
            entries[name] = _write_samples(model, prefix, record, samples, options.images)
            entries[name].update(
                {
                    "generator_state": state_key,
                    "fingerprint": state.fingerprint,
                    "reused_state": reused,
                    "devices": result.devices,
                    "chunk": None if chunk is None else chunk.to_dict(),
                    "examples": {
                        "zoo": options.zoo,
                        "k": examples.k,
                        "ordered": ordered,
                        "sha256": examples.sha256,
                    },
                    "fitted_with": [r["name"] for r in batch],
                }
            )
            if progress:
                progress(1, name)
        devices += result.devices
    model.store.write_json(
        f"{prefix}/{PREDICTION}",
        {
            "format": "weightsmith-prediction/1",
            "tool": {"name": "weightsmith", "version": __version__},
            "model": {"slug": model.slug, "revision": model.revision},
            "run_id": run_id,
            "generator": gen.name,
            "config": gen.config(options.config).model_dump(mode="json"),
            "options": options.model_dump(mode="json"),
            "device": {
                "requested": options.device,
                "resolved": device,
                "env": os.environ.get("DEVICE", ""),
                "host": socket.gethostname(),
            },
            "seed": options.seed,
            "sampling": SAMPLING_VERSION,
            "samples": options.samples,
            "started": started,
            "finished": time.time(),
            "tensors": entries,
        },
    )
    return PredictionResult(model.store.url_of(prefix), run_id, list(entries), devices)


@dataclass(frozen=True)
class FitUnit:
    """One fit of a prediction: the tensors fitted together, in order (small; plans travel)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class FitOutcome:
    state_key: str  # where the fitted state is stored
    reused: bool  # True when an earlier run had stored it
    seconds: float  # wall time of the fit (or of finding it)


_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


def role(name: str) -> str:
    """The tensor's name without its layer index: transformer.h.3.ln_1.weight -> transformer.h.{i}.ln_1.weight."""
    return _LAYER_INDEX.sub("{i}", name)


def fit_batches(records: list[dict], joint: bool, pack_bytes: int = 0, groups: bool = False) -> list[list[dict]]:
    """The tensors fitted together, in first-seen order.

    joint with groups (a generator that `fits_groups`): all tensors, one batch. joint: all
    tensors of one shape. Else tensors of one role and shape whose float32 bytes are at most
    `pack_bytes` each, in packs of at most `pack_bytes` together; every other tensor alone.
    """
    if joint and groups:
        return [list(records)]
    if joint:
        by_shape: dict[tuple, list[dict]] = {}
        for r in records:
            by_shape.setdefault(tuple(r["shape"]), []).append(r)
        return list(by_shape.values())
    packs: dict[tuple, list[list[dict]]] = {}
    order: list[list[dict]] = []  # the batches, in the order their first tensor came
    for r in records:
        size = 4 * math.prod(r["shape"])
        if size > pack_bytes:
            order.append([r])
            continue
        group = packs.setdefault((role(r["name"]), tuple(r["shape"])), [])
        if not group or size * (len(group[-1]) + 1) > pack_bytes:
            group.append([])
            order.append(group[-1])
        group[-1].append(r)
    return order


def split_sample(sample: np.ndarray, batch: list[dict], j: int) -> np.ndarray:
    """Tensor j of one sample of a packed fit: the fit's shape reshaped to (n, *shape), row j."""
    return np.asarray(sample).reshape(len(batch), *batch[j]["shape"])[j]


def plan_fits(model_url: str, options: PredictOptions) -> list[FitUnit]:
    """The fits that `predict` will make for these options, as small descriptions."""
    model = parse_model_url(model_url)
    records = select(model.manifest(), options.layer)
    gen = get_generator(options.generator)(device="cpu")  # the plan does not depend on the device
    batches = fit_batches(records, options.joint, _pack_bytes(gen, options), _groups(gen, options))
    return [FitUnit(tuple(r["name"] for r in b)) for b in largest_first(batches)]


def fit_unit(model_url: str, options: PredictOptions, unit: FitUnit, threads: int | None = None) -> FitOutcome:
    """Fit (or find) the generator state of one planned fit and store it; `threads`: torch threads."""
    model = parse_model_url(model_url)
    by_name = {r["name"]: r for r in select(model.manifest(), options.layer)}
    missing = [n for n in unit.names if n not in by_name]
    if missing:
        raise WeightsmithError(missing[0], "not a selected float tensor of the model")
    gen = get_generator(options.generator)(device=resolve_device(options.device))
    if threads:
        _set_torch_threads(threads)
    started = time.time()
    examples = _examples(model, [by_name[n] for n in unit.names], options.zoo, options.joint, _groups(gen, options))
    _, key, reused = _fit_or_reuse(model, gen, examples, options.config)
    return FitOutcome(key, reused, time.time() - started)


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_workers(fits: int, requested: int = 0) -> tuple[int, int]:
    """(workers, torch threads per worker) for `fits` fits: one worker per core unless requested."""
    workers = max(1, min(fits, requested or cpu_cores()))
    return workers, max(1, cpu_cores() // workers)


def _pack_bytes(gen, options: PredictOptions) -> int:
    # only generators that train pack (a baseline's statistics are per tensor), and never with a chunk
    if not getattr(gen, "packs_roles", False) or options.chunk_size is not None:
        return 0
    return options.pack_bytes


def largest_first(batches: list[list[dict]]) -> list[list[dict]]:
    """The batches by float32 bytes, largest first (stable): fits take time that grows with their
    data, so workers that start the longest fits first finish together instead of one worker
    finishing a big fit alone at the end (longest-processing-time-first scheduling)."""
    return sorted(batches, key=lambda b: -sum(math.prod(r["shape"]) for r in b))


def _groups(gen, options: PredictOptions) -> bool:
    """Whether `joint` fits all selected tensors as one group (generators that `fits_groups`)."""
    return options.joint and getattr(gen, "fits_groups", False)


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _fit_all(
    model_url: str, model: ModelRef, gen, batches: list[list[dict]], options: PredictOptions
) -> dict[str, bool]:
    """Fit every batch whose state is not stored yet; returns state key -> whether it was reused.

    Generators that train fit in spawned worker processes: their networks are small, so in
    threads the interpreter lock serialises them (measured here: 2 threads, 1.0-1.2x one).
    """
    reused, todo = {}, []
    for batch in largest_first(batches):
        examples = _examples(model, batch, options.zoo, options.joint, _groups(gen, options))
        key = _state_key(model, gen, examples, options.config)
        if model.store.exists(key):
            reused[key] = True
        else:
            todo.append(FitUnit(tuple(r["name"] for r in batch)))
    workers, threads = fit_workers(len(todo), options.workers)
    if workers == 1 or not getattr(gen, "packs_roles", False):
        outcomes = [fit_unit(model_url, options, unit) for unit in todo]
    else:
        spawn = multiprocessing.get_context("spawn")  # no forked torch thread pools or CUDA state
        with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
            outcomes = list(pool.map(fit_unit, repeat(model_url), repeat(options), todo, repeat(threads)))
    return reused | {o.state_key: o.reused for o in outcomes}


def _examples(model: ModelRef, batch: list[dict], zoo: str | None, joint: bool, group: bool = False) -> Examples:
    """The batch's K examples: (K, *shape) for one tensor; n packed: (K, n, *shape), or for
    role-packed matrices (not `joint`) (K, n * rows, ...); n grouped (`group`, any shapes):
    (K, D), each member's tensors flattened and concatenated in order (see `fit_batches`)."""
    bases = [None] * len(batch)
    if zoo is None:
        stacks = [read_values(model, r)[None] for r in batch]
    else:
        from weightsmith.zoo import read_zoo_base, read_zoo_tensor

        stacks = [read_zoo_tensor(model.store, zoo, r["name"]) for r in batch]
        bases = [read_zoo_base(model.store, zoo, r["name"]) for r in batch]  # zoos built with --base
    if group and len(batch) > 1:
        parts = [Examples(r["name"], v, base=b) for r, v, b in zip(batch, stacks, bases, strict=True)]
        return group_examples(parts, " + ".join(r["name"] for r in batch))
    base = None if any(b is None for b in bases) else np.stack(bases)  # (n, *shape)
    if len(batch) == 1:
        return Examples(batch[0]["name"], stacks[0], base=None if base is None else base[0])
    names = tuple(r["name"] for r in batch)
    values = np.stack(stacks, axis=1)  # (K, n, *shape)
    shape = tuple(batch[0]["shape"])
    if len(shape) >= 2 and not joint:  # role-packed matrices: their rows stacked, (K, n * rows, ...)
        values = values.reshape(values.shape[0], len(batch) * shape[0], *shape[1:])
        if base is not None:
            base = base.reshape(len(batch) * shape[0], *shape[1:])
        return Examples(" + ".join(names), values, base=base)
    return Examples(" + ".join(names), values, parts=names, base=base)


def zoo_is_ordered(model: ModelRef, zoo: str | None) -> bool:
    """Whether the zoo's checkpoints are one run's, first to last (zoo.json `ordered`; absent: no)."""
    if zoo is None:
        return False
    from weightsmith.zoo import read_zoo

    manifest = read_zoo(model.store, zoo)
    return manifest.get("ordered", manifest.get("attrs", {}).get("ordered")) is True


def _state_key(model: ModelRef, gen, examples: Examples, config: dict) -> str:
    return model.key("generators", gen.name, gen.fingerprint(examples, config), "state.npz")


def _fit_or_reuse(model: ModelRef, gen, examples: Examples, config: dict):
    """The stored state for these inputs, else a new fit saved next to its config."""
    fp = gen.fingerprint(examples, config)
    key = _state_key(model, gen, examples, config)
    try:
        return state_from_bytes(model.store.read_bytes(key)), key, True
    except FileNotFoundError:
        pass
    state = gen.fit(examples, config)
    model.store.write_bytes(key, state_to_bytes(state))
    model.store.write_json(
        model.key("generators", gen.name, fp, "config.json"),
        {
            "generator": gen.name,
            "config": gen.config(config).model_dump(mode="json"),
            "tensor": examples.name,
            "checkpoints": examples.k,
            "info": state.info,
        },
    )
    return state, key, False


def _write_samples(model: ModelRef, prefix: str, record: dict, samples: list[np.ndarray], mode: str) -> dict:
    """(n, *shape) float32 Zarr plus images of each sample; returns the tensor's entry."""
    key = encode_key(record["name"])
    shape = tuple(record["shape"])
    zkey = f"{prefix}/tensors/{key}.zarr"
    array = arrays.create(
        model.store,
        zkey,
        (len(samples), *shape),
        np.dtype("<f4"),
        {"dtype": "F32", "shape": [len(samples), *shape], "encoding": "raw", "base_dtype": record["dtype"]},
    )
    rows = array.chunks[0]  # samples per chunk
    for r0 in range(0, len(samples), rows):
        array.append(np.stack([np.asarray(v, np.float32).reshape(shape) for v in samples[r0 : r0 + rows]]))
    per_sample = []
    for i, values in enumerate(samples):
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
        cols = (shape[-1] if len(shape) == 1 else int(np.prod(shape[1:]))) if shape else 1
        stats, arts = write_images(
            model.store,
            f"{prefix}/images/{key}.{i}.tiff",
            f"{prefix}/previews/{key}.{i}.png",
            record["name"],
            shape,
            "F32",
            [values.reshape(-1, cols)],
            mode,
        )
        per_sample.append({"sha256": hashlib.sha256(values.tobytes()).hexdigest(), "stats": stats, "artifacts": arts})
    entry = {
        "name": record["name"],
        "shape": list(shape),
        "base_dtype": record["dtype"],
        "zarr": zkey,
        "samples": per_sample,
    }
    array.finish({k: v for k, v in entry.items() if k != "samples"})
    return entry
