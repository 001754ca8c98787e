"""Prediction task: one library call, retried on storage errors, tagged for the GPU pool."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.credentials import use_credentials
from tasks.policy import RETRIES, RETRY_DELAYS, RETRY_JITTER, storage_error
from weightsmith import predict as lib


@task(
    name="predict-tensors",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=storage_error,
    cache_policy=NO_CACHE,
    tags=["weightsmith", "predict"],
)
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
