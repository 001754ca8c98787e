"""Task runners by name: threads (default), processes, or Dask (local cluster or an address)."""

from __future__ import annotations

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

RUNNERS = ("threads", "processes", "dask")


def make_runner(kind: str = "threads", workers: int = 4, dask_address: str | None = None):
    """A task runner; each worker process reads only its units' byte ranges from the source."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    raise ValueError(f"unknown task runner {kind!r} (choose from {', '.join(RUNNERS)})")
