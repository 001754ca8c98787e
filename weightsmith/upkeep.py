"""Store upkeep: list the models of a store, collect garbage, check free space before writing.

`list_models` reads one recursive listing of `models/` (sizes and times come with it) plus each
model's `manifest.json` and `runs/*.json`. `gc` deletes only what no complete result needs:

- an incomplete model (no manifest) whose last run failed or that has no run at all, once
  nothing in it changed for `older_than_s` (a run still writing keeps touching its files);
- inside a complete model: arrays, images, previews and files its manifest does not name
  (left by runs with other options), and staging leftovers (`*.tmp`, `*.partial`);
- prediction runs without `prediction.json` and candidates without `candidate.json`;
- the store's `.tmp/` staging folder and `.probe/` write probes.

Everything obeys the same age rule, so a run in progress is never collected. A model whose
manifest.json is present but unreadable is "damaged": nothing inside it is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from weightsmith.errors import WeightsmithError
from weightsmith.lease import LEASE
from weightsmith.lease import holder as lease_holder
from weightsmith.model import MANIFEST, MANIFEST_FORMAT, ModelRef
from weightsmith.store import Store

# The files that mark a finished run; the same names as weightsmith.predict.PREDICTION and
# weightsmith.assemble.CANDIDATE, not imported from there so that `ls` loads no pipeline code.
PREDICTION = "prediction.json"
CANDIDATE = "candidate.json"
REPORT = "report.json"
# Folders of a model that hold only what its manifest names: anything else in them is stale.
_ARTIFACT_DIRS = ("tensors", "images", "previews", "files")
_STAGING_SUFFIXES = (".tmp", ".partial")


@dataclass(frozen=True)
class ModelInfo:
    """One model revision in a store, as `weightsmith ls` shows it."""

    slug: str
    revision: str
    url: str
    status: str  # "complete" | "writing" (a run holds the lease) | "incomplete" | "failed" | "damaged"
    tensors: int  # complete: logical tensors in the manifest; else arrays present so far
    stored_bytes: int  # everything below the model's prefix (predictions, candidates included)
    last_run: float | None  # when the last run of runs/*.json finished (or started)
    last_outcome: str | None  # "created" | "unchanged" | "replaced" | "failed" | "unreadable"
    predictions: int  # finished prediction runs (with prediction.json)
    candidates: int  # finished candidates (with candidate.json)
    reports: int  # finished reports (with report.json)


@dataclass(frozen=True)
class GcItem:
    """One thing gc deletes: an object or a whole prefix."""

    key: str
    bytes: int
    reason: str


@dataclass
class GcReport:
    """What gc deleted (or, with dry_run, would delete) and what it left alone."""

    store: str
    dry_run: bool
    items: list[GcItem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<prefix>: why nothing there was touched"

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclass
class _Obj:
    key: str
    size: int
    mtime: float


# ---------------------------------------------------------------------------------------------
# ls
def list_models(store: Store) -> list[ModelInfo]:
    """Every model revision under `<store>/models/`, sorted by slug and revision."""
    infos = []
    for (slug, revision), objs in sorted(_models(store).items()):
        prefix = f"models/{slug}/{revision}"
        rel = {o.key[len(prefix) + 1 :]: o for o in objs}
        manifest, problem = _manifest(store, prefix, rel)
        last = _last_run(store, prefix, rel)
        if manifest is not None:
            status = "complete"
            tensors = sum(
                1
                for r in manifest["tensors"].values()
                if not (isinstance(r, dict) and r.get("role") == "gptq-component")
            )
        else:
            status = "damaged" if problem else "failed" if last[1] == "failed" else "incomplete"
            if not problem and LEASE in rel and lease_holder(ModelRef(store, slug, revision)) is not None:
                status = "writing"  # a live run holds the model's lease
            tensors = len({k.split("/")[1] for k in rel if k.startswith("tensors/") and k.count("/") > 1})
        infos.append(
            ModelInfo(
                slug=slug,
                revision=revision,
                url=store.url_of(prefix),
                status=status,
                tensors=tensors,
                stored_bytes=sum(o.size for o in objs),
                last_run=last[0],
                last_outcome=last[1],
                predictions=_finished(rel, "predictions", PREDICTION),
                candidates=_finished(rel, "candidates", CANDIDATE),
                reports=_finished(rel, "reports", REPORT),
            )
        )
    return infos


def _finished(rel: dict[str, _Obj], folder: str, marker: str) -> int:
    return sum(1 for k in rel if k.startswith(f"{folder}/") and k.count("/") == 2 and k.endswith(f"/{marker}"))


# ---------------------------------------------------------------------------------------------
# gc
def gc(store: Store, dry_run: bool = True, older_than_s: float = 3600) -> GcReport:
    """Find (and unless `dry_run`, delete) what no complete result needs; see the module doc.

    Args:
        store: the store to clean.
        dry_run: only report what would be deleted.
        older_than_s: leave anything that changed more recently than this many seconds ago.

    Returns:
        The deleted (or, with `dry_run`, deletable) keys with their sizes and reasons, and what
        was left alone: models whose manifest cannot be read, things that changed meanwhile.
    """
    report = GcReport(store=store.url, dry_run=dry_run)
    cutoff = time.time() - older_than_s

    def collect(key: str, objs: list[_Obj], reason: str) -> None:
        if objs and max(o.mtime for o in objs) <= cutoff:
            report.items.append(GcItem(key, sum(o.size for o in objs), reason))

    for top in (".tmp", ".probe"):
        for key, objs in sorted(_group(_find(store, top), 2).items()):
            collect(key, objs, "staging leftover" if top == ".tmp" else "write probe")

    for (slug, revision), objs in sorted(_models(store).items()):
        prefix = f"models/{slug}/{revision}"
        rel = {o.key[len(prefix) + 1 :]: o for o in objs}
        if MANIFEST not in rel:
            outcome = _last_run(store, prefix, rel)[1]
            if outcome in (None, "failed"):
                why = "no run finished" if outcome is None else "last run failed"
                collect(prefix, objs, f"incomplete model ({why})")
            continue
        manifest, problem = _manifest(store, prefix, rel)
        refs = _referenced(manifest) if manifest is not None else None
        if refs is None:
            report.skipped.append(f"{prefix}: {problem or 'manifest does not list its artifacts'}")
            continue
        for unit, (unit_objs, reason) in sorted(_stale(prefix, rel, refs).items()):
            collect(unit, unit_objs, reason)

    if not dry_run:
        for item in list(report.items):
            # Look again just before deleting: a run that started since the listing keeps its
            # files (it touched them), and a model that became complete keeps everything.
            now = _find(store, item.key)
            if (
                not now
                or max(o.mtime for o in now) > cutoff
                or (item.key.count("/") == 2 and store.exists(f"{item.key}/{MANIFEST}"))
            ):
                report.items.remove(item)
                report.skipped.append(f"{item.key}: changed while gc ran")
                continue
            store.delete(item.key)
            _drop_empty_parents(store, item.key)
    return report


def _stale(prefix: str, rel: dict[str, _Obj], refs: set[str]) -> dict[str, tuple[list[_Obj], str]]:
    """Deletable units of a complete model (key -> its objects, reason), ignoring their age."""
    units: dict[str, tuple[list[_Obj], str]] = {}
    generations = f"{prefix}/generations/"
    used = {r[len(generations) :].split("/", 1)[0] for r in refs if r.startswith(generations)}
    for key, o in rel.items():
        parts = key.split("/")
        full = f"{prefix}/{key}"
        base = prefix
        if parts[0] == "generations" and len(parts) > 2:
            # A forced run's artifacts: all of a generation the manifest does not use goes at once.
            base = f"{generations}{parts[1]}"
            if parts[1] not in used:
                units.setdefault(base, ([], "generation not in the manifest"))[0].append(o)
                continue
            parts = parts[2:]
        array = f"{base}/tensors/{parts[1]}" if parts[0] == "tensors" and len(parts) > 2 else None
        unit, reason = None, ""
        if parts[0] in ("predictions", "candidates") and len(parts) > 2:
            marker = PREDICTION if parts[0] == "predictions" else CANDIDATE
            if f"{parts[0]}/{parts[1]}/{marker}" not in rel:
                unit, reason = f"{prefix}/{parts[0]}/{parts[1]}", f"unfinished {parts[0][:-1]}"
        if unit is not None or full in refs or array in refs:
            pass  # an unfinished run (whole), or something the manifest names
        elif parts[-1].endswith(_STAGING_SUFFIXES):
            unit, reason = full, "staging leftover"  # e.g. a crashed atomic write's temp file
        elif array is not None:
            unit, reason = array, "not in the manifest"  # a whole .zarr folder
        elif parts[0] in _ARTIFACT_DIRS:
            unit, reason = full, "not in the manifest"
        if unit is not None:
            units.setdefault(unit, ([], reason))[0].append(o)
    return units


def _referenced(manifest: dict) -> set[str] | None:
    """Keys a manifest names (arrays as their `.zarr` prefix); None if it is malformed."""
    files, tensors = manifest.get("files"), manifest.get("tensors")
    if not isinstance(files, dict) or not isinstance(tensors, dict):
        return None
    refs = set()
    for info in files.values():
        if not isinstance(info, dict) or not isinstance(info.get("key"), str):
            return None
        refs.add(info["key"])
    for record in tensors.values():
        arts = record.get("artifacts") if isinstance(record, dict) else None
        if not isinstance(arts, dict):
            return None
        refs.update(arts[k] for k in ("zarr", "tiff", "png") if isinstance(arts.get(k), str))
    return refs


def _drop_empty_parents(store: Store, key: str) -> None:
    """Remove folders a local delete left empty, up to the model's slug folder."""
    if store.protocol != "file":
        return  # S3 has no folders
    parts = key.split("/")
    for depth in range(len(parts) - 1, 1, -1):
        with contextlib.suppress(OSError):
            os.rmdir(store.path("/".join(parts[:depth])))


# ---------------------------------------------------------------------------------------------
# listing helpers
def _find(store: Store, prefix: str) -> list[_Obj]:
    """Every object below `prefix` with its size and modification time (one listing)."""
    try:
        found = store.fs.find(store.path(prefix), detail=True)
    except FileNotFoundError:
        return []
    except OSError as e:  # PermissionError (bad credentials), connection errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsmithError(store.url, f"cannot list {prefix}/ ({reason})") from None
    start = len(store.root) + 1
    return [
        _Obj(path[start:], int(info.get("size") or 0), _mtime(info))
        for path, info in found.items()
        if info.get("type", "file") == "file"
    ]


def _mtime(info: dict) -> float:
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if value is not None else time.time()  # unknown: treat as new, keep


def _group(objs: list[_Obj], depth: int) -> dict[str, list[_Obj]]:
    """Objects grouped by their first `depth` key components."""
    groups: dict[str, list[_Obj]] = defaultdict(list)
    for o in objs:
        groups["/".join(o.key.split("/")[:depth])].append(o)
    return groups


def _models(store: Store) -> dict[tuple[str, str], list[_Obj]]:
    out: dict[tuple[str, str], list[_Obj]] = {}
    for key, objs in _group(_find(store, "models"), 3).items():
        parts = key.split("/")
        if len(parts) == 3 and all(o.key != key for o in objs):  # skip stray files in models/
            out[(parts[1], parts[2])] = objs
    return out


def _manifest(store: Store, prefix: str, rel: dict[str, _Obj]) -> tuple[dict | None, str | None]:
    """(manifest, None), (None, why it is unreadable), or (None, None) when there is none."""
    if MANIFEST not in rel:
        return None, None
    try:
        manifest = json.loads(store.read_bytes(f"{prefix}/{MANIFEST}"))
    except (OSError, ValueError) as e:
        return None, f"manifest.json is unreadable ({type(e).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, f"manifest.json is not a {MANIFEST_FORMAT} manifest"
    if not isinstance(manifest.get("tensors"), dict):
        return None, "manifest.json has no tensors object"
    return manifest, None


def _last_run(store: Store, prefix: str, rel: dict[str, _Obj]) -> tuple[float | None, str | None]:
    """(time, outcome) of the latest runs/*.json; (None, None) when no run finished."""
    latest: tuple[float, str, str] | None = None
    for key, o in rel.items():
        if not (key.startswith("runs/") and key.count("/") == 1 and key.endswith(".json")):
            continue
        try:
            facts = json.loads(store.read_bytes(f"{prefix}/{key}"))
        except (OSError, ValueError):
            facts = None
        if isinstance(facts, dict):
            when = facts.get("finished", facts.get("started"))
            when = float(when) if isinstance(when, int | float) else o.mtime
            outcome = facts.get("outcome") if isinstance(facts.get("outcome"), str) else "unreadable"
        else:
            when, outcome = o.mtime, "unreadable"
        if latest is None or (when, posixpath.basename(key)) > latest[:2]:
            latest = (when, posixpath.basename(key), outcome)
    return (latest[0], latest[2]) if latest else (None, None)
