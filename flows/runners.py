"""Task runners by name: threads (default), processes, or Dask (local cluster or an address)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

RUNNERS = ("threads", "processes", "dask")


# Units at once by default: one per core, at most 4. Each unit already overlaps its reads, hashing
# and writes on threads of its own; on 2 cores 4 units at once measured 1.5-1.8x the library's
# time against 0.9-1.2x with 2 (bench/pipeline.py).
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def make_runner(kind: str = "threads", workers: int = DEFAULT_WORKERS, dask_address: str | None = None):
    """A task runner; each worker process reads only its units' byte ranges from the source."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        )
    raise ValueError(f"unknown task runner {kind!r} (choose from {', '.join(RUNNERS)})")


@contextlib.contextmanager
def embedded_settings() -> Iterator[None]:
    """Settings for flows run in this process against the embedded (ephemeral) API.

    Prefect's flow-run heartbeat thread sleeps in whole seconds and is joined when the run ends,
    which added ~1.07 s to every flow run here (an empty flow: 1.07 s, without it 0.06 s).
    Heartbeats let a server notice a worker's flow run that died; an ephemeral server lives and
    dies with this process, so they are off there. Runs against a real server keep them.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
