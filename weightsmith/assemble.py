"""Assemble: a base model plus chosen predicted tensors -> a candidate model folder.

The candidate has the base's tensor names, order, shapes and dtypes, so whatever loaded the base
loads it (`transformers.AutoModelForCausalLM.from_pretrained(folder)`):
1. `base_tensors` lists the base's logical tensors in file order (a GPTQ group becomes
   `<prefix>.weight` at the place of its `qweight`; `qzeros`, `scales`, `g_idx` are dropped).
2. `plan` (pure) gives each output tensor its dtype (the base's; F16 for GPTQ weights, F32 for
   GGUF blocks), the source of its values (the base, a prediction sample, an in-memory array)
   and its shard (greedy packing up to `shard_bytes`).
3. Each shard is streamed: the safetensors header with computed offsets first, then every
   tensor's bytes, read block by block from the store (base tensors are copied as stored, so
   untouched tensors are byte-identical; replaced values are cast to the output dtype with
   round-to-nearest-even, via ml_dtypes for BF16/F8).
4. Sidecars (config, tokenizer) are copied from the store's `files/`; a GPTQ base loses its
   quantisation config. `model.safetensors.index.json` (when sharded) and `candidate.json`
   (provenance, sha256 per file) are written last; a local folder appears in one rename.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightsmith import __version__, dtypes
from weightsmith.errors import WeightsmithError
from weightsmith.extract import new_run_id
from weightsmith.model import ModelRef, parse_model_url
from weightsmith.predict import PREDICTION
from weightsmith.restore import READ_BYTES, float_values, stored_blocks
from weightsmith.sources.source import INDEX_NAME, SIDECARS
from weightsmith.store import arrays
from weightsmith.store.store import dumps

CANDIDATE = "candidate.json"
CANDIDATE_FORMAT = "weightsmith-candidate/1"
SINGLE_NAME = "model.safetensors"
_FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_QUANT_SIDECARS = frozenset({"quantize_config.json", "quant_config.json"})
_MAX_REPLACED_LIST = 2000  # longer lists go to candidate.json; the header holds the count

Source = Literal["base", "prediction", "memory"]


class AssembleOptions(BaseModel):
    """Which predicted tensors go into the candidate and where it is written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prediction: str | None = None  # run id under the model's predictions/; None: none taken
    sample: int = Field(0, ge=0)  # which sample of each predicted tensor
    replace: tuple[str, ...] = ("*",)  # glob patterns over predicted tensor names to take
    shard_bytes: int = Field(5_000_000_000, ge=1)  # cap per weights file; above it: shards
    out: str | None = None  # local folder; None: the store, <model>/candidates/<candidate-id>/
    candidate_id: str | None = None  # default: a new time-stamped id


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the candidate: what it is, where its values come from, which shard."""

    name: str
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    source: Source
    shard: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class AssembleResult:
    location: str  # the folder, or the store URL of candidates/<id>
    files: list[str]  # file names inside `location`, in the order they were written
    replaced: list[str]  # tensors not taken from the base, in output order
    provenance: dict  # also in candidate.json and (as strings) in every shard's __metadata__


# ---------------------------------------------------------------------------------------------
# 1-2. what to write
def base_tensors(manifest: dict) -> list[dict]:
    """The base's logical records in file order; a GPTQ weight sits where its qweight was."""
    records = manifest["tensors"]
    weight_of = {
        component: r["name"]
        for r in records.values()
        if r.get("role") == "gptq-weight"
        for component in r["components"]
    }
    out = []
    for container in manifest["source"]["containers"]:
        for segment in container["segments"]:
            name = segment[2]
            if name is None:
                continue
            if name not in weight_of:
                out.append(records[name])
            elif name.endswith(".qweight"):
                out.append(records[weight_of[name]])
    return out


def output_dtype(record: dict) -> str:
    """F16 for a dequantised GPTQ weight, F32 for GGUF blocks, else the base's dtype."""
    if record.get("role") == "gptq-weight":
        return "F16"
    if record["encoding"] == "gguf":
        return "F32"
    return record["dtype"]


def plan(base: list[dict], sources: Mapping[str, Source], shard_bytes: int) -> list[PlannedTensor]:
    """Every output tensor in the base's order, packed greedily into shards of `shard_bytes`.

    A tensor larger than the cap gets a shard of its own; a model within the cap is one shard.
    """
    planned: list[PlannedTensor] = []
    shard, used = 0, 0
    for record in base:
        t = PlannedTensor(
            record["name"],
            output_dtype(record),
            tuple(record["shape"]),
            sources.get(record["name"], "base"),
        )
        if used and used + t.nbytes > shard_bytes:
            shard, used = shard + 1, 0
        used += t.nbytes
        planned.append(dataclasses.replace(t, shard=shard))
    return planned


def shard_names(count: int) -> list[str]:
    """`model.safetensors`, or `model-00001-of-0000N.safetensors` ... as transformers names them."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _read_prediction(model: ModelRef, run_id: str, sample: int) -> dict:
    key = model.key("predictions", run_id, PREDICTION)
    try:
        prediction = model.store.read_json(key)
    except FileNotFoundError:
        raise WeightsmithError(model.store.url_of(key), "no such prediction run (or it did not finish)") from None
    if prediction.get("model") != {"slug": model.slug, "revision": model.revision}:
        raise WeightsmithError(model.store.url_of(key), f"the run predicts another model: {prediction.get('model')}")
    if sample >= prediction["samples"]:
        raise WeightsmithError(f"sample {sample}", f"run {run_id} has {prediction['samples']} samples (0 to n-1)")
    return prediction


def _choose(
    base: list[dict],
    prediction: dict | None,
    patterns: tuple[str, ...],
    replacements: Mapping[str, np.ndarray],
) -> dict[str, Source]:
    """Where each replaced tensor comes from; checks names, dtypes and shapes."""
    sources: dict[str, Source] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    if prediction is not None:
        for name, entry in prediction["tensors"].items():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                sources[name], shapes[name] = "prediction", tuple(entry["shape"])
        if not sources:
            raise WeightsmithError(", ".join(patterns), f"no tensor of prediction run {prediction['run_id']} matches")
    for name, values in replacements.items():
        if name in sources:
            raise WeightsmithError(name, "given in memory and taken from the prediction: pick one")
        sources[name], shapes[name] = "memory", tuple(np.shape(values))
    by_name = {r["name"]: r for r in base}
    for name in sources:
        record = by_name.get(name)
        if record is None:
            raise WeightsmithError(name, "the base model has no such tensor")
        if record["dtype"] not in _FLOATS and record["encoding"] != "gguf":
            raise WeightsmithError(name, f"only float tensors can be replaced, not {record['dtype']}")
        if shapes[name] != tuple(record["shape"]):
            raise WeightsmithError(name, f"replacement has shape {list(shapes[name])}, the base {record['shape']}")
    return sources


# ---------------------------------------------------------------------------------------------
# 3. tensor bytes
def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values in the output dtype, round-to-nearest-even (ml_dtypes for BF16/F8)."""
    return np.ascontiguousarray(np.asarray(values).astype(dtypes.numpy_dtype(dtype), copy=False))


def _sample_blocks(model: ModelRef, key: str, sample: int) -> Iterator[np.ndarray]:
    """One sample of a prediction array (n, *shape) in row blocks of about READ_BYTES."""
    array = arrays.open_array(model.store, key)
    if array.ndim == 1:
        yield np.asarray(array[sample])
        return
    row = max(1, int(np.prod(array.shape[2:])) * array.dtype.itemsize)
    chunk = max(1, array.chunks[1])  # whole chunks per read: a chunk is decompressed once
    step = max(chunk, READ_BYTES // row // chunk * chunk)
    for r0 in range(0, array.shape[1], step):
        yield np.asarray(array[sample, r0 : r0 + step])


def _base_bytes(model: ModelRef, record: dict, dtype: str) -> Iterator[bytes]:
    if record["encoding"] == "raw" and dtype == record["dtype"]:
        h = hashlib.sha256()  # the bytes as stored: untouched tensors stay byte-identical
        for block in stored_blocks(model, record):
            data = block.tobytes()
            h.update(data)
            yield data
        if h.hexdigest() != record["sha256"]:
            raise WeightsmithError(model.url, f"tensor {record['name']!r}: stored values do not match the manifest")
        return
    for block in float_values(model, record):  # GPTQ weights, GGUF blocks: float32 values
        yield _cast(block, dtype).tobytes()


def _write_shard(
    path: str,
    tensors: list[PlannedTensor],
    metadata: dict,
    chunks: Callable[[PlannedTensor], Iterator[bytes]],
) -> dict[str, int | str]:
    """Header (offsets computed up front, padded to 8 bytes), then each tensor's bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
    raw = raw.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    h = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:

        def put(data: bytes) -> None:
            nonlocal size
            f.write(data)
            h.update(data)
            size += len(data)

        put(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            start = size
            for data in chunks(t):
                put(data)
            assert size - start == t.nbytes, (t.name, size - start, t.nbytes)
    return {"size": size, "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------
# 4. sidecars and provenance
def _sidecars(model: ModelRef, manifest: dict, gptq: bool) -> dict[str, bytes]:
    """Config and tokenizer files from files/; a GPTQ base's config loses its quantisation."""
    out = {}
    for name in SIDECARS:
        entry = manifest["files"].get(name)
        if entry is None or (gptq and name in _QUANT_SIDECARS):
            continue
        data = model.store.read_bytes(entry["key"])
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise WeightsmithError(model.store.url_of(entry["key"]), "does not match the manifest")
        if gptq and name == "config.json":
            config = json.loads(data)
            config.pop("quantization_config", None)
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            config.update(dict.fromkeys(keys, "float16"))
            data = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        out[name] = data
    return out


def _provenance(
    model: ModelRef,
    options: AssembleOptions,
    candidate_id: str,
    prediction: dict | None,
    planned: list[PlannedTensor],
) -> dict:
    return {
        "format": CANDIDATE_FORMAT,
        "tool": {"name": "weightsmith", "version": __version__},
        "candidate_id": candidate_id,
        "base": {"slug": model.slug, "revision": model.revision, "url": model.url},
        "prediction": None
        if prediction is None
        else {
            "run_id": prediction["run_id"],
            "generator": prediction["generator"],
            "config": prediction["config"],
            "seed": prediction["seed"],
            "sample": options.sample,
        },
        "replaced": [t.name for t in planned if t.source != "base"],
        "from_prediction": [t.name for t in planned if t.source == "prediction"],
        "from_memory": [t.name for t in planned if t.source == "memory"],
        "options": options.model_dump(mode="json"),
        "created": time.time(),
    }


def _metadata(provenance: dict) -> dict[str, str]:
    """The header's __metadata__ (strings only, as the format requires)."""
    p = provenance["prediction"] or {}
    replaced = ",".join(provenance["replaced"])
    if len(replaced) > _MAX_REPLACED_LIST:
        replaced = f"{len(provenance['replaced'])} tensors (listed in {CANDIDATE})"
    base = provenance["base"]
    return {
        "format": "pt",
        "weightsmith.candidate": provenance["candidate_id"],
        "weightsmith.base": f"{base['slug']}@{base['revision']}",
        "weightsmith.prediction": p.get("run_id", ""),
        "weightsmith.generator": p.get("generator", ""),
        "weightsmith.seed": str(p.get("seed", "")),
        "weightsmith.sample": str(p.get("sample", "")),
        "weightsmith.replaced": replaced,
    }


# ---------------------------------------------------------------------------------------------
def assemble(
    model_url: str,
    options: AssembleOptions,
    replacements: Mapping[str, np.ndarray] | None = None,
) -> AssembleResult:
    """Write a candidate: the base model with predicted (or given) tensors in place.

    Args:
        model_url: the base, `<store>/models/<slug>/<revision>`.
        options: the prediction run and sample, which predicted tensors to take, the shard
            cap and where to write (a local folder, or the store when `out` is None).
        replacements: in-memory tensors by name (baselines); they must have the base's shape.

    Returns:
        Where the candidate is, its files, the replaced tensors and the provenance.

    Raises:
        WeightsmithError: unknown prediction run or tensor, a shape that differs from the
            base's, a partial extraction, or an output that already exists.
    """
    model = parse_model_url(model_url)
    manifest = model.manifest()
    if not manifest.get("selection", {}).get("complete", False):
        raise WeightsmithError(model.url, "only some tensors were extracted: extract all to assemble")
    replacements = dict(replacements or {})
    base = base_tensors(manifest)
    prediction = None
    if options.prediction is not None:
        prediction = _read_prediction(model, options.prediction, options.sample)
    sources = _choose(base, prediction, options.replace, replacements)
    planned = plan(base, sources, options.shard_bytes)
    candidate_id = options.candidate_id or new_run_id()
    gptq = any(r.get("role") == "gptq-weight" for r in base)
    sidecars = _sidecars(model, manifest, gptq)
    provenance = _provenance(model, options, candidate_id, prediction, planned)
    metadata = _metadata(provenance)
    records = {r["name"]: r for r in base}

    def chunks(t: PlannedTensor) -> Iterator[bytes]:
        if t.source == "memory":
            yield _cast(replacements[t.name], t.dtype).tobytes()
        elif t.source == "prediction":
            key = prediction["tensors"][t.name]["zarr"]
            for block in _sample_blocks(model, key, options.sample):
                yield _cast(block, t.dtype).tobytes()
        else:
            yield from _base_bytes(model, records[t.name], t.dtype)

    out = _Output(model, options.out, candidate_id)
    files: dict[str, dict] = {}
    try:
        names = shard_names(planned[-1].shard + 1 if planned else 1)
        for i, name in enumerate(names):
            shard = [t for t in planned if t.shard == i]
            files[name] = _write_shard(out.staged(name), shard, metadata, chunks)
            out.commit(name)
        for name, data in sidecars.items():
            files[name] = out.write(name, data)
        if len(names) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in planned)},
                "weight_map": {t.name: names[t.shard] for t in planned},
            }
            files[INDEX_NAME] = out.write(INDEX_NAME, dumps(index))
        candidate = {**provenance, "files": files}
        out.finish(dumps(candidate))
    finally:
        out.cleanup()
    return AssembleResult(
        location=out.location,
        files=[*files, CANDIDATE],
        replaced=provenance["replaced"],
        provenance=provenance,
    )


class _Output:
    """A local folder (staged beside it, renamed at the end) or a store prefix (candidate.json
    written last, conditionally): files are written to a staging folder, then committed."""

    def __init__(self, model: ModelRef, out: str | None, candidate_id: str):
        self.store = model.store if out is None else None
        if out is not None:
            out = os.path.abspath(os.path.expanduser(out))
            if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
                raise WeightsmithError(out, "already exists and is not empty; pick another folder")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            self.location = out
            self.dir = f"{out}.partial-{uuid.uuid4().hex[:8]}"
            os.makedirs(self.dir)
            return
        self.prefix = model.key("candidates", candidate_id)
        self.location = model.store.url_of(self.prefix)
        if model.store.exists(f"{self.prefix}/{CANDIDATE}"):
            raise WeightsmithError(self.location, "this candidate already exists; pick another id")
        model.store.delete(self.prefix)  # leftovers of an unfinished run with this id
        self.dir = tempfile.mkdtemp(prefix="candidate-", dir=model.store.local_tmp_dir())

    def staged(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def commit(self, name: str) -> None:
        if self.store is not None:
            self.store.put_file(self.staged(name), f"{self.prefix}/{name}")

    def write(self, name: str, data: bytes) -> dict:
        with open(self.staged(name), "wb") as f:
            f.write(data)
        self.commit(name)
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def finish(self, candidate: bytes) -> None:
        if self.store is None:
            self.write(CANDIDATE, candidate)
            os.replace(self.dir, self.location)  # the folder appears complete or not at all
        elif not self.store.create_if_absent(f"{self.prefix}/{CANDIDATE}", candidate):
            raise WeightsmithError(self.location, "another run wrote this candidate at the same time")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def load_candidate_state(location: str) -> dict[str, np.ndarray]:
    """Every tensor of a candidate folder (local path or store URL) with its dtype, in file
    order. Reads whole files: for tests and small models."""
    from weightsmith.ranged import fs_for, join_url

    fs, _ = fs_for(location)

    def read(name: str) -> bytes:
        return fs.cat_file(fs_for(join_url(location, name))[1])

    try:
        names = list(dict.fromkeys(json.loads(read(INDEX_NAME))["weight_map"].values()))
    except FileNotFoundError:
        names = [SINGLE_NAME]
    state = {}
    for name in names:
        data = read(name)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        for tname, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            start, end = info["data_offsets"]
            buf = data[8 + n + start : 8 + n + end]
            state[tname] = dtypes.from_bytes(buf, info["dtype"], tuple(info["shape"]))
    return state
