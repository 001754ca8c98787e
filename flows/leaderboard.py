"""The `leaderboard-batch` flow: process the models that are new on a leaderboard, once each.

Reads the source (`hf-hub` or a manifest), compares it with `<store>/catalog.json` and sends
each new (id, revision), or each failed one whose backoff is over, to the pipeline flow:
through its deployment (`<pipeline>/cpu`, `run_deployment`) when a Prefect server has that
deployment and its pool has an online worker, else in this process as a subflow. At most
`max_parallel` models run at once; each outcome goes into the catalogue as it finishes, and a
summary (markdown and table artifacts) lists the processed, failed and skipped models.

Deployed as `leaderboard-batch/daily` (deployments/prefect.yaml) with a daily cron.
"""

from __future__ import annotations

import functools
import importlib
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from weightsmith import catalog, state
from weightsmith.errors import WeightsmithError
from weightsmith.leaderboard import ModelEntry, SourceQuery, ZooGrowth, summarize
from weightsmith_tasks import leaderboard as t
from weightsmith_tasks.credentials import use_credentials

# Pipeline flows by name: (module, function). `extract-model` takes no `stages` parameter and
# runs the extract stage only.
PIPELINES = {
    "weightsmith-pipeline": ("weightsmith_flows.pipeline", "weightsmith_pipeline"),
    "extract-model": ("weightsmith_flows.extract", "extract_model"),
}
FIXED_STAGES = {"extract-model": ["extract"]}
STAGES = ("extract", "weight-stats", "predict", "lm-eval")  # the pipeline's stages
DEFAULT_STAGES = ["extract", "weight-stats"]  # prediction and LM evaluation are opt-in
POOL_DEPLOYMENT = "cpu"  # the pipeline's deployment: <pipeline>/cpu
MAX_PARALLEL = 16


def check_pipeline(pipeline: str, stages: list[str] | None) -> list[str]:
    """The stages to run; an unknown pipeline or stages it cannot run are user errors."""
    if pipeline not in PIPELINES:
        raise WeightsmithError(f"pipeline {pipeline!r}", f"unknown (choose from {', '.join(PIPELINES)})")
    unknown = [s for s in stages or () if s not in STAGES]
    if unknown:
        # Checked here: a typo would otherwise fail every model and use up its tries.
        raise WeightsmithError(f"stage {unknown[0]!r}", f"unknown (choose from {', '.join(STAGES)})")
    fixed = FIXED_STAGES.get(pipeline)
    if fixed is None:
        return list(stages or DEFAULT_STAGES)
    if stages is not None and list(stages) != fixed:
        raise WeightsmithError(f"pipeline {pipeline!r}", f"runs the stages {fixed} only, not {list(stages)}")
    return fixed


def choose_where(pipeline: str) -> tuple[str, str]:
    """("deployment" | "in-process", reason): the deployment when a worker can run it."""
    name = f"{pipeline}/{POOL_DEPLOYMENT}"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except Exception:  # no such deployment, or no API server (ephemeral mode has no workers)
            return "in-process", f"no deployment {name}"
        pool = deployment.work_pool_name
        try:
            workers = client.read_workers_for_work_pool(work_pool_name=pool) if pool else []
        except Exception:
            workers = []
    online = sum(1 for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE"))
    if not online:
        return "in-process", f"deployment {name} has no online worker in pool {pool!r}"
    return "deployment", f"deployment {name}: {online} online worker(s) in pool {pool!r}"


def run_pipeline(
    pipeline: str,
    where: str,
    store: str,
    stages: list[str],
    credentials: str | None,
    entry: ModelEntry,
) -> dict:
    """Run the pipeline flow on one model, here or through its deployment; raise on failure.

    The model is named by the entry's id and revision, so its URL in the store is known even
    when a deployment's return value was not persisted.
    """
    params = dict(
        source=entry.source,
        store=store,
        name=entry.id,
        revision=entry.revision,
        credentials=credentials,
    )
    if pipeline not in FIXED_STAGES:
        params["stages"] = stages
    if where == "deployment":
        name = f"{pipeline}/{POOL_DEPLOYMENT}"
        run = run_deployment(name, parameters=params, timeout=None, as_subflow=True)
        if run.state is None or not run.state.is_completed():
            kind = run.state.type.value if run.state else "UNKNOWN"
            message = ((run.state.message if run.state else "") or "").splitlines()
            raise RuntimeError(f"{name} run {run.name} ended {kind}" + (f": {message[0]}" if message else ""))
        return _returned(run.state)
    module, function = PIPELINES[pipeline]
    result = getattr(importlib.import_module(module), function)(**params)
    return result if isinstance(result, dict) else {"model_url": result}


def _returned(state) -> dict:
    from prefect.exceptions import MissingResult

    try:
        result = state.result()
    except MissingResult:  # the worker did not persist the return value; the store has the model
        return {}
    return result if isinstance(result, dict) else {"model_url": result}


@flow(
    name="leaderboard-batch",
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL),
    validate_parameters=True,
)
def leaderboard_batch(
    source: str = "hf-hub",
    store: str | None = None,
    filter: str | None = None,
    sort: str = "downloads",
    limit: int | None = 20,
    endpoint: str | None = None,
    stages: list[str] | None = None,
    max_parallel: int = 2,
    max_attempts: int = catalog.MAX_ATTEMPTS,
    backoff_seconds: float = catalog.BACKOFF_SECONDS,
    pipeline: str = "weightsmith-pipeline",
    credentials: str | None = None,
    dry_run: bool = False,
    zoo: Literal["none", "family"] = "none",
    zoo_include: list[str] | None = None,
    zoo_max_bytes: int | None = None,
) -> dict:
    """Process the models of `source` that the catalogue has not seen (or may retry).

    Args:
        source: "hf-hub", or the path or URL (s3://, http(s)://) of a JSON/YAML manifest.
        store: store URL; default: the credentials block's bucket, else the state folder's store.
        filter, sort, limit, endpoint: the hub query (`limit` also caps a manifest).
        stages: pipeline stages; default extract and weight-stats.
        max_parallel: models processed at once.
        max_attempts: tries per model revision before it is left failed.
        backoff_seconds: a failed model waits backoff_seconds * 2**(attempts-1) before a retry.
        pipeline: the pipeline flow (and `<pipeline>/cpu` deployment) to run per model.
        credentials: a saved AwsCredentials or S3Bucket block ("s3-bucket/lake").
        dry_run: plan and report only.
        zoo: "family" appends each newly processed model that has a family (its model card's
            base_model) to the zoo `family-<base>`; "none" grows no zoos.
        zoo_include: tensor globs a family zoo holds (default: every tensor).
        zoo_max_bytes: the largest member (float32 bytes of its selected tensors) a zoo takes.
    """
    log = get_run_logger()
    if not 1 <= max_parallel <= MAX_PARALLEL:
        raise WeightsmithError("max_parallel", f"must be between 1 and {MAX_PARALLEL}, not {max_parallel}")
    stages = check_pipeline(pipeline, stages)
    store = store or use_credentials(credentials) or state.default_store()
    query = SourceQuery(filter=filter, sort=sort, limit=limit, endpoint=endpoint)
    growth = ZooGrowth(zoo=zoo, include=tuple(zoo_include or ()), max_member_bytes=zoo_max_bytes)
    entries = t.read_source(source, query, credentials)
    decisions = t.plan_batch(store, entries, max_attempts, credentials)
    todo = [d for d in decisions if d.action == "process"]
    log.info("%d models listed, %d to process", len(decisions), len(todo))
    if dry_run:
        plan = [
            {"id": d.entry.id, "revision": d.entry.revision, "action": d.action, "reason": d.reason} for d in decisions
        ]
        create_table_artifact(
            key="leaderboard-batch-plan",
            table=plan,
            description=f"Dry run of {source} into {store}",
        )
        return {"dry_run": True, "store": store, "plan": plan}

    t.record_skips(store, decisions, credentials)
    where, reason = choose_where(pipeline) if todo else ("in-process", "nothing to process")
    log.info("pipeline %s runs %s (%s)", pipeline, where, reason)
    process = functools.partial(run_pipeline, pipeline, where, store, stages, credentials)
    outcomes, pending = [], []
    for decision in todo:  # a sliding window of at most max_parallel models
        if len(pending) >= max_parallel:
            finished = next(as_completed(pending))
            pending.remove(finished)
            outcomes.append(finished.result())
        pending.append(t.process_model.submit(store, decision.entry, process, backoff_seconds, credentials))
    outcomes += [f.result() for f in pending]
    zoos = []
    if growth.zoo != "none":
        # One model at a time, in the listing's order: appends to one zoo never race each other.
        done = {(o.id, o.revision): o for o in outcomes}
        for d in todo:
            facts = t.grow_family_zoo(store, d.entry, done[(d.entry.id, d.entry.revision)], growth, credentials)
            if facts:
                zoos.append({"model": d.entry.key, **facts})
        log.info("family zoos: %s", ", ".join(f"{z['model']} {z['status']} {z['id']}" for z in zoos) or "nothing")

    summary = summarize(decisions, outcomes)
    title = f"leaderboard batch: {source}"
    create_markdown_artifact(
        key="leaderboard-batch",
        description="Processed, failed and skipped models",
        markdown=summary.markdown(title) + f"\n- store: `{store}`\n- pipeline: {pipeline} "
        f"({where}: {reason}), stages: {', '.join(stages)}\n",
    )
    create_table_artifact(
        key="leaderboard-batch-models",
        table=summary.table(),
        description=f"Models of {source} in this batch",
    )
    log.info(
        "%d processed, %d failed, %d skipped",
        len(summary.processed),
        len(summary.failed),
        len(summary.skipped),
    )
    return {**summary.to_dict(), "store": store, "where": where, "reason": reason, "zoos": zoos}
