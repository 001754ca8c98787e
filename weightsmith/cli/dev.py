"""`weightsmith dev up|status|down`: the local stack without Docker (see weightsmith.dev.stack).

`dev up` prints `export` lines on stdout (so `eval "$(weightsmith dev up)"` works) and a short
summary on stderr. `dev status` exits with 1 when the stack is not running or not healthy.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from weightsmith import state
from weightsmith.cli.common import user_errors

dev_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The local stack without Docker: SeaweedFS S3, a Prefect server and workers.",
)


def _say(text: str = "") -> None:
    print(text, file=sys.stderr)


@dev_app.command("up")
@user_errors
def up_command(
    gpu_worker: Annotated[
        bool | None,
        typer.Option(
            "--gpu-worker/--no-gpu-worker",
            help="Start a worker for the gpu pool (default: only when CUDA is available).",
        ),
    ] = None,
) -> None:
    """Start S3, the Prefect server and workers; print the variables to export."""
    from weightsmith.dev import stack as devstack

    home = state.home()
    if sys.stderr.isatty():
        _say(f"starting the dev stack in {home / 'dev'} (15-30 s) ...")
    stack = devstack.up(home, gpu_worker=gpu_worker)
    for line in stack.exports():
        print(line)
    verb = "already running" if stack.already_running else "started"
    _say(f"dev stack {verb} in {stack.dev_dir}")
    for component in stack.components.values():
        _say(f"  {component.name:<11} pid {component.pid:<7} log {component.log}")
    _say(f"  Prefect UI  {stack.api_url.removesuffix('/api')}")
    _say(f"  S3          {stack.s3_endpoint} (bucket {stack.bucket}, store {stack.store})")
    _say('Export the variables above (eval "$(weightsmith dev up)"); stop: weightsmith dev down')


@dev_app.command("status")
@user_errors
def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show each component: pid, alive, health check. Exit status 1 unless all are healthy."""
    from weightsmith.dev import stack as devstack

    report = devstack.status(state.home())
    if as_json:
        print(json.dumps(report, indent=2))
    elif not report["components"]:
        print(f"no dev stack recorded in {report['home']}/dev")
    else:
        verdict = "healthy" if report["healthy"] else "NOT healthy"
        print(f"dev stack in {report['home']}/dev: {verdict}")
        for name, c in report["components"].items():
            mark = "ok " if c["healthy"] else "BAD"
            print(f"  {mark} {name:<11} pid {c['pid']:<7} {c['detail']}")
    if not report["healthy"]:
        raise typer.Exit(1)


@dev_app.command("down")
@user_errors
def down_command() -> None:
    """Stop every process the stack started (flow runs included); data stays in dev/."""
    from weightsmith.dev import stack as devstack

    stopped = devstack.down(state.home())
    if not stopped:
        _say(f"nothing running in {state.home() / 'dev'}")
    for name in stopped:
        print(f"stopped {name}")
