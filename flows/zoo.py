"""The `build-zoo` flow: plan from the members' manifests, one task per tensor stack, zoo.json last.

Resume comes from the store: a stack whose record carries the plan's fingerprint is skipped by
the library, so re-running after a crash writes only the missing stacks. Deployed as
`build-zoo/cpu` (deployments/prefect.yaml).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from weightsmith.store import Store
from weightsmith.zoo import zoo_prefix
from weightsmith.zoo.build import ZooOptions
from weightsmith_flows.runners import make_runner
from weightsmith_tasks import zoo as t
from weightsmith_tasks.credentials import use_credentials


@flow(name="build-zoo", task_runner=make_runner("threads"), validate_parameters=True)
def build_zoo(
    zoo_id: str,
    models: list[str],
    store: str | None = None,
    include: list[str] | None = None,
    base: str | None = None,
    align: str = "none",
    ordered: bool = False,
    align_to: str | None = None,
    credentials: str | None = None,
) -> str:
    """Stack the same tensors of `models` (store model URLs) into zoos/<zoo_id>/; returns the zoo URL.

    `store` defaults to the first member's store; `credentials` names a saved Prefect
    `AwsCredentials` or `S3Bucket` block, as for `extract-model`.
    """
    log = get_run_logger()
    use_credentials(credentials)
    options = ZooOptions(
        zoo_id=zoo_id,
        models=tuple(models),
        store=store,
        include=tuple(include or ()),
        base=base,
        align=align,
        ordered=ordered,
        align_to=align_to,
    )
    plan = t.prepare(options, credentials)
    log.info("%d members, %d stack units", len(plan.members), len(plan.units))
    units = sorted(plan.units, key=lambda u: (-u.nbytes, u.index))  # the biggest first
    futures = [t.build_unit.submit(plan, unit, credentials) for unit in units]
    written, failed = 0, []
    for future in as_completed(futures):
        try:
            written += future.result()
        except Exception as e:  # the unit failed after its retries; the others go on
            failed.append(e)
    if failed:
        raise failed[0]  # finished stacks stay in the store for the next run; no zoo.json
    t.publish(plan, credentials)
    url = Store(plan.store).url_of(zoo_prefix(zoo_id))
    log.info("%s: %d stacks written", url, written)
    return url
