"""Leaderboard tasks: thin wrappers of `weightsmith.leaderboard` and the catalogue.

`process-model` has no Prefect retries: a failed model is catalogued and tried again by a
later batch, after its backoff, up to the retry cap (weightsmith.catalog).
"""

from __future__ import annotations

from prefect import task

from weightsmith import catalog
from weightsmith import leaderboard as lib
from weightsmith_tasks.credentials import use_credentials
from weightsmith_tasks.policy import policy

_RETRY = policy("leaderboard")


@task(name="read-source", **_RETRY)
def read_source(source: str, query: lib.SourceQuery, credentials: str | None = None) -> list[lib.ModelEntry]:
    use_credentials(credentials)
    return lib.read_source(source, query)


@task(name="plan-batch", **_RETRY)
def plan_batch(
    store: str, entries: list[lib.ModelEntry], max_attempts: int, credentials: str | None = None
) -> list[lib.Decision]:
    """Compare the listed models with the catalogue: what to process, skip or leave."""
    use_credentials(credentials)
    catalogue, _ = catalog.load(store)
    return lib.plan_batch(entries, catalogue, catalog.now_utc(), max_attempts)


@task(name="record-skips", **_RETRY)
def record_skips(store: str, decisions: list[lib.Decision], credentials: str | None = None) -> None:
    use_credentials(credentials)
    lib.record_skips(store, decisions)


# No Prefect retries: a failed model is catalogued and tried again by a later batch.
@task(name="process-model", task_run_name="process {entry.id}@{entry.revision}", **policy("leaderboard", retries=0))
def process_model(
    store: str,
    entry: lib.ModelEntry,
    process: lib.Process,
    backoff_seconds: float,
    credentials: str | None = None,
) -> lib.Outcome:
    """Run the pipeline on one model and catalogue done or failed (a failure is not raised)."""
    use_credentials(credentials)
    return lib.process_one(store, entry, process, backoff_seconds)


@task(name="grow-family-zoo", task_run_name="zoo {entry.id}@{entry.revision}", **_RETRY)
def grow_family_zoo(
    store: str, entry: lib.ModelEntry, outcome: lib.Outcome, growth: lib.ZooGrowth, credentials: str | None = None
) -> dict | None:
    """Append a newly processed model to its family's zoo; catalogue what happened."""
    use_credentials(credentials)
    return lib.grow_family_zoo(store, entry, outcome, growth)
