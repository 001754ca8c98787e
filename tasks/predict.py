"""Prediction tasks: one library call each, retried on storage errors, tagged for the GPU pool.

`plan_fits` lists the fits of a prediction, `fit` makes one (the flow runs one task per fit, so
fits fan out over the task runner's workers), and `predict` samples and writes the run, reusing
the states the fits stored.
"""

from __future__ import annotations

from prefect import task

from weightsmith import predict as lib
from weightsmith_tasks.credentials import use_credentials
from weightsmith_tasks.policy import policy


@task(name="plan-fits", **policy())
def plan_fits(model_url: str, options: lib.PredictOptions, credentials: str | None = None) -> list[list[str]]:
    """The tensor names of each fit (small values only)."""
    use_credentials(credentials)
    return [list(u.names) for u in lib.plan_fits(model_url, options)]


@task(name="fit-generator", **policy("predict"))
def fit(
    model_url: str, options: lib.PredictOptions, names: list[str], threads: int, credentials: str | None = None
) -> dict:
    """Fit (or find) one planned fit's state; returns where it is stored."""
    use_credentials(credentials)
    out = lib.fit_unit(model_url, options, lib.FitUnit(tuple(names)), threads)
    return {"state_key": out.state_key, "reused": out.reused, "seconds": round(out.seconds, 3)}


@task(name="predict-tensors", **policy("predict"))
def predict(model_url: str, options: lib.PredictOptions, credentials: str | None = None) -> dict:
    """Returns the run URL and the devices used (small values only)."""
    use_credentials(credentials)
    result = lib.predict(model_url, options)
    return {
        "run_url": result.run_url,
        "run_id": result.run_id,
        "tensors": result.tensors,
        "devices": sorted(set(result.devices)),
    }
