"""Leaderboard batches: list models from a source, compare with the catalogue, process the new.

1. `read_source` lists model revisions and their weights from `hf-hub` or a manifest file
   (one module per source, see `registry.py`).
2. `plan_batch` (pure) decides for each one: `process` (new, or failed earlier with its backoff
   over and under the retry cap), `skip` (cannot be processed: catalogued as skipped) or
   `leave` (done, capped, waiting for its backoff, or already catalogued as skipped).
3. `process_one` runs one model through a `process(entry) -> dict` callable (the pipeline flow,
   its deployment, or the library's extraction) and catalogues done or failed. A model's
   failure is recorded, never raised, so one broken model never blocks the others.
4. `run_batch` is the plain loop over 2-3 (`weightsmith leaderboard --no-prefect`); the
   `leaderboard-batch` flow does the same with bounded parallelism.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Literal

from weightsmith import catalog
from weightsmith.errors import WeightsmithError
from weightsmith.leaderboard import registry
from weightsmith.leaderboard.registry import ModelEntry, SourceQuery
from weightsmith.model import ModelRef, parse_model_url, slugify
from weightsmith.store import Store

__all__ = [
    "BatchSummary", "Decision", "ModelEntry", "Outcome", "SourceQuery", "extract_only",
    "model_url_of", "plan_batch", "process_one", "read_source", "record_skips", "run_batch",
    "summarize",
]  # fmt: skip

Process = Callable[[ModelEntry], dict]  # -> {"model_url", "report_url", "status"}


@dataclass(frozen=True)
class Decision:
    """What a batch does with one listed model revision, and why."""

    entry: ModelEntry
    action: Literal["process", "skip", "leave"]
    reason: str  # "new", "retry 2 of 3", "done", "failed 3 times (cap 3): ...", a problem...


@dataclass(frozen=True)
class Outcome:
    """What happened to one model revision in a batch."""

    id: str
    revision: str
    status: Literal["done", "failed", "skipped"]
    reason: str  # the error of a failure, why a model was not processed, else ""
    model_url: str | None = None
    report_url: str | None = None


@dataclass(frozen=True)
class BatchSummary:
    """Models processed (done now), failed now, and skipped (not processed in this batch)."""

    processed: list[Outcome] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    skipped: list[Outcome] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: [asdict(o) for o in getattr(self, k)] for k in ("processed", "failed", "skipped")}

    def table(self) -> list[dict]:
        """One row per model: id, revision, outcome, reason, model URL."""
        return [
            {
                "id": o.id,
                "revision": o.revision,
                "outcome": o.status,
                "reason": o.reason,
                "model_url": o.model_url or "",
            }
            for o in (*self.processed, *self.failed, *self.skipped)
        ]

    def markdown(self, title: str) -> str:
        def lines(outcomes: list[Outcome], detail: bool) -> str:
            return (
                "\n".join(
                    f"- `{o.id}` @ `{o.revision}`"
                    + (f": {o.reason}" if detail and o.reason else "")
                    + (f" -> `{o.model_url}`" if o.model_url else "")
                    for o in outcomes
                )
                or "(none)"
            )

        return (
            f"# {title}\n\n{len(self.processed)} processed, {len(self.failed)} failed, "
            f"{len(self.skipped)} skipped\n\n## Processed\n{lines(self.processed, False)}\n\n"
            f"## Failed\n{lines(self.failed, True)}\n\n## Skipped\n{lines(self.skipped, True)}\n"
        )


def read_source(source: str, query: SourceQuery) -> list[ModelEntry]:
    """The model revisions `source` ("hf-hub" or a manifest's path or URL) lists now."""
    return registry.get(registry.kind_of(source))(source, query)


def plan_batch(
    entries: Iterable[ModelEntry],
    catalogue: dict,
    now: datetime,
    max_attempts: int = catalog.MAX_ATTEMPTS,
) -> list[Decision]:
    """Decide, for each listed model revision, whether this batch processes it (pure)."""
    decisions = []
    for entry in entries:
        old = catalogue["models"].get(entry.key)
        if entry.problem is None:
            ok, why = catalog.due(old, now, max_attempts)
            decisions.append(Decision(entry, "process" if ok else "leave", why))
        elif old is not None and old["status"] == "done":
            decisions.append(Decision(entry, "leave", "done"))
        elif old is not None and old["status"] == "skipped" and old.get("last_error") == entry.problem:
            decisions.append(Decision(entry, "leave", f"skipped: {entry.problem}"))
        else:
            decisions.append(Decision(entry, "skip", entry.problem))
    return decisions


def model_url_of(store: str, entry: ModelEntry) -> str:
    """Where the pipeline puts the model: it is named by the entry's id and revision."""
    return ModelRef(Store(store), slugify(entry.id), slugify(entry.revision)).url


def process_one(
    store: str,
    entry: ModelEntry,
    process: Process,
    backoff_seconds: float = catalog.BACKOFF_SECONDS,
) -> Outcome:
    """Process one model and catalogue the outcome; a failure is recorded, not raised.

    Done means the model is complete in the store (its manifest is there), whatever the
    `process` callable returned: the store is the truth.
    """
    model_url = report_url = None
    try:
        result = process(entry) or {}
        model_url = result.get("model_url") or model_url_of(store, entry)
        report_url = result.get("report_url")
        if not parse_model_url(model_url).is_complete():
            raise WeightsmithError(model_url, "the pipeline finished but the model has no manifest.json")
        status, error = "done", None
    except Exception as e:  # any failure of this model is its own: record it and go on
        status, error = "failed", _one_line(e)
    now = catalog.now_utc()
    catalog.update(
        store,
        lambda c: catalog.record(
            c,
            entry,
            status,
            now,
            error=error,
            model_url=model_url,
            report_url=report_url,
            backoff_seconds=backoff_seconds,
        ),
    )
    return Outcome(entry.id, entry.revision, status, error or "", model_url, report_url)


def record_skips(store: str, decisions: list[Decision]) -> None:
    """Catalogue the models that cannot be processed (one conditional write for all)."""
    skips = [d for d in decisions if d.action == "skip"]
    if not skips:
        return
    now = catalog.now_utc()

    def change(c: dict) -> None:
        for d in skips:
            catalog.record(c, d.entry, "skipped", now, error=d.reason)

    catalog.update(store, change)


def summarize(decisions: list[Decision], outcomes: list[Outcome]) -> BatchSummary:
    """Processed and failed from this batch's outcomes; everything not processed is skipped."""
    skipped = [Outcome(d.entry.id, d.entry.revision, "skipped", d.reason) for d in decisions if d.action != "process"]
    return BatchSummary(
        processed=[o for o in outcomes if o.status == "done"],
        failed=[o for o in outcomes if o.status == "failed"],
        skipped=skipped,
    )


def run_batch(
    decisions: list[Decision],
    store: str,
    process: Process,
    backoff_seconds: float = catalog.BACKOFF_SECONDS,
) -> BatchSummary:
    """Record the skips, then process the due models one after the other."""
    record_skips(store, decisions)
    outcomes = [process_one(store, d.entry, process, backoff_seconds) for d in decisions if d.action == "process"]
    return summarize(decisions, outcomes)


def extract_only(store: str) -> Process:
    """A `process` callable that runs the library's extraction (the `extract` stage) alone."""
    from weightsmith.extract import ExtractOptions, extract

    def process(entry: ModelEntry) -> dict:
        result = extract(entry.source, ExtractOptions(store=store, name=entry.id, revision=entry.revision))
        return {"model_url": result.model_url, "report_url": None, "status": result.status}

    return process


def _one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:500]
    if isinstance(e, WeightsmithError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
