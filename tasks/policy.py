"""The one task policy: which failures are worth a retry, the backoff between tries, no result
cache (the store is the truth), and tags. Every task is declared `@task(name=..., **policy(...))`.

Timeouts live at the storage client (connect and read timeouts in `weightsmith.ranged`), not on
the tasks: Prefect cannot interrupt a task running in a worker thread, so a task timeout would
only fire after the hung request returned. A timed-out request raises, and the task retries.
"""

from __future__ import annotations

import os

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from weightsmith.errors import WeightsmithError

# Operators (and tests) can change the number of tries without touching code.
RETRIES = int(os.environ.get("WEIGHTSMITH_TASK_RETRIES", "4"))
RETRY_DELAYS = exponential_backoff(backoff_factor=2)  # 2, 4, 8, 16 s
RETRY_JITTER = 0.3


def policy(*tags: str, retries: int | None = None) -> dict:
    """Keyword arguments for `@task`: the shared retries (or `retries`), no cache, "weightsmith" + `tags`."""
    return dict(
        retries=RETRIES if retries is None else retries,
        retry_delay_seconds=RETRY_DELAYS,
        retry_jitter_factor=RETRY_JITTER,
        retry_condition_fn=storage_error,
        cache_policy=NO_CACHE,
        tags=["weightsmith", *tags],
    )


def storage_error(task, task_run, state) -> bool:
    """Retry transient storage and network failures; never a user error (WeightsmithError: bad file,
    bad input), and never a bug (any other exception: a retry would fail the same way)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be loaded: treat as transient
        exc = e
    if isinstance(exc, WeightsmithError):
        return False
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or type(exc).__module__.startswith(
        ("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs")
    )
