"""Extraction tasks: thin wrappers of `weightsmith.extract` stages.

Tasks receive URLs, keys and small frozen plans, never arrays. The store is the truth, not
Prefect's result cache: nothing here is cached, so a wiped store is never counted as done.
"""

from __future__ import annotations

import time
from functools import lru_cache

from prefect import task

from weightsmith import extract as lib
from weightsmith.model import parse_model_url
from weightsmith.sources import Source, open_source
from weightsmith_tasks.credentials import use_credentials
from weightsmith_tasks.policy import policy

_POLICY = policy("extract")


def _source(url: str) -> Source:
    """Each worker process parses a source's headers once per flow run and reuses them for its units.

    Keyed by the flow run too: a later run in the same process (in-process runs, `serve`) must
    see a replaced source object or a new endpoint, not the headers of an earlier run.
    """
    from prefect.runtime import flow_run

    return _source_of_run(url, flow_run.id or "")


@lru_cache(maxsize=8)
def _source_of_run(url: str, run: str) -> Source:
    return open_source(url)


@task(name="prepare-extract", **_POLICY)
def prepare(source_url: str, options: lib.ExtractOptions, credentials: str | None = None) -> lib.ExtractPlan:
    use_credentials(credentials)
    return lib.prepare(source_url, options)[1]


@task(name="checksum-unit", **_POLICY)
def checksum_unit(
    source_url: str, unit: lib.WorkUnit, block_bytes: int, credentials: str | None = None
) -> dict[str, str]:
    use_credentials(credentials)
    return lib.checksum_unit(_source(source_url), unit, block_bytes)


@task(name="resolve-model", **_POLICY)
def resolve_model(
    source_url: str, options: lib.ExtractOptions, checksums: dict[str, str] | None, credentials: str | None = None
) -> dict:
    """Name the model (slug, revision) and copy headers and sidecars into its files/."""
    use_credentials(credentials)
    source = _source(source_url)
    model = lib.model_ref(source, options, checksums)
    return {"model_url": model.url, "files": lib.write_files(model, source)}


@task(name="extract-unit", **_POLICY)
def extract_unit(
    source_url: str,
    model_url: str,
    unit: lib.WorkUnit,
    options: lib.ExtractOptions,
    expected: dict[str, str] | None,
    credentials: str | None = None,
    fingerprints: tuple | None = None,
) -> int:
    """Returns the number of tensors written (0 when the unit was already complete).

    `fingerprints` (the plan's, taken before the checksum tasks) let a worker on the same machine
    trust `expected` for a local file that has not changed since, instead of hashing it again.
    """
    use_credentials(credentials)
    result = lib.extract_unit(
        _source(source_url), parse_model_url(model_url), unit, options, expected, fingerprints=fingerprints
    )
    return result.written


@task(name="publish-manifest", **_POLICY)
def publish(
    source_url: str,
    model_url: str,
    files: dict,
    the_plan: lib.ExtractPlan,
    options: lib.ExtractOptions,
    facts: dict,
    credentials: str | None = None,
) -> dict:
    """Read every record back from the store, write the manifest last, then the run facts."""
    use_credentials(credentials)
    source = _source(source_url)
    model = parse_model_url(model_url)
    records = lib.stored_records(source, model, the_plan.units, options.generation)
    manifest = lib.build_manifest(model, source, options, files, records)
    status = lib.publish(model, manifest, options.force)
    lib.write_run(
        model, facts["run_id"], {**facts, "finished": time.time(), "outcome": status, "tensors": len(records)}
    )
    return {"status": status, "manifest": model.key("manifest.json"), "tensors": len(records)}


@task(name="stage-model", **_POLICY)
def stage(source_url: str, options: lib.ExtractOptions, run_id: str, credentials: str | None = None) -> str:
    """The staging folder (a model URL) a remote source without a known revision is extracted into."""
    use_credentials(credentials)
    return lib.staging_ref(_source(source_url), options, run_id).url


@task(name="publish-staged", **_POLICY)
def publish_staged(
    source_url: str,
    staging_url: str,
    the_plan: lib.ExtractPlan,
    options: lib.ExtractOptions,
    checksums: dict[str, str] | None,
    facts: dict,
    credentials: str | None = None,
) -> dict:
    """Name the revision from the staged records, move them there (under its lease), manifest last."""
    use_credentials(credentials)
    source = _source(source_url)
    done = lib.publish_staged(source, parse_model_url(staging_url), the_plan, options, checksums, facts["run_id"])
    lib.write_run(
        done.model,
        facts["run_id"],
        # written: the tensors this run put into the model (staged ones already there are kept)
        {
            **facts,
            "finished": time.time(),
            "outcome": done.status,
            "tensors": len(done.records),
            "written": facts["written"] - done.kept,
            "skipped": done.kept,
        },
    )
    return {"status": done.status, "model_url": done.model.url, "tensors": len(done.records)}


@task(name="record-run", **_POLICY)
def record_run(model_url: str, facts: dict, credentials: str | None = None) -> None:
    """Run facts of a failed run (times, host, error): runs/<run-id>.json."""
    use_credentials(credentials)
    lib.write_run(parse_model_url(model_url), facts["run_id"], {**facts, "finished": time.time()})
