"""Extract: stream every tensor of a source into Zarr + TIFF + PNG artifacts, manifest last.

The stages, each usable on its own (the Prefect flow maps over them):
1. `open_source` parses the headers (no tensor bytes).
2. `plan` selects tensors and packs them into work units (big tensors alone, small ones
   together up to `unit_bytes`), a pure function of the source and the options.
3. `checksum_unit` hashes the source bytes of a unit; with the header bytes these give the
   content revision of the model (skipped when the revision is known: HF commit, --revision).
4. `extract_unit` writes each tensor's artifacts and, last, its record; tensors whose record
   matches the source checksum and whose artifacts exist are skipped (resume).
5. `publish` writes `manifest.json` with a conditional write: the model is complete.

The content revision (no --revision, no HF commit) is the first 16 hex digits of the sha256 of
every container's header bytes, then each raw tensor's name and the sha256 of its source bytes,
in file order: the same bytes give the same revision, wherever they are read from. A local
file is hashed first (step 3) and extracted into its revision's folder (a killed run resumes
there). A remote file (S3, HTTP) is read once: its tensors are extracted into a staging folder
of the run, `models/<slug>/.staging-<run-id>/`, hashed as they stream by, and `publish_staged`
then names the revision, moves the artifacts into `models/<slug>/<revision>/` (or the forced
run's generation) under that folder's lease, writes the manifest last and drops the staging
folder. Tensors left out by --include/--exclude are hashed only. A killed remote run leaves its
staging folder to `gc` and the next run reads the source again.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import platform
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightsmith import __version__, dtypes, images, lease, overlap
from weightsmith.artifacts import write_images
from weightsmith.errors import WeightsmithError
from weightsmith.model import MANIFEST, MANIFEST_FORMAT, ModelRef, slugify
from weightsmith.sources import Source, open_source
from weightsmith.sources.base import GptqGroup, TensorEntry
from weightsmith.state import StoreUrl
from weightsmith.store import Store, arrays, encode_key
from weightsmith.store.store import dumps

Progress = Callable[[int, str], None]  # (bytes just done, tensor name); called from several threads
# Work units extracted (and checksummed) at once: a unit's own threads overlap its reads, Zarr
# writes and images only within a tensor, and most tensors are one block; two units keep both
# cores of a small machine busy. Each unit holds at most three row blocks in memory.
UNIT_WORKERS = 2
# From a remote source, each unit fetches its next tensors while it writes one: up to this many
# at once, within this many bytes (the one being written included). Row blocks of bigger
# tensors are fetched one block ahead, each block as several ranges (`weightsmith.ranged`).
READ_AHEAD_TENSORS, READ_AHEAD_BYTES = 4, 64_000_000


class ExtractOptions(BaseModel):
    """What to extract and how; written into runs/<run-id>.json for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # store URL: a folder, file:// or s3://bucket/prefix; None: the default store
    store: StoreUrl = Field(None, validate_default=True)
    name: str | None = None  # model slug; default: HF id, else the source's parent folder name
    revision: str | None = None  # default: HF commit, else a hash of headers and tensor checksums (module doc)
    include: tuple[str, ...] = ()  # glob patterns over tensor names; empty: everything
    exclude: tuple[str, ...] = ()  # glob patterns over tensor names to leave out
    images: Literal["all", "preview", "none"] = "all"  # TIFF + PNG, PNG only, or neither
    force: bool = False  # rewrite artifacts that are already there
    wait_s: float = Field(0.0, ge=0)  # wait this long for another run of the same model to finish
    # Set by the run, not the user: the folder a forced run of a published model writes into.
    generation: str | None = None
    block_bytes: int = Field(64_000_000, ge=1 << 16)  # tensors above this stream in row blocks
    unit_bytes: int = Field(64_000_000, ge=1)  # small tensors are packed into units this large


@dataclass(frozen=True)
class WorkUnit:
    """Tensors extracted together by one task (logical names: raw tensors or GPTQ weights)."""

    index: int
    names: tuple[str, ...]
    nbytes: int
    raw: tuple[str, ...] = ()  # the raw tensors read from the source (GPTQ components included)


@dataclass(frozen=True)
class UnitResult:
    records: list[dict]  # manifest records of the unit's tensors (GPTQ components included)
    written: int  # tensors written now; the rest were already complete in the store


@dataclass(frozen=True)
class ExtractResult:
    model_url: str
    slug: str
    revision: str
    tensors: int
    written: int  # tensors written in this run
    skipped: int  # tensors already complete in the store
    bytes_read: int
    status: str  # "created" | "unchanged" | "replaced"
    run_id: str


# ---------------------------------------------------------------------------------------------
# 2. plan
def logical_names(source: Source) -> list[str]:
    """Tensor names as a user sees them: GPTQ groups as `<prefix>.weight`, in file order."""
    group_of = {c: g for g in source.groups for c in g.components}
    names: list[str] = []
    for name in source.tensors:
        group = group_of.get(name)
        if group is None:
            names.append(name)
        elif name == group.qweight:
            names.append(group.name)
    return names


def plan(source: Source, options: ExtractOptions) -> list[WorkUnit]:
    """Select tensors by the include/exclude globs and pack them into work units."""
    names = [
        n
        for n in logical_names(source)
        if (not options.include or any(fnmatch.fnmatchcase(n, p) for p in options.include))
        and not any(fnmatch.fnmatchcase(n, p) for p in options.exclude)
    ]
    if not names and (options.include or options.exclude):
        raise WeightsmithError(source.url, "no tensor matches the include/exclude patterns")
    return _pack(source, names, options.unit_bytes)


def _pack(source: Source, names: list[str], unit_bytes: int) -> list[WorkUnit]:
    units: list[WorkUnit] = []
    batch: list[str] = []
    batch_bytes = 0
    for name in names:
        size = _source_bytes(source, name)
        if batch and batch_bytes + size > unit_bytes:
            units.append(_unit(source, len(units), batch, batch_bytes))
            batch, batch_bytes = [], 0
        batch.append(name)
        batch_bytes += size
    if batch:
        units.append(_unit(source, len(units), batch, batch_bytes))
    return units


def biggest_first(units: tuple[WorkUnit, ...] | list[WorkUnit]) -> list[WorkUnit]:
    """Units in the order to start them: the biggest first, so that no big tensor (an embedding
    matrix, often last in the file) runs alone at the end while the other workers have nothing
    left to do."""
    return sorted(units, key=lambda u: (-u.nbytes, u.index))


def _unit(source: Source, index: int, names: list[str], nbytes: int) -> WorkUnit:
    raw = tuple(r for n in names for r in _raw_names(source, n))
    return WorkUnit(index, tuple(names), nbytes, raw)


def _groups(source: Source) -> dict[str, GptqGroup]:
    return {g.name: g for g in source.groups}


def _raw_names(source: Source, name: str) -> tuple[str, ...]:
    group = _groups(source).get(name)
    return group.components if group else (name,)


def _source_bytes(source: Source, name: str) -> int:
    return sum(source.tensors[n].nbytes for n in _raw_names(source, name))


# ---------------------------------------------------------------------------------------------
# 3. identify
def checksum_unit(source: Source, unit: WorkUnit, block_bytes: int) -> dict[str, str]:
    """sha256 of the source bytes of every raw tensor in the unit."""
    return {raw: _source_sha256(source, source.tensors[raw], block_bytes) for raw in unit.raw}


def _source_sha256(source: Source, entry: TensorEntry, block_bytes: int) -> str:
    h = hashlib.sha256()
    for start in range(entry.start, entry.end, block_bytes):
        block = source.read_array(entry.container, start, min(entry.end, start + block_bytes))
        h.update(block)
        source.recycle(block)
    return h.hexdigest()


def model_slug(source: Source, options: ExtractOptions) -> str:
    """--name, else the HF id, else the source's parent folder name."""
    if options.name:
        return slugify(options.name)
    if source.hf_id:
        return slugify(source.hf_id)
    return slugify(os.path.basename(source.root.rstrip("/")) or "model")


def model_ref(source: Source, options: ExtractOptions, checksums: dict[str, str] | None) -> ModelRef:
    """Where the model goes: slug from --name / HF id / parent folder; revision likewise."""
    slug = model_slug(source, options)
    revision = options.revision or source.hf_revision
    if revision:
        revision = slugify(revision)
    else:
        if set(checksums or ()) != set(source.tensors):
            raise ValueError("the content revision needs the checksum of every tensor")
        h = hashlib.sha256()
        for i in range(len(source.containers)):
            h.update(header_bytes(source, i))
        for name in source.tensors:
            h.update(name.encode("utf-8", "surrogatepass") + b"\0" + checksums[name].encode())
        revision = h.hexdigest()[:16]
    return ModelRef(Store(options.store), slug, revision)


def header_bytes(source: Source, container: int) -> bytes:
    c = source.containers[container]
    return b"".join(source.opaque(container, s.start, s.end) for s in c.segments if s.tensor is None)


# ---------------------------------------------------------------------------------------------
# 4. write
def write_files(model: ModelRef, source: Source) -> dict[str, dict]:
    """Copy headers (opaque segments), sidecars and GGUF metadata into files/ (idempotent)."""
    written: dict[str, dict] = {}

    def put(name: str, data: bytes) -> None:
        key = model.key("files", encode_key(name))
        if not (model.store.exists(key) and model.store.read_bytes(key) == data):
            model.store.write_bytes(key, data)
        written[name] = {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    for i, c in enumerate(source.containers):
        for s in c.segments:
            if s.tensor is None:
                suffix = "header" if s.start == 0 else f"bytes-{s.start}"
                put(f"{c.name}.{suffix}", source.opaque(i, s.start, s.end))
        if c.format == "gguf":
            put(f"{c.name}.metadata.json", dumps(c.metadata))
    for name, data in source.sidecars.items():
        put(name, data)
    return written


def extract_unit(
    source: Source,
    model: ModelRef,
    unit: WorkUnit,
    options: ExtractOptions,
    expected: dict[str, str] | None = None,
    progress: Progress | None = None,
    fingerprints: list[tuple | None] | None = None,
) -> UnitResult:
    """Write the artifacts of every tensor in the unit.

    A tensor already in the store (record present, same checksum and layout, artifacts there)
    is skipped unless `options.force`. `expected` holds source checksums from the checksum pass;
    bytes that hash differently now mean the source changed under us, which is an error.
    `fingerprints` (`Source.fingerprints()` taken before that pass) spare hashing the bytes
    again: a tensor is taken to have its expected checksum when its container's fingerprint is
    the same before and after the tensor was read. A fingerprint that already differs before
    (the file changed since, or the pass ran on another machine) means hashing the tensor as
    usual; one that changes while the tensor is read is the same error.

    From a remote source, the next tensors of at most `block_bytes` are fetched while this one
    is hashed, compressed and written (one GET after another would leave the link idle).
    """
    done: list[tuple[dict, bool]] = []
    with contextlib.closing(_read_ahead(source, unit, options.block_bytes)) as ahead:

        def raw(name: str, role: str) -> tuple[dict, bool]:
            entry = source.tensors[name]
            got, pre = next(ahead)
            assert got == name, (got, name)  # unit.raw is in the order the tensors are extracted
            return _extract_raw(source, model, entry, options, expected, role, progress, fingerprints, pre)

        for name in unit.names:
            group = _groups(source).get(name)
            if group is None:
                done.append(raw(name, "tensor"))
                continue
            parts = [raw(c, "gptq-component") for c in group.components]
            done += parts
            done.append(_extract_gptq(source, model, group, options, [r for r, _ in parts]))
    return UnitResult(records=[r for r, _ in done], written=sum(w for _, w in done))


def _read_ahead(source: Source, unit: WorkUnit, block_bytes: int) -> Iterator[tuple[str, np.ndarray | None]]:
    """(raw name, its bytes or None) for each raw tensor of the unit, in order. The bytes of
    remote tensors of at most `block_bytes` are fetched ahead on threads, within
    `READ_AHEAD_BYTES` a unit; the others (local files, big tensors: read in row blocks) come
    as None."""

    def small(name: str) -> bool:
        e = source.tensors[name]
        return 0 < e.nbytes <= block_bytes and not source.readers[e.container].local

    def read(name: str) -> tuple[str, np.ndarray | None]:
        e = source.tensors[name]
        return name, source.read_array(e.container, e.start, e.end) if small(name) else None

    if not any(small(n) for n in unit.raw):
        return (read(n) for n in unit.raw)
    ahead = max(block_bytes, READ_AHEAD_BYTES)
    return overlap.map_ahead(read, unit.raw, lambda n: source.tensors[n].nbytes * small(n), ahead, READ_AHEAD_TENSORS)


def _existing(model: ModelRef, key: str, want: dict, options: ExtractOptions) -> dict | None:
    """The stored record if it matches `want` (layout and checksum) and its artifacts exist."""
    if options.force:
        return None
    record = arrays.read_record(model.store, key)
    if record is None or any(record.get(k) != v for k, v in want.items() if v is not None):
        return None
    needed = {"all": ("tiff", "png"), "preview": ("png",), "none": ()}[options.images]
    if record.get("role") == "gptq-component" or 0 in record.get("shape", []):
        needed = ()  # components and empty tensors have no images
    artifacts = record.get("artifacts", {})
    if any(k not in artifacts or not model.store.exists(artifacts[k]) for k in needed):
        return None
    return record


def _extract_raw(source, model, entry: TensorEntry, options, expected, role, progress, fingerprints, pre=None) -> dict:
    """One raw tensor; `pre`: its source bytes, already fetched (else they are read here)."""
    container = source.containers[entry.container]
    key = model.tensor_key(entry.name, options.generation)
    base = {
        "name": entry.name,
        "role": role,
        "dtype": entry.dtype,
        "shape": list(entry.shape),
        "encoding": entry.encoding,
        "container": container.name,
        "byte_range": [entry.start, entry.end],
    }
    want_sha = (expected or {}).get(entry.name)
    done = _existing(model, key, {**base, "sha256": want_sha}, options)
    if done is not None:
        if want_sha is None:  # revision given, no checksum pass: hash the source range now
            want_sha = (
                hashlib.sha256(pre).hexdigest()
                if pre is not None
                else _source_sha256(source, entry, options.block_bytes)
            )
        if done["sha256"] == want_sha:
            if pre is not None:
                source.recycle(pre)
            if progress:
                progress(entry.nbytes, entry.name)
            return done, False

    storage_shape, storage_dtype = _storage_layout(entry)
    attrs = {"dtype": entry.dtype, "shape": list(entry.shape), "encoding": entry.encoding}
    array = arrays.create(model.store, key, storage_shape, storage_dtype, attrs)
    # The checksum pass hashed these bytes: when the file shows no change since, that digest is theirs.
    before = fingerprints[entry.container] if fingerprints and want_sha is not None else None
    if before is not None and source.readers[entry.container].fingerprint() != before:
        before = None  # changed since the checksum pass (or taken on another machine): hash again
    h = hashlib.sha256() if before is None else None

    def blocks() -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:  # on the prefetch thread, if any
        for r0, r1, raw in _row_blocks(source, entry, options.block_bytes, array.chunks[0] if array.ndim else 1, pre):
            if h is not None:
                h.update(raw)
            stored = raw.view(storage_dtype).reshape((r1 - r0, *storage_shape[1:]))
            yield r0, r1, stored, float_rows(entry, stored)

    def bands() -> Iterator[np.ndarray]:
        # Block k+1 is read, hashed and converted while block k is written to Zarr and imaged.
        done = None  # the block before: read, imaged, and in Zarr once `submit` returns
        # A tensor of at most block_bytes (most are) is one or two blocks: no thread to read ahead.
        read = overlap.prefetch(blocks()) if entry.nbytes > options.block_bytes else blocks()
        with overlap.Background() as zarr_writer, contextlib.closing(read) as ahead:
            for _, _, stored, band in ahead:
                zarr_writer.submit(array.append, stored)  # waits for the block before's write
                if done is not None:
                    source.recycle(done)
                done = stored
                if progress:
                    progress(stored.nbytes, entry.name)
                yield band
        if done is not None:
            source.recycle(done)  # the last block's write ended with the `with`

    with_images = role == "tensor"
    with contextlib.closing(bands()) as stream:  # on an error, stop the threads before going on
        stats, artifacts = write_images(
            model.store,
            model.tiff_key(entry.name, options.generation),
            model.png_key(entry.name, options.generation),
            entry.name,
            entry.shape,
            entry.dtype,
            stream,
            options.images if with_images else "none",
        )
    if h is not None:
        sha = h.hexdigest()
        changed = want_sha is not None and sha != want_sha
    else:
        sha, changed = want_sha, source.readers[entry.container].fingerprint() != before
    if changed:
        raise WeightsmithError(
            source.readers[entry.container].url, f"tensor {entry.name!r} changed while it was being extracted"
        )
    record = {**base, "sha256": sha, "stats": stats, "artifacts": {"zarr": key, **artifacts}}
    array.finish(record)
    return record, True


def _storage_layout(entry: TensorEntry) -> tuple[tuple[int, ...], np.dtype]:
    if entry.encoding == "gguf":
        rows = entry.numel // entry.shape[-1] if entry.shape and entry.shape[-1] else 0
        return (rows, entry.row_bytes), np.dtype("u1")
    return entry.shape, dtypes.storage_dtype(entry.dtype)


def _row_blocks(
    source: Source, entry: TensorEntry, block_bytes: int, chunk: int, pre: np.ndarray | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first row, end row, bytes) blocks along dim 0 of the stored array, chunk-aligned;
    `pre`, the tensor's bytes already fetched, is one block."""
    shape, _ = _storage_layout(entry)
    if pre is not None or len(shape) < 2 or shape[0] == 0 or entry.nbytes == 0:
        rows = shape[0] if shape else 1
        yield 0, rows, pre if pre is not None else source.read_array(entry.container, entry.start, entry.end)
        return
    row_bytes = entry.nbytes // shape[0]
    rows_per = max(1, block_bytes // max(1, row_bytes))
    rows_per = max(chunk, rows_per - rows_per % chunk)  # whole chunks per write
    if entry.encoding == "gguf" and len(entry.shape) > 2:
        per_image_row = entry.numel // entry.shape[0] // entry.shape[-1]
        rows_per = max(per_image_row, rows_per - rows_per % per_image_row)
    for r0 in range(0, shape[0], rows_per):
        r1 = min(shape[0], r0 + rows_per)
        yield r0, r1, source.read_array(entry.container, entry.start + r0 * row_bytes, entry.start + r1 * row_bytes)


def float_rows(entry: TensorEntry, stored: np.ndarray) -> np.ndarray:
    """A block of the stored array as float32 rows of the tensor's 2-D image view."""
    if entry.encoding == "gguf":
        from weightsmith.sources.gguf import dequantize

        values = dequantize(entry, stored)
    else:
        values = dtypes.from_storage(stored, entry.dtype)
    values = values.astype(np.float32, copy=False)
    cols = images.view_2d(entry.shape)[1]
    return values.reshape(-1, cols) if values.size else values.reshape(0, cols)


def _extract_gptq(
    source: Source, model: ModelRef, group: GptqGroup, options: ExtractOptions, component_records: list[dict]
) -> dict:
    """Dequantise a GPTQ group into `<prefix>.weight` (float32, [out, in]) in output-row bands."""
    from weightsmith.sources.gptq import dequantize

    key = model.tensor_key(group.name, options.generation)
    base = {
        "name": group.name,
        "role": "gptq-weight",
        "dtype": "F32",
        "shape": list(group.shape),
        "encoding": "raw",
        "components": {r["name"]: r["sha256"] for r in component_records},
        "quant": {"bits": group.bits, "group_size": group.group_size, "checkpoint_format": group.checkpoint_format},
    }
    done = _existing(model, key, base, options)
    if done is not None:
        return done, False
    parts = {r["name"]: arrays.read_exact(model.store, r["artifacts"]["zarr"]) for r in component_records}
    g_idx = parts.get(group.g_idx) if group.g_idx else None
    array = arrays.create(
        model.store, key, group.shape, np.dtype("<f4"), {"dtype": "F32", "shape": list(group.shape), "encoding": "raw"}
    )
    h = hashlib.sha256()
    step = max(array.chunks[0], (options.block_bytes // (4 * group.in_features)) // array.chunks[0] * array.chunks[0])

    def bands() -> Iterator[np.ndarray]:
        with overlap.Background() as zarr_writer:  # band k goes to Zarr while k+1 is dequantised
            for o0 in range(0, group.out_features, step):
                o1 = min(group.out_features, o0 + step)
                band = np.ascontiguousarray(
                    dequantize(
                        group, parts[group.qweight], parts[group.qzeros], parts[group.scales], g_idx, rows=slice(o0, o1)
                    ),
                    "<f4",
                )
                zarr_writer.submit(array.append, band)
                h.update(band)
                yield band

    with contextlib.closing(bands()) as stream:
        stats, artifacts = write_images(
            model.store,
            model.tiff_key(group.name, options.generation),
            model.png_key(group.name, options.generation),
            group.name,
            group.shape,
            "F32",
            stream,
            options.images,
        )
    record = {**base, "sha256": h.hexdigest(), "stats": stats, "artifacts": {"zarr": key, **artifacts}}
    array.finish(record)
    return record, True


# ---------------------------------------------------------------------------------------------
# 5. publish
def build_manifest(model: ModelRef, source: Source, options: ExtractOptions, files: dict, records: list[dict]) -> dict:
    """Content only (no times, hosts or run ids): a resumed run gives the same bytes."""
    by_name = {r["name"]: r for r in records}
    return {
        "format": MANIFEST_FORMAT,
        "tool": {"name": "weightsmith", "version": __version__},
        "model": {"slug": model.slug, "revision": model.revision, "hf_id": source.hf_id},
        "source": {
            "url": _public_url(source.url),
            "kind": source.kind,
            "containers": [
                {
                    "name": c.name,
                    "format": c.format,
                    "size": c.size,
                    "segments": [
                        [s.start, s.end, s.tensor]
                        if s.tensor is not None
                        else [
                            s.start,
                            s.end,
                            None,
                            files[f"{c.name}.{'header' if s.start == 0 else f'bytes-{s.start}'}"]["key"],
                        ]
                        for s in c.segments
                    ],
                    "metadata": c.metadata
                    if c.format == "safetensors"
                    else {"key": files[f"{c.name}.metadata.json"]["key"]},
                }
                for c in source.containers
            ],
        },
        "selection": {
            "include": list(options.include),
            "exclude": list(options.exclude),
            "complete": len(by_name) == _expected_count(source),
            "images": options.images,
        },
        "files": files,
        "tensors": by_name,
    } | ({"generation": options.generation} if options.generation else {})


def _expected_count(source: Source) -> int:
    return len(source.tensors) + len(source.groups)


def _public_url(url: str) -> str:
    """The source URL without credentials or query strings (they may hold tokens)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.scheme in ("http", "https", "s3"):
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return url


def with_generation(model: ModelRef, options: ExtractOptions, run_id: str) -> ExtractOptions:
    """`options` with the folder this run writes artifacts into (call it holding the lease).

    A forced run of a published model writes a new generation beside the published one, so
    the published model stays whole until `publish` switches the manifest over in one
    conditional write (a failed or killed forced run leaves it as it was; `gc` removes the
    orphan). Other runs write where the published manifest's artifacts are: a plain re-run of a
    model a forced run replaced finds its tensors there and gives the same manifest.
    """
    generation = None
    if model.is_complete():
        generation = run_id if options.force else model.manifest().get("generation")
    if generation is not None and not (isinstance(generation, str) and generation.replace("-", "").isalnum()):
        raise WeightsmithError(model.url, f"manifest.json names a generation that is not a run id: {generation!r}")
    return options.model_copy(update={"generation": generation})


def publish(model: ModelRef, manifest: dict, force: bool) -> str:
    """Write manifest.json last, conditionally. Returns "created", "unchanged" or "replaced"."""
    key = model.key(MANIFEST)
    data = dumps(manifest)
    if model.store.create_if_absent(key, data):
        return "created"
    old = model.store.read_bytes(key)
    if old == data:
        return "unchanged"
    if not force:
        raise WeightsmithError(model.url, "a different complete manifest is already there; use --force to replace it")
    if not model.store.replace_if_match(key, data, old):
        raise WeightsmithError(model.url, "another run replaced manifest.json at the same time; run again")
    return "replaced"


def write_run(model: ModelRef, run_id: str, facts: dict) -> None:
    model.store.write_json(model.key("runs", f"{run_id}.json"), facts)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractPlan:
    """What an extraction will do, decided from headers alone (small: safe to pass around)."""

    source_url: str
    units: tuple[WorkUnit, ...]  # the selected tensors
    # Tensors to hash before (local) or beside (staged) the extraction when the revision needs
    # checksums: every tensor of a local source, those not selected of a staged one; else ().
    checksum_units: tuple[WorkUnit, ...]
    total_bytes: int  # source bytes the run will read (checksum pass included)
    # Per container, `Source.fingerprints()` taken before the checksum pass (None: no pass). Passed
    # to `extract_unit`, they spare hashing a local file a second time while it stays unchanged.
    fingerprints: tuple | None = None
    # A remote source without a known revision: extract into a staging folder, hashing on the
    # way, and name the revision at the end (`staging_ref`, `publish_staged`): one read per byte.
    staged: bool = False


def prepare(source_url: str, options: ExtractOptions) -> tuple[Source, ExtractPlan]:
    """Check the input before anything is written: parse headers, plan, probe the store."""
    from weightsmith.space import check_free_space, estimate_extract_bytes

    source = open_source(source_url)
    units = plan(source, options)
    store = Store(options.store)
    store.check_writable()
    check_free_space(store, estimate_extract_bytes(source, units, options.images))
    known = options.revision or source.hf_revision
    staged = not known and not all(r.local for r in source.readers)
    if known:
        checksum_units: tuple[WorkUnit, ...] = ()
    elif staged:  # the selected tensors are hashed as they are extracted; the rest only hashed
        selected = {n for u in units for n in u.names}
        rest = [n for n in logical_names(source) if n not in selected]
        checksum_units = tuple(_pack(source, rest, options.unit_bytes)) if rest else ()
    else:
        checksum_units = tuple(plan(source, options.model_copy(update={"include": (), "exclude": ()})))
    total = sum(u.nbytes for u in units) + sum(u.nbytes for u in checksum_units)
    fingerprints = tuple(source.fingerprints()) if checksum_units and not staged else None  # before any hashing
    return source, ExtractPlan(source_url, tuple(units), checksum_units, total, fingerprints, staged)


STAGING = ".staging-"  # a revision folder no slugified revision can be (a leading '.' is escaped)


def staging_ref(source: Source, options: ExtractOptions, run_id: str) -> ModelRef:
    """The folder a staged run writes its tensors into before the revision is known."""
    return ModelRef(Store(options.store), model_slug(source, options), STAGING + run_id)


@dataclass(frozen=True)
class Published:
    model: ModelRef  # where the model is now
    status: str  # "created" | "unchanged" | "replaced"
    records: list[dict]  # the manifest's records, in file order
    options: ExtractOptions  # with the generation the artifacts went to
    kept: int  # tensors already there with the same bytes (the staged copies were dropped)


def publish_staged(
    source: Source,
    staging: ModelRef,
    the_plan: ExtractPlan,
    options: ExtractOptions,
    checksums: dict[str, str] | None,
    run_id: str,
) -> Published:
    """Name the revision of a staged run, move its artifacts there, publish, drop the staging.

    The revision comes from the staged records' source checksums (and `checksums`, of the
    tensors not selected); it is written into the staging folder before anything moves, so a
    retry of this call (a task retry after a failed move) finishes the same move. Under the
    model's lease, each tensor goes where `with_generation` says; one already there with the
    same record and artifacts (the same bytes: an earlier run) is kept and the staged copy
    dropped. The manifest is written last, as by `extract`.
    """
    store = staging.store
    named = staging.key("revision.json")
    if store.exists(named):  # an earlier try of this call named it and began moving
        model = ModelRef(store, staging.slug, store.read_json(named)["revision"])
    else:
        records = stored_records(source, staging, the_plan.units)
        sums = dict(checksums or {}) | {r["name"]: r["sha256"] for r in records if r["role"] != "gptq-weight"}
        model = model_ref(source, options, sums)
        store.write_json(named, {"revision": model.revision})
    with lease.acquire(model, run_id, options.wait_s) as held:
        options = with_generation(model, options, run_id)
        files = write_files(model, source)
        moved = [_adopt(staging, model, n, options) for n in _record_names(source, the_plan.units)]
        kept = sum(k for _, k in moved)
        records = [m for m, _ in moved]
        manifest = build_manifest(model, source, options, files, records)
        held.check()
        status = publish(model, manifest, options.force)
    store.delete(staging.prefix)
    return Published(model, status, records, options, kept)


def _adopt(staging: ModelRef, model: ModelRef, name: str, options: ExtractOptions) -> tuple[dict, bool]:
    """Move one staged tensor's artifacts into `model`: (its record there, whether it was kept)."""
    store, generation = model.store, options.generation
    key = model.tensor_key(name, generation)
    staged = staging.tensor_key(name)
    record = arrays.read_record(store, staged)
    if record is None:  # moved by an earlier try of this run
        there = arrays.read_record(store, key)
        if there is None:
            raise WeightsmithError(staging.url, f"tensor {name!r} is neither staged nor in {model.url}")
        return there, False
    same = _existing(model, key, {k: v for k, v in record.items() if k not in ("stats", "artifacts")}, options)
    if same is not None:
        return same, True
    where = {"zarr": key, "tiff": model.tiff_key(name, generation), "png": model.png_key(name, generation)}
    moved = {**record, "artifacts": {k: where.get(k, v) for k, v in record["artifacts"].items()}}
    for kind, src in (("tiff", staging.tiff_key(name)), ("png", staging.png_key(name))):
        # Images first: the array's record, which names them, comes last. One gone from the
        # staging folder was moved by an earlier try.
        if kind in record["artifacts"] and store.exists(src):
            _move(store, src, where[kind])
    # The record in the staged array names its new keys before the array moves, so the array
    # arrives finished with the right record or (on S3, zarr.json copied last) not finished.
    meta = json.loads(store.read_bytes(f"{staged}/zarr.json"))
    meta["attributes"][arrays.RECORD] = moved
    store.write_bytes(f"{staged}/zarr.json", json.dumps(meta, allow_nan=True).encode())
    _move(store, staged, key, tree=True)
    return moved, False


def _move(store: Store, src: str, dst: str, tree: bool = False) -> None:
    """Move an object (or a folder of objects: `tree`) to `dst`, replacing what is there.

    A rename on a local store; on S3 server-side copies (a folder's `zarr.json` last), then
    the deletion of the originals.
    """
    if tree and any(k.startswith(f"{dst}/") for k in store.list(dst)):
        store.delete(dst)  # an unfinished or unmatched array of an earlier run: rewritten, as by `arrays.create`
    if store.protocol == "file":
        os.makedirs(os.path.dirname(store.path(dst)), exist_ok=True)
        os.replace(store.path(src), store.path(dst))
        return
    keys = store.list(src) if tree else [src]
    keys.sort(key=lambda k: k == f"{src}/zarr.json")
    for k in keys:
        store.fs.copy(store.path(k), store.path(dst + k[len(src) :]))
    store.delete(src)


def stored_records(
    source: Source, model: ModelRef, units: tuple[WorkUnit, ...], generation: str | None = None
) -> list[dict]:
    """The records of every planned tensor, read back from the store (the store is the truth)."""
    records = []
    for n in _record_names(source, units):
        record = arrays.read_record(model.store, model.tensor_key(n, generation))
        if record is None:
            raise WeightsmithError(model.url, f"tensor {n!r} is not complete in the store")
        records.append(record)
    return records


def _record_names(source: Source, units: tuple[WorkUnit, ...]) -> Iterator[str]:
    """The names of the records of the planned tensors, in manifest order (GPTQ components first)."""
    for unit in units:
        for name in unit.names:
            group = _groups(source).get(name)
            yield from (*group.components, name) if group else (name,)


def os_error_reason(e: OSError, store: Store) -> str:
    """The errno text of `e` or of the OSError it wraps ("No space left on device"), else its message.

    Some writers raise OSErrors built from a message only (a short write), so when nothing in the
    chain has an errno and the local store's disk is full, that is the reason given.
    """
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and (seen.strerror or seen.errno):
            return seen.strerror or os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if store.protocol == "file":
        try:
            if shutil.disk_usage(store.root).free < 1 << 20:
                return f"{os.strerror(errno.ENOSPC)}: {text}"
        except OSError:
            pass
    return text


def run_facts(run_id: str, kind: str, options: BaseModel, source_url: str) -> dict:
    """Run facts for runs/<run-id>.json (times and host: never in the manifest)."""
    return {
        "run_id": run_id,
        "kind": kind,
        "started": time.time(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "tool_version": __version__,
        "options": options.model_dump(mode="json"),
        "source": _public_url(source_url),
    }


def extract(
    source_url: str,
    options: ExtractOptions,
    progress: Progress | None = None,
    total: Callable[[int], None] | None = None,
) -> ExtractResult:
    """The whole extraction in this process: validate, identify, write, publish.

    Input is checked before the first write: headers parsed, the store probed with a test write.
    A failure part-way keeps the finished tensors (a re-run resumes) and writes no manifest.
    """
    source, the_plan = prepare(source_url, options)
    if total:
        total(the_plan.total_bytes)
    if the_plan.staged:
        return _extract_staged(source, the_plan, options, progress)
    checksums: dict[str, str] | None = None
    fingerprints = the_plan.fingerprints
    if the_plan.checksum_units:
        checksums = {}
        units = biggest_first(the_plan.checksum_units)
        for u, sums in zip(
            units,
            overlap.map_in_order(lambda u: checksum_unit(source, u, options.block_bytes), units, UNIT_WORKERS),
            strict=True,
        ):
            checksums.update(sums)
            if progress:
                progress(u.nbytes, "checksums")
    model = model_ref(source, options, checksums)
    run_id = new_run_id()
    facts = run_facts(run_id, "extract", options, source.url)
    try:
        with lease.acquire(model, run_id, options.wait_s) as held:
            options = with_generation(model, options, run_id)
            files = write_files(model, source)

            def one(unit: WorkUnit) -> UnitResult:
                return extract_unit(source, model, unit, options, checksums, progress, fingerprints)

            units = biggest_first(the_plan.units)
            results = dict(zip((u.index for u in units), overlap.map_in_order(one, units, UNIT_WORKERS), strict=True))
            records = [r for i in sorted(results) for r in results[i].records]  # in file order
            written = sum(r.written for r in results.values())
            manifest = build_manifest(model, source, options, files, records)
            held.check()
            status = publish(model, manifest, options.force)
    except BaseException as e:
        _failed(model, run_id, facts, e)
        raise
    write_run(
        model,
        run_id,
        {**facts, "finished": time.time(), "outcome": status, "tensors": len(records), "bytes_read": source.bytes_read},
    )
    return ExtractResult(
        model_url=model.url,
        slug=model.slug,
        revision=model.revision,
        tensors=len(records),
        written=written,
        skipped=len(records) - written,
        bytes_read=source.bytes_read,
        status=status,
        run_id=run_id,
    )


def _failed(model: ModelRef, run_id: str, facts: dict, e: BaseException) -> None:
    """Record a failed run in the model's runs/; a store that refuses writes is a one-line error."""
    error = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
    try:
        write_run(model, run_id, {**facts, "finished": time.time(), "outcome": "failed", "error": error})
    except OSError:
        pass  # the store refuses writes (disk full, read-only): the error below says so
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | ConnectionError | TimeoutError):
        # Disk full, file-size limit, read-only file system: a user problem with the store.
        reason = os_error_reason(e, model.store)
        raise WeightsmithError(model.store.url, f"cannot write ({reason}); finished tensors are kept") from None


def _extract_staged(
    source: Source, the_plan: ExtractPlan, options: ExtractOptions, progress: Progress | None
) -> ExtractResult:
    """`extract` of a remote source without a known revision: every byte read once (module doc)."""
    run_id = new_run_id()
    staging = staging_ref(source, options, run_id)
    facts = run_facts(run_id, "extract", options, source.url)
    checksums: dict[str, str] = {}
    # Tensors only hashed (left out by --include/--exclude) and tensors extracted share the workers.
    work = [(False, u) for u in the_plan.checksum_units] + [(True, u) for u in the_plan.units]
    work.sort(key=lambda w: (-w[1].nbytes, not w[0], w[1].index))

    def one(item: tuple[bool, WorkUnit]) -> UnitResult | dict[str, str]:
        extracted, unit = item
        if extracted:
            return extract_unit(source, staging, unit, options.model_copy(update={"generation": None}), None, progress)
        return checksum_unit(source, unit, options.block_bytes)

    try:
        for (extracted, unit), out in zip(work, overlap.map_in_order(one, work, UNIT_WORKERS), strict=True):
            if not extracted:
                checksums.update(out)
                if progress:
                    progress(unit.nbytes, "checksums")
        done = publish_staged(source, staging, the_plan, options, checksums, run_id)
    except BaseException as e:
        _failed(staging, run_id, facts, e)  # gc collects the staging folder of a failed run
        raise
    tensors = len(done.records)
    write_run(
        done.model,
        run_id,
        {**facts, "finished": time.time(), "outcome": done.status, "tensors": tensors, "bytes_read": source.bytes_read},
    )
    return ExtractResult(
        model_url=done.model.url,
        slug=done.model.slug,
        revision=done.model.revision,
        tensors=tensors,
        written=tensors - done.kept,
        skipped=done.kept,
        bytes_read=source.bytes_read,
        status=done.status,
        run_id=run_id,
    )
