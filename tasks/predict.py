"""Prediction task: one library call, retried on storage errors, tagged for the GPU pool."""

from __future__ import annotations

from prefect import task

from weightsmith import predict as lib
from weightsmith_tasks.credentials import use_credentials
from weightsmith_tasks.policy import policy


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
