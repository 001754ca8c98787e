"""The `extract-model` flow: plan from headers, fan units out, publish the manifest last.

Resume comes from the store: a unit whose tensors are complete and match their checksums is
skipped by the library, so re-running after a crash recomputes only what is missing, and the
manifest of a resumed run is identical to an uninterrupted one. A remote source without a known
revision is read once into the run's staging folder instead (`weightsmith.extract`): a re-run
reads it again and finds the same revision.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from weightsmith import lease
from weightsmith.extract import ExtractOptions, biggest_first, new_run_id, run_facts, with_generation
from weightsmith.model import parse_model_url
from weightsmith.options import from_parameters
from weightsmith_flows.artifacts import publish_model_artifacts
from weightsmith_flows.runners import make_runner
from weightsmith_tasks import extract as t
from weightsmith_tasks.credentials import use_credentials


@flow(name="extract-model", task_runner=make_runner("threads"), validate_parameters=True)
def extract_model(
    source: str,
    store: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    images: str = "all",
    force: bool = False,
    wait_s: float = 0.0,
    unit_bytes: int = 64_000_000,
    credentials: str | None = None,
) -> str:
    """Extract every tensor of `source` into the store; returns the model URL.

    `credentials` names a saved Prefect `AwsCredentials` or `S3Bucket` block ("aws-credentials/
    lake", "s3-bucket/lake"); without it the standard AWS variables are used. An S3Bucket block
    also gives the default store (its bucket and folder).
    """
    started = time.time()
    log = get_run_logger()
    bucket_url = use_credentials(credentials)
    options = from_parameters(ExtractOptions, locals(), store=store or bucket_url)
    the_plan = t.prepare(source, options, credentials)
    log.info("%d work units, %d source bytes to read", len(the_plan.units), the_plan.total_bytes)
    run_id = new_run_id()
    facts = run_facts(run_id, "extract-flow", options, source)
    if the_plan.staged:
        return _staged(source, options, the_plan, run_id, facts, credentials, started)

    checksums = None
    if the_plan.checksum_units:
        futures = t.checksum_unit.map(source, biggest_first(the_plan.checksum_units), options.block_bytes, credentials)
        checksums = {k: v for f in futures for k, v in f.result().items()}
    resolved = t.resolve_model(source, options, checksums, credentials)
    model_url = resolved["model_url"]
    model = parse_model_url(model_url)
    # This flow run is the model's only writer until it ends (a second run fails with one line).
    with lease.acquire(model, run_id, options.wait_s) as held:
        options = with_generation(model, options, run_id)
        facts["written"] = _extract_units(source, model_url, the_plan, options, checksums, facts, credentials)
        held.check()
        outcome = t.publish(source, model_url, resolved["files"], the_plan, options, facts, credentials)
    publish_model_artifacts(model, model.manifest(), time.time() - started, outcome["status"])
    get_run_logger().info("%s: %s (%d tensors written)", outcome["status"], model_url, facts["written"])
    return model_url


def _staged(source, options, the_plan, run_id, facts, credentials, started) -> str:
    """A remote source without a known revision: every byte read once (see `weightsmith.extract`).

    The units go into the run's staging folder, hashed as they are written; the tensors left
    out are hashed beside them; `publish-staged` names the revision and moves them there.
    """
    staging_url = t.stage(source, options, run_id, credentials)
    hashed = (
        t.checksum_unit.map(source, biggest_first(the_plan.checksum_units), options.block_bytes, credentials)
        if the_plan.checksum_units
        else []
    )
    staged_options = options.model_copy(update={"generation": None})
    facts["written"] = _extract_units(source, staging_url, the_plan, staged_options, None, facts, credentials)
    checksums = {k: v for f in hashed for k, v in f.result().items()}
    outcome = t.publish_staged(source, staging_url, the_plan, options, checksums, facts, credentials)
    model = parse_model_url(outcome["model_url"])
    publish_model_artifacts(model, model.manifest(), time.time() - started, outcome["status"])
    get_run_logger().info("%s: %s (%d tensors written)", outcome["status"], model.url, facts["written"])
    return model.url


def _extract_units(source, model_url, the_plan, options, checksums, facts, credentials) -> int:
    """Submit every unit, report progress; a failed unit records the run and fails the flow."""
    progress_id = create_progress_artifact(progress=0.0, description=f"extract {model_url}")
    units = biggest_first(the_plan.units)  # no big tensor left to run alone at the end
    futures = [
        t.extract_unit.submit(
            source,
            model_url,
            unit,
            options,
            None if checksums is None else {n: checksums[n] for n in unit.raw},
            credentials,
            the_plan.fingerprints,
        )
        for unit in units
    ]
    done_bytes, written, failed = 0, 0, []
    sizes = {f.task_run_id: u.nbytes for f, u in zip(futures, units, strict=True)}
    for future in as_completed(futures):
        try:
            written += future.result()
        except Exception as e:  # the unit failed after its retries; the others go on
            failed.append(e)
        done_bytes += sizes[future.task_run_id]
        update_progress_artifact(progress_id, progress=100.0 * done_bytes / max(1, sum(sizes.values())))
    if failed:
        # Finished units stay in the store for the next run; no manifest is written.
        error = (str(failed[0]).splitlines() or [type(failed[0]).__name__])[0][:500]
        t.record_run(
            model_url,
            {**facts, "written": written, "outcome": "failed", "error": error, "failed_units": len(failed)},
            credentials,
        )
        raise failed[0]  # the flow run fails with the first unit's error
    return written
