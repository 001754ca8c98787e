"""What every command shares: consoles, one-line user errors, shared options, the flow runner.

User errors (WeightsmithError) print one line, `error: <file>: <problem>`, and exit with 2.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from weightsmith import state
from weightsmith.errors import WeightsmithError
from weightsmith.options import parameters

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", help="Store URL: a folder or s3://bucket/prefix (default: the state folder's store)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NoPrefectOpt = Annotated[bool, typer.Option("--no-prefect", help="Call the library directly.")]


def quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # aiohttp sessions of s3fs are closed by interpreter exit, which asyncio reports as errors.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def user_errors(fn: Callable) -> Callable:
    """Turn WeightsmithError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except WeightsmithError as e:
            print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@contextmanager
def byte_progress(description: str, enabled: bool = True):
    """A rich progress bar over bytes; yields (advance, set_total) callbacks."""
    if not enabled or not err.is_terminal:
        yield (lambda n, name: None), (lambda total: None)
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[name]}"),
        console=err,
        transient=True,
    ) as p:
        task = p.add_task(description, total=None, name="")
        yield (lambda n, name: p.update(task, advance=n, name=name[-40:])), (lambda t: p.update(task, total=t))


def build_options(cls, **values):
    """Validate options once, at the edge; a bad value is a one-line error naming the flag."""
    try:
        return cls(**values)
    except ValidationError as e:
        first = e.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise WeightsmithError(flag, message) from None


def run_flow(name: str, task_runner: str = "threads", workers: int = 0, dask_address: str | None = None):
    """A flow of flows/registry.py with the chosen task runner, Prefect set up for the embedded default.

    The returned call takes the flow's arguments and, as `options`, a stage's options model,
    which it passes as the flat parameters the flow declares.
    """
    state.configure_prefect()
    from weightsmith_flows import registry
    from weightsmith_flows.runners import DEFAULT_WORKERS, RUNNERS, embedded_settings, make_runner

    if task_runner not in RUNNERS:
        raise WeightsmithError("--task-runner", f"unknown runner {task_runner!r} (choose from {', '.join(RUNNERS)})")
    quiet_prefect()
    runner = make_runner(task_runner, workers or DEFAULT_WORKERS, dask_address)
    chosen = registry.FLOWS[name].with_options(task_runner=runner)

    def call(options=None, **arguments):
        """Call the flow with `arguments` and the flat parameters of `options` that it takes."""
        if options is not None:
            accepted = inspect.signature(chosen.fn).parameters
            arguments = {**parameters(options, accepted), **arguments}
        with embedded_settings():
            return chosen(**arguments)

    return call


def quiet_prefect() -> None:
    """A user error raised inside a task is printed once, as one line, by `user_errors`: Prefect's
    own log lines about it (state messages, tracebacks) are dropped from the console. The run's
    final state in Prefect still holds the error."""

    class DropUserErrors(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], WeightsmithError):
                return False
            return "WeightsmithError" not in str(record.getMessage())

    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect"):
        logging.getLogger(name).addFilter(DropUserErrors())


def load_config(text: str | None) -> dict:
    """Generator options from inline JSON or a YAML/JSON file."""
    if not text:
        return {}
    import yaml

    try:
        if os.path.exists(text):
            with open(text) as f:
                value = yaml.safe_load(f)
        else:
            value = json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise WeightsmithError("--config", f"not JSON or YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise WeightsmithError("--config", "must be a mapping of option names to values")
    return value
