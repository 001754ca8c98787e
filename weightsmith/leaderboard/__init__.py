"""Leaderboard batches: list models from a source, compare with the catalogue, process the new.

1. `read_source` lists model revisions and their weights from `hf-hub` or a manifest file
   (one module per source, see `registry.py`).
2. `plan_batch` (pure) decides for each one: `process` (new, or failed earlier with its backoff
   over and under the retry cap), `skip` (cannot be processed: catalogued as skipped) or
   `leave` (done, capped, waiting for its backoff, or already catalogued as skipped).
3. `process_one` runs one model through a `process(entry) -> dict` callable (the pipeline flow,
   its deployment, or the library's extraction) and catalogues done or failed. A model's
   failure is recorded, never raised, so one broken model never blocks the others.
4. `grow_family_zoo` (with `ZooGrowth(zoo="family")`) appends each newly processed model
   that has a family (the base model it was fine-tuned from) to that family's zoo, one model
   at a time after the batch's processing, and catalogues what happened (`zoo` of its entry).
5. `run_batch` is the plain loop over 2-4 (`weightsmith leaderboard --no-prefect`); the
   `leaderboard-batch` flow does the same with bounded parallelism.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from weightsmith import catalog
from weightsmith.errors import WeightsmithError
from weightsmith.leaderboard import registry
from weightsmith.leaderboard.registry import ModelEntry, SourceQuery
from weightsmith.model import ModelRef, parse_model_url, slugify
from weightsmith.store import Store

__all__ = [
    "BatchSummary", "Decision", "ModelEntry", "Outcome", "SourceQuery", "ZooGrowth", "extract_only",
    "grow_family_zoo", "model_url_of", "plan_batch", "process_one", "read_source", "record_skips",
    "run_batch", "summarize",
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
    zoos: list[dict] = field(default_factory=list)  # family zoo appends: {model, id, status, reason, checkpoints}

    def to_dict(self) -> dict:
        kinds = {k: [asdict(o) for o in getattr(self, k)] for k in ("processed", "failed", "skipped")}
        return {**kinds, "zoos": list(self.zoos)}

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


class ZooGrowth(BaseModel):
    """Whether a batch grows family zoos, with which tensors and up to what member size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    zoo: Literal["none", "family"] = "none"  # family: append each new model to its base model's zoo
    include: tuple[str, ...] = ()  # glob patterns over tensor names; empty: every tensor
    max_member_bytes: int | None = Field(None, ge=1)  # float32 bytes of one member's selection; None: no cap


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


def grow_family_zoo(store: str, entry: ModelEntry, outcome: Outcome, growth: ZooGrowth) -> dict | None:
    """Append a newly processed model to its family's zoo and catalogue the result.

    Returns the catalogued `zoo` facts ({id, status, reason, checkpoints}), or None when the
    batch grows no zoos, the model failed, or it has no family. A model whose tensors do not
    match the zoo's (or exceed the size cap) is skipped with the reason; a failed append is
    recorded as failed, never raised.
    """
    from weightsmith.zoo.grow import GrowOptions, append_member, family_zoo_id

    if growth.zoo == "none" or outcome.status != "done" or not entry.family or not outcome.model_url:
        return None
    zoo_id = family_zoo_id(entry.family)
    options = GrowOptions(include=growth.include, max_member_bytes=growth.max_member_bytes)
    try:
        result = append_member(store, zoo_id, outcome.model_url, options, family=entry.family)
        facts = {"id": zoo_id, "status": result.status, "reason": result.reason, "checkpoints": result.checkpoints}
    except Exception as e:  # this model's append is its own: record it and go on
        facts = {"id": zoo_id, "status": "failed", "reason": _one_line(e), "checkpoints": None}

    def change(c: dict) -> None:
        c["models"][entry.key]["zoo"] = facts

    catalog.update(store, change)
    return facts


def run_batch(
    decisions: list[Decision],
    store: str,
    process: Process,
    backoff_seconds: float = catalog.BACKOFF_SECONDS,
    growth: ZooGrowth | None = None,
) -> BatchSummary:
    """Record the skips, process the due models one after the other, then grow family zoos."""
    record_skips(store, decisions)
    todo = [d for d in decisions if d.action == "process"]
    outcomes = [process_one(store, d.entry, process, backoff_seconds) for d in todo]
    zoos = []
    for d, o in zip(todo, outcomes, strict=True):
        facts = grow_family_zoo(store, d.entry, o, growth or ZooGrowth())
        if facts:
            zoos.append({"model": d.entry.key, **facts})
    return replace(summarize(decisions, outcomes), zoos=zoos)


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
