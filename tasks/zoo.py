"""Zoo tasks: thin wrappers of `weightsmith.zoo.build` stages.

Tasks receive the small frozen plan and one unit, never arrays. The store is the truth: a
stack whose record carries the plan's fingerprint is complete, so nothing is cached here.
"""

from __future__ import annotations

from prefect import task

from weightsmith.zoo import build as lib
from weightsmith_tasks.credentials import use_credentials
from weightsmith_tasks.policy import policy

_POLICY = policy("zoo")


@task(name="prepare-zoo", **_POLICY)
def prepare(options: lib.ZooOptions, credentials: str | None = None) -> lib.ZooPlan:
    use_credentials(credentials)
    return lib.prepare(options)


@task(name="build-stack", **_POLICY)
def build_unit(plan: lib.ZooPlan, unit: lib.StackUnit, credentials: str | None = None) -> int:
    """Returns the stacks written (0 when the unit was already complete)."""
    use_credentials(credentials)
    return lib.build_unit(plan, unit)


@task(name="publish-zoo", **_POLICY)
def publish(plan: lib.ZooPlan, credentials: str | None = None) -> dict:
    """zoo.json, written last."""
    use_credentials(credentials)
    return lib.publish(plan)
