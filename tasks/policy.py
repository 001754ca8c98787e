"""Shared task policy: which failures are worth a retry, and the backoff between tries.

Timeouts live at the storage client (connect and read timeouts in `weightsmith.ranged`), not on
the tasks: Prefect cannot interrupt a task running in a worker thread, so a task timeout would
only fire after the hung request returned. A timed-out request raises, and the task retries.
"""

from __future__ import annotations

import os

from prefect.tasks import exponential_backoff

from weightsmith.errors import WeightsmithError

# Operators (and tests) can change the number of tries without touching code.
RETRIES = int(os.environ.get("WEIGHTSMITH_TASK_RETRIES", "4"))
RETRY_DELAYS = exponential_backoff(backoff_factor=2)  # 2, 4, 8, 16 s
RETRY_JITTER = 0.3


def storage_error(task, task_run, state) -> bool:
    """Retry transient storage and network failures; never a user error (bad file, bad input)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be loaded: treat as transient
        exc = e
    if isinstance(exc, WeightsmithError | ValueError | KeyError | TypeError):
        return False
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or type(exc).__module__.startswith(
        ("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs")
    )
