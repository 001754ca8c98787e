"""Prefect flows: wire tasks, fan out per work unit, dispatch to pools, publish artifacts."""

import logging

import prefect  # noqa: F401  (Prefect configures logging on import; our filter comes after)


class _ThreadTimeoutNote(logging.Filter):
    """Drop Prefect's per-task note that timeouts cannot interrupt worker threads: our tasks
    run in threads by design, and the note repeats for every unit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread" not in record.getMessage()


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNote())
