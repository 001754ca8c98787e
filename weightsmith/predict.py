"""Predict: fit a generator on tensors of a model (or of a zoo) and write predicted tensors.

For each selected tensor: examples (the model's tensor, K = 1, or the zoo's K checkpoints) ->
a fitted generator state, reused from `generators/<name>/<fingerprint>/` while its inputs are
unchanged -> `samples` draws -> `predictions/<run-id>/tensors/<key>.zarr` (samples stacked,
(n, *shape), float32) with a TIFF and PNG per sample -> `prediction.json`, written last, with
the generator, its config, the seed, the device of every sample, the sampling version (how
random numbers are derived; see `weightsmith.generators.base`) and, per fit, the examples it
saw (`examples`: zoo, K, whether ordered, sha256 of the values).
With a chunk size, each sample is the source tensor with one run of elements replaced.
With `joint`, tensors of one shape are fitted together as one stack (n, *shape) (e.g. every
LayerNorm weight and bias of a model: one fit instead of dozens, and samples that keep the
tensors' joint structure), and each sample is split back into its tensors.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightsmith import __version__
from weightsmith.artifacts import write_images
from weightsmith.codec import chunk_region, parse_size, splice
from weightsmith.errors import WeightsmithError
from weightsmith.extract import new_run_id
from weightsmith.generators import SAMPLING_VERSION, Examples, SampleSpec, state_from_bytes, state_to_bytes
from weightsmith.generators.registry import get as get_generator
from weightsmith.model import ModelRef, parse_model_url
from weightsmith.store import arrays, encode_key

PREDICTION = "prediction.json"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class PredictOptions(BaseModel):
    """What to predict and how; written into prediction.json for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: tuple[str, ...]  # glob patterns over tensor names (at least one)
    generator: str  # registry name, e.g. "tile-diffusion", "zoo-diffusion", "gaussian"
    config: dict = Field(default_factory=dict)  # the generator's options
    chunk_size: str | None = None  # predict one run of this many float32 bytes ("780KB"), spliced
    chunk_offset: int = Field(0, ge=0)  # element offset of that run in the flattened tensor
    samples: int = Field(1, ge=1)  # draws per tensor
    seed: int = Field(0, ge=0)  # same seed, same device -> same values
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: $DEVICE, else CUDA when present
    zoo: str | None = None  # fit on zoos/<id>/ (K checkpoints) instead of the model alone
    joint: bool = False  # one fit per shape: same-shape tensors stacked (n, *shape), not one per tensor
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
    for batch in fit_batches(records, options.joint):
        examples = _examples(model, batch, options.zoo)
        state, state_key, reused = _fit_or_reuse(model, gen, examples, options.config)
        chunk = None
        if options.chunk_size is not None:
            chunk = chunk_region(examples.shape, parse_size(options.chunk_size), options.chunk_offset)
        result = gen.sample(state, options.samples, SampleSpec(examples.shape, chunk), options.seed)
        if any(d.startswith("cuda") and "cpu" in d for d in result.devices):
            warnings.warn(f"{examples.name}: CUDA ran out of memory; some samples were computed on CPU", stacklevel=2)
        base = examples.values[0] if chunk is not None else None
        drawn = [splice(base, a, chunk.offset) if chunk is not None else a for a in result.arrays]
        for j, record in enumerate(batch):
            name = record["name"]
            samples = [a[j] for a in drawn] if len(batch) > 1 else drawn
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


def fit_batches(records: list[dict], joint: bool) -> list[list[dict]]:
    """The tensors fitted together: each alone, or (joint) all of one shape, in first-seen order."""
    if not joint:
        return [[r] for r in records]
    by_shape: dict[tuple, list[dict]] = {}
    for r in records:
        by_shape.setdefault(tuple(r["shape"]), []).append(r)
    return list(by_shape.values())


def _examples(model: ModelRef, batch: list[dict], zoo: str | None) -> Examples:
    """The batch's K examples: (K, *shape) for one tensor, (K, n, *shape) for n stacked."""
    bases = [None]
    if zoo is None:
        stacks = [read_values(model, r)[None] for r in batch]
    else:
        from weightsmith.zoo import read_zoo_base, read_zoo_tensor

        stacks = [read_zoo_tensor(model.store, zoo, r["name"]) for r in batch]
        bases = [read_zoo_base(model.store, zoo, r["name"]) for r in batch]  # zoos built with --base
    base = None if any(b is None for b in bases) else np.stack(bases)  # (n, *shape)
    if len(batch) == 1:
        return Examples(batch[0]["name"], stacks[0], base=None if base is None else base[0])
    names = tuple(r["name"] for r in batch)
    return Examples(" + ".join(names), np.stack(stacks, axis=1), parts=names, base=base)


def zoo_is_ordered(model: ModelRef, zoo: str | None) -> bool:
    """Whether the zoo's checkpoints are one run's, first to last (zoo.json `ordered`; absent: no)."""
    if zoo is None:
        return False
    from weightsmith.zoo import read_zoo

    manifest = read_zoo(model.store, zoo)
    return manifest.get("ordered", manifest.get("attrs", {}).get("ordered")) is True


def _fit_or_reuse(model: ModelRef, gen, examples: Examples, config: dict):
    """The stored state for these inputs, else a new fit saved next to its config."""
    fp = gen.fingerprint(examples, config)
    key = model.key("generators", gen.name, fp, "state.npz")
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
